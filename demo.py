"""Try a sonnet model in the browser: type the opening lines, pick the decoding, read the sonnet.

    python demo.py                                       # the newest sonnet run, on http://127.0.0.1:7860
    python demo.py --model runs/sonnet/full-model-gpt2/latest --port 8000

The page (``tasks.demo``) offers every sonnet run under ``--runs`` (the ``--model`` one first, else the
newest) and any path typed into its model box; each sonnet is made by ``generate.py``'s own code path
(``generate.complete``) with the page's decoding settings, and the page shows the matching
``generate.py`` command. A model is loaded once, when first asked for. Needs ``gradio`` (in
requirements.txt). A ``--model`` that names no model, or no sonnet run to offer, is one ``error:``
line, exit status 2.
"""

from __future__ import annotations

import copy
from pathlib import Path

import gradio as gr
from torch import nn

from cli.common import pick_device, run_main, seed_everything
from cli.demo import DemoSettings, parse_settings
from cli.generate import GenerateSettings
from errors import InputError
from generate import complete
from models.generation_config import GenerationConfig
from models.loading import load_tokenizer
from tasks.common import check_context
from tasks.demo import build_page, model_file, sonnet_models
from tasks.restore import restore_task_model
from tasks.sonnet_form import TARGET_LINES


class SonnetContinuer:
    """``generate.py``'s path behind the page: each model restored once and kept; ``complete``
    consumes the model it gets (prepared inference-only), so each sonnet decodes a copy."""

    def __init__(self, settings: DemoSettings) -> None:
        self.settings = settings
        self.device = pick_device(device=settings.device)
        self.tokenizer = load_tokenizer(settings.tokenizer, verbose=False)
        self.models: dict[Path, nn.Module] = {}

    def model(self, spec: str) -> nn.Module:
        path = model_file(spec)
        if path not in self.models:
            self.models[path] = restore_task_model(path, "body").model.to(self.device).eval()
        return self.models[path]

    def __call__(self, spec: str, prompt: str, config: GenerationConfig) -> str:
        model = self.model(spec)
        check_context(model.config.max_position_embeddings, max_new_tokens=config.max_new_tokens)
        s = self.settings
        run = GenerateSettings(model=spec, prompts=(prompt,), generation=config, num_lines=TARGET_LINES,
                               tokenizer=s.tokenizer, seed=s.seed, device=s.device)
        return complete(copy.deepcopy(model), self.tokenizer, [prompt], run)[0][0]


def build(settings: DemoSettings) -> tuple[gr.Blocks, str]:
    """The page for ``settings`` and the model it selects first (loaded: a bad one fails here, in
    one line, before any server starts)."""
    seed_everything(settings.seed)
    found = [str(p) for p in sonnet_models(settings.runs)]
    if settings.model is None and not found:
        raise InputError(f"no sonnet run under {settings.runs}: train one (python sonnet_generation.py) or pass "
                         "--model")
    first = settings.model if settings.model is not None else found[0]
    continuer = SonnetContinuer(settings)
    continuer.model(first)
    models = [first, *(m for m in found if Path(m).resolve() != model_file(first).resolve())]
    return build_page(models, continuer), first


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(argv, description=__doc__)
    page, first = build(settings)
    print(f"demo: {first} on http://{settings.host}:{settings.port} (Ctrl-C to stop)")
    page.launch(server_name=settings.host, server_port=settings.port, show_error=True, quiet=True)


if __name__ == "__main__":
    run_main(main)
