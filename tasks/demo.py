"""The sonnet demo's page (``demo.py``): pick a sonnet model, type the opening lines, pick a decoding
strategy and its settings, and read the continuation with its form (lines, syllables, rhyme) beside it.

The page knows no model: ``demo.py`` hands it ``continue_sonnet(model, prompt, config) -> text``, which
is ``generate.py``'s own code path, so the page shows what ``generate.py`` prints for the same settings
(the page writes that command under the sonnet; ``tests/test_demo_browser.py`` checks the two agree).
The controls are ``GenerationConfig``'s fields under ``generate.py``'s flag names, and a run that stops
after 14 lines (``--num_lines 14``) as a sonnet does. Gradio serves it, bound to localhost by default.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path

import gradio as gr

from engine.run_dir import LATEST
from engine.run_paths import resolve_latest
from errors import InputError
from models.generation_config import GenerationConfig
from tasks.sonnet_form import TARGET_LINES, sonnet_form

STRATEGIES = ("greedy", "sample", "top-p", "beam", "contrastive")
# The settings each strategy reads, besides max_new_tokens, no_repeat_ngram_size and repetition_penalty.
STRATEGY_SETTINGS = {"greedy": (), "sample": ("temperature", "top_k"), "top-p": ("temperature", "top_p"),
                     "beam": ("num_beams", "length_penalty"), "contrastive": ("penalty_alpha", "top_k")}
# The sliders: (GenerationConfig field, low, high, step, default)
SLIDERS = (("max_new_tokens", 1, 512, 1, 128), ("temperature", 0.05, 2.0, 0.05, 1.0), ("top_k", 0, 100, 1, 4),
           ("top_p", 0.05, 1.0, 0.05, 0.9), ("num_beams", 2, 8, 1, 4), ("length_penalty", 0.0, 2.0, 0.1, 1.0),
           ("penalty_alpha", 0.05, 1.0, 0.05, 0.6), ("no_repeat_ngram_size", 0, 6, 1, 0),
           ("repetition_penalty", 1.0, 2.0, 0.05, 1.0))
ALWAYS = ("max_new_tokens", "no_repeat_ngram_size", "repetition_penalty")
INTS = {f.name for f in fields(GenerationConfig) if f.type == "int"}
SONNET_18 = ("Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:\n"
             "Rough winds do shake the darling buds of May,")
MODEL_FILES = ("sonnet-model.pt", "*-model.pt", "model.pt")
ContinueFn = Callable[[str, str, GenerationConfig], str]


def generation_config(strategy: str, **settings: float) -> GenerationConfig:
    """The ``GenerationConfig`` a strategy and the page's sliders stand for: the strategy's own settings
    (``STRATEGY_SETTINGS``) and those every strategy reads; the others are left at their defaults."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if strategy == "contrastive" and settings.get("top_k", 0) < 2:
        raise ValueError("contrastive search needs top_k >= 2 (its candidates per step)")
    kept = {name: int(v) if name in INTS else round(float(v), 6) for name, v in settings.items()
            if name in ALWAYS or name in STRATEGY_SETTINGS[strategy]}
    return GenerationConfig(**kept, do_sample=strategy in ("sample", "top-p"))


def generate_flags(config: GenerationConfig) -> list[str]:
    """``generate.py``'s flags for ``config``: those whose value differs from the command's default."""
    defaults = GenerationConfig(max_new_tokens=64)
    flags = []
    for f in fields(GenerationConfig):
        value = getattr(config, f.name)
        if f.name in ("eos_token_id", "pad_token_id", "stop", "use_cache") or value == getattr(defaults, f.name):
            continue
        flags += [f"--{f.name}"] if value is True else [f"--{f.name}", str(value)]
    return flags


def generate_command(model: str, prompt: str, config: GenerationConfig) -> str:
    """The ``generate.py`` command that prints what the page shows."""
    return shlex.join(["python", "generate.py", "--model", model, "--prompt", prompt,
                       *generate_flags(config), "--num_lines", str(TARGET_LINES)])


def sonnet_models(root: str | Path) -> list[Path]:
    """The sonnet runs' model files under ``root`` (``runs/sonnet``), newest first; each once (not again
    through ``latest``)."""
    found = [p for p in Path(root).glob("*/*/sonnet-model.pt") if p.parent.name != LATEST]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def model_file(spec: str | Path) -> Path:
    """The model ``spec`` names: a model file or Trainer checkpoint as it is, a run folder (or its
    ``latest``) by its model file, a Hugging Face folder (``config.json``) as it is."""
    path = resolve_latest(spec)
    if path.is_dir() and not (path / "config.json").is_file():
        found = [f for pattern in MODEL_FILES for f in sorted(path.glob(pattern))]
        if not found:
            raise InputError(f"{spec}: a folder without a model file ({', '.join(MODEL_FILES)}) or config.json; "
                             "name a sonnet run folder or its sonnet-model.pt")
        path = found[0]
    if not path.exists():
        raise InputError(f"{spec}: no such model file or run folder")
    return path


def form_markdown(text: str, prompt: str) -> str:
    """The sonnet's form as the page shows it: lines, syllables of each generated line, rhymes found."""
    given = min(len([ln for ln in prompt.splitlines() if ln.strip()]), TARGET_LINES - 1)
    form = sonnet_form(text, prompt_lines=given)
    rhymed = f"{sum(form.rhyme_pairs)} of {len(form.rhyme_pairs)}" if form.rhyme_pairs else "none to check"
    return (f"**lines** {form.num_lines} of {TARGET_LINES} · **syllables** per generated line "
            f"{', '.join(map(str, form.syllables)) or '-'} (mean {form.mean_syllables:.1f}, aim 10) · "
            f"**rhyme pairs** (ABAB CDCD EFEF GG) {rhymed}")


def build_page(models: Sequence[str], continue_sonnet: ContinueFn, prompt: str = SONNET_18) -> gr.Blocks:
    """The page: the model picker (``models``, first selected; another path may be typed), the prompt, the
    strategy with its settings (only the chosen strategy's shown), and the sonnet, its form and its
    ``generate.py`` command."""
    with gr.Blocks(title="Sonnet demo", analytics_enabled=False) as page:
        gr.Markdown("## Sonnets from a GPT-2\nType the opening lines, pick how to decode, and generate.")
        with gr.Row():
            with gr.Column():
                model = gr.Dropdown(list(models), value=models[0] if models else None, allow_custom_value=True,
                                    label="model (a sonnet run folder or model file)", elem_id="model")
                text = gr.Textbox(prompt, lines=4, label="opening lines", elem_id="prompt")
                strategy = gr.Radio(list(STRATEGIES), value="greedy", label="decoding", elem_id="strategy")
                sliders = {name: gr.Slider(low, high, value=default, step=step, label=name, elem_id=name,
                                           visible=name in ALWAYS)
                           for name, low, high, step, default in SLIDERS}
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                sonnet = gr.Textbox(lines=16, label="sonnet", elem_id="sonnet", interactive=False)
                form = gr.Markdown(elem_id="form")
                command = gr.Textbox(label="the same with generate.py", elem_id="command", interactive=False)

        def show(chosen: str) -> list:
            return [gr.update(visible=name in ALWAYS or name in STRATEGY_SETTINGS[chosen]) for name in sliders]

        def run(spec: str, opening: str, chosen: str, *values: float) -> tuple[str, str, str]:
            try:
                config = generation_config(chosen, **dict(zip(sliders, values)))
                out = continue_sonnet(spec, opening, config)
            except (ValueError, InputError) as e:
                raise gr.Error(str(e)) from None
            return out, form_markdown(out, opening), generate_command(spec, opening, config)

        strategy.change(show, strategy, list(sliders.values()))
        button.click(run, [model, text, strategy, *sliders.values()], [sonnet, form, command])
    return page


__all__ = ["SONNET_18", "STRATEGIES", "build_page", "form_markdown", "generate_command", "generation_config",
           "model_file", "sonnet_models"]
