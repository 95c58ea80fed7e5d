"""Try a sonnet model in the browser: type the opening lines, pick the decoding, watch the sonnet appear.

    python demo.py                                       # the newest sonnet run, on http://127.0.0.1:7860
    python demo.py --model runs/sonnet/full-model-gpt2/latest --port 8000

The page (``tasks.demo``) offers every sonnet run under ``--runs`` (the ``--model`` one first, else the
newest) and any path typed into its model box; each sonnet is made by ``generate.py``'s own code path
(``generate.complete``) with the page's decoding settings, streamed as it is decoded (greedy, sampling,
contrastive search; beam search and MBR show their final choice), and the page shows the matching
``generate.py`` command. A model is loaded once, when first asked for (again when its file is rewritten;
the two asked for last are kept), and prepared for decoding once per weights choice and step shape.
Needs the demo's extras (``pip install -r requirements-demo.txt``; without them, that line and exit status
2). A ``--model`` that names no model, or no sonnet run to offer, is one ``error:`` line, exit status 2.
"""

from __future__ import annotations

import copy
import dataclasses
import shlex
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from cli.common import pick_device, run_main, seed_everything
from cli.demo import DemoSettings, parse_settings
from cli.generate import GenerateSettings, command_line
from decoding.streaming import TextStream, stream_pieces
from errors import InputError
from generate import complete, prepare, step_rows
from models.loading import load_tokenizer
from tasks.common import check_context
from tasks.restore import restore_task_model
from tasks.sonnet_form import TARGET_LINES

try:  # the page needs gradio, an optional extra: without it, main says how to install it
    from tasks.demo import SonnetRequest, build_page, model_file, sonnet_models
except ModuleNotFoundError as e:
    if e.name != "gradio":
        raise
    HAS_GRADIO = False
else:
    HAS_GRADIO = True
if TYPE_CHECKING:
    import gradio as gr
INSTALL = "the demo needs gradio: pip install -r requirements-demo.txt"
MODELS_KEPT = 2  # restored models kept (a page offering many runs would otherwise keep every one asked for)
PREPARED_KEPT = 4  # prepared models kept (each holds its own copy of the weights); the oldest goes first


class SonnetContinuer:
    """``generate.py``'s path behind the page: each model restored once and kept, and prepared for decoding
    (``generate.prepare``) once per (model, ``--quantize``, rows of a step) for ``complete`` to decode."""

    def __init__(self, settings: DemoSettings) -> None:
        self.settings = settings
        self.device = pick_device(device=settings.device)
        self.tokenizer = load_tokenizer(settings.tokenizer, verbose=False)
        self.models: OrderedDict[tuple[Path, int], nn.Module] = OrderedDict()
        self.prepared: OrderedDict[tuple[tuple[Path, int], str, int], nn.Module] = OrderedDict()

    def weights(self, spec: str) -> tuple[tuple[Path, int], nn.Module]:
        """The model ``spec`` names, keyed by its resolved file and that file's modification time: a file
        rewritten since (a sonnet run saved again, a ``best.pt`` still training) is loaded afresh and its older
        entries dropped, and a relative and an absolute path to one file share one entry. Only the
        ``MODELS_KEPT`` models asked for last are kept, with their prepared copies."""
        path = model_file(spec).resolve()
        key = (path, path.stat().st_mtime_ns)
        if key not in self.models:
            self.forget(path)
            self.models[key] = restore_task_model(path, "body").model.to(self.device).eval()
            while len(self.models) > MODELS_KEPT:
                self.forget(next(iter(self.models))[0])
        self.models.move_to_end(key)
        return key, self.models[key]

    def forget(self, path: Path) -> None:
        """Drop the model restored from ``path`` (any version of the file) and every prepared copy of it."""
        for old in [k for k in self.models if k[0] == path]:
            del self.models[old]
        for old in [k for k in self.prepared if k[0][0] == path]:
            del self.prepared[old]

    def model(self, spec: str) -> nn.Module:
        return self.weights(spec)[1]

    def run_settings(self, request: SonnetRequest) -> GenerateSettings:
        """The ``generate.py`` settings of a request (what ``command`` prints and ``stream`` decodes)."""
        s = self.settings
        return GenerateSettings(model=request.model, prompts=(request.prompt,), generation=request.generation,
                                pool=request.pool, num_lines=TARGET_LINES, tokenizer=s.tokenizer, seed=s.seed,
                                device=s.device, quantize=request.quantize)

    def decoder(self, request: SonnetRequest) -> nn.Module:
        """The request's model prepared for decoding by ``generate.prepare`` (inference-only, the request's
        weights, the rows of its steps), from the cache when an earlier request prepared it."""
        settings = self.run_settings(request)
        weights, model = self.weights(request.model)
        check_context(model.config.max_position_embeddings, max_new_tokens=settings.generation.max_new_tokens)
        key = (weights, request.quantize, step_rows(settings, 1))
        if key not in self.prepared:
            self.prepared[key] = prepare(copy.deepcopy(model), self.tokenizer, settings, 1)[0]
            while len(self.prepared) > PREPARED_KEPT:
                self.prepared.popitem(last=False)
        self.prepared.move_to_end(key)
        return self.prepared[key]

    def stream(self, request: SonnetRequest) -> Iterator[str]:
        """The sonnet in pieces as it is decoded (one piece, the whole sonnet, for beam search and MBR)."""
        settings, model = self.run_settings(request), self.decoder(request)
        if request.pool is not None or request.generation.strategy == "beam":
            yield complete(model, self.tokenizer, [request.prompt], settings)[0][0]
            return
        text = TextStream(self.tokenizer.decode, self.tokenizer.eos_token_id)
        settings = dataclasses.replace(settings, generation=dataclasses.replace(settings.generation, on_token=text))
        yield from stream_pieces(text, lambda: complete(model, self.tokenizer, [request.prompt], settings)[0][0])

    def command(self, request: SonnetRequest) -> str:
        return shlex.join(["python", "generate.py", *command_line(self.run_settings(request))])


def build(settings: DemoSettings) -> tuple[gr.Blocks, str]:
    """The page for ``settings`` and the model it selects first (loaded: a bad one fails here, in
    one line, before any server starts)."""
    if not HAS_GRADIO:
        raise InputError(INSTALL)
    seed_everything(settings.seed)
    found = [str(p) for p in sonnet_models(settings.runs)]
    if settings.model is None and not found:
        raise InputError(f"no sonnet run under {settings.runs}: train one (python sonnet_generation.py) or pass "
                         "--model")
    first = settings.model if settings.model is not None else found[0]
    continuer = SonnetContinuer(settings)
    (first_file, _), _ = continuer.weights(first)
    models = [first, *(m for m in found if Path(m).resolve() != first_file)]
    return build_page(models, continuer), first


def main(argv: list[str] | None = None) -> None:
    settings = parse_settings(argv, description=__doc__)
    page, first = build(settings)
    print(f"demo: {first} on http://{settings.host}:{settings.port} (Ctrl-C to stop)")
    page.launch(server_name=settings.host, server_port=settings.port, show_error=True, quiet=True)


if __name__ == "__main__":
    run_main(main)
