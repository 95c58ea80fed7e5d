"""The sonnet demo's page (``demo.py``): pick a sonnet model, type the opening lines, pick a decoding
strategy and its settings, and watch the continuation appear, with its form (lines, syllables, rhyme)
beside it once it is done.

The page knows no model: ``demo.py`` hands it a ``Sonnets`` (``generate.py``'s own code path, streamed,
and the ``generate.py`` command of a request), so the page shows what ``generate.py`` prints for the same
settings (the page writes that command under the sonnet; ``tests/test_demo_browser.py`` checks the two
agree). The controls are ``GenerationConfig``'s fields under ``generate.py``'s flag names, MBR's candidate
pool (``--mbr_pool``, chrF consensus: the utility ``generate.py`` offers), ``--quantize``, and a run that
stops after 14 lines (``--num_lines 14``) as a sonnet does. Gradio serves it, bound to localhost by default.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Protocol

import gradio as gr

from decoding.mbr import CandidatePool
from decoding.quant import QUANTIZE_CHOICES
from engine.run_dir import LATEST
from engine.run_paths import resolve_latest
from errors import InputError
from models.generation_config import GenerationConfig
from tasks.export import checkpoint_in
from tasks.sonnet_form import TARGET_LINES, sonnet_form

STRATEGIES = ("greedy", "sample", "top-p", "beam", "contrastive", "mbr")
# The settings each strategy reads, besides max_new_tokens, no_repeat_ngram_size and repetition_penalty
# (MBR: its samples' temperature and top_p; its beam and contrastive members use generate.py's defaults).
STRATEGY_SETTINGS = {"greedy": (), "sample": ("temperature", "top_k"), "top-p": ("temperature", "top_p"),
                     "beam": ("num_beams", "length_penalty"), "contrastive": ("penalty_alpha", "top_k"),
                     "mbr": ("temperature", "top_p", "mbr_pool")}
# The sliders: (GenerationConfig field, low, high, step, default)
SLIDERS = (("max_new_tokens", 1, 512, 1, 128), ("temperature", 0.05, 2.0, 0.05, 1.0), ("top_k", 0, 100, 1, 4),
           ("top_p", 0.05, 1.0, 0.05, 0.9), ("num_beams", 2, 8, 1, 4), ("length_penalty", 0.0, 2.0, 0.1, 1.0),
           ("penalty_alpha", 0.05, 1.0, 0.05, 0.6), ("no_repeat_ngram_size", 0, 6, 1, 0),
           ("repetition_penalty", 1.0, 2.0, 0.05, 1.0))
ALWAYS = ("max_new_tokens", "no_repeat_ngram_size", "repetition_penalty")
INTS = {f.name for f in fields(GenerationConfig) if f.type == "int"}
MBR_POOL = "sample:8"
SONNET_18 = ("Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:\n"
             "Rough winds do shake the darling buds of May,")


@dataclass(frozen=True)
class SonnetRequest:
    """One sonnet the page asks for: the ``model`` (as typed or picked), the opening lines, the decoding,
    MBR's candidate ``pool`` (None: no MBR) and the weights' ``quantize``."""

    model: str
    prompt: str
    generation: GenerationConfig
    pool: CandidatePool | None = None
    quantize: str = "none"


class Sonnets(Protocol):
    """What makes the page's sonnets (``demo.py``: ``generate.py``'s code path)."""

    def stream(self, request: SonnetRequest) -> Iterator[str]:
        """The sonnet (prompt included) in pieces, as it is decoded: they join to the final text."""

    def command(self, request: SonnetRequest) -> str:
        """The ``generate.py`` command that prints the same sonnet."""


def generation_config(strategy: str, **settings: float) -> GenerationConfig:
    """The ``GenerationConfig`` a strategy and the page's sliders stand for: the strategy's own settings
    (``STRATEGY_SETTINGS``) and those every strategy reads; the others are left at their defaults."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if strategy == "contrastive" and settings.get("top_k", 0) < 2:
        raise ValueError("contrastive search needs top_k >= 2 (its candidates per step)")
    kept = {name: int(v) if name in INTS else round(float(v), 6) for name, v in settings.items()
            if shown(name, strategy)}
    return GenerationConfig(**kept, do_sample=strategy in ("sample", "top-p"))


def sonnet_request(model: str, prompt: str, strategy: str, quantize: str = "none", mbr_pool: str = MBR_POOL,
                   **settings: float) -> SonnetRequest:
    """The page's controls as one request; a bad setting raises ValueError (the page shows it)."""
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}")
    pool = CandidatePool.parse(mbr_pool) if strategy == "mbr" else None
    return SonnetRequest(model, prompt, generation_config(strategy, **settings), pool, quantize)


def sonnet_models(root: str | Path) -> list[Path]:
    """The sonnet runs' model files under ``root`` (``runs/sonnet``), newest first; each once (not again
    through ``latest``)."""
    found = [p for p in Path(root).glob("*/*/sonnet-model.pt") if p.parent.name != LATEST]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def model_file(spec: str | Path) -> Path:
    """The model ``spec`` names: a model file or Trainer checkpoint as it is, a Hugging Face folder
    (``config.json``) as it is, a run folder (or its ``latest``) by the file ``export.py`` reads there."""
    path = resolve_latest(spec)
    if path.is_dir() and not (path / "config.json").is_file():
        return checkpoint_in(path, adapters=False)
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


def shown(name: str, strategy: str) -> bool:
    """Whether the page shows setting ``name`` for ``strategy``."""
    return name in ALWAYS or name in STRATEGY_SETTINGS[strategy]


def build_page(models: Sequence[str], sonnets: Sonnets, prompt: str = SONNET_18) -> gr.Blocks:
    """The page: the model picker (``models``, first selected; another path may be typed), the prompt, the
    strategy with its settings (only the chosen strategy's shown), the weights, and the sonnet (streamed;
    beam search and MBR show it when done), its form and its ``generate.py`` command (when done)."""
    with gr.Blocks(title="Sonnet demo", analytics_enabled=False) as page:
        gr.Markdown("## Sonnets from a GPT-2\nType the opening lines, pick how to decode, and generate.")
        with gr.Row():
            with gr.Column():
                model = gr.Dropdown(list(models), value=models[0] if models else None, allow_custom_value=True,
                                    label="model (a sonnet run folder or model file)", elem_id="model")
                text = gr.Textbox(prompt, lines=4, label="opening lines", elem_id="prompt")
                strategy = gr.Radio(list(STRATEGIES), value="greedy", label="decoding", elem_id="strategy")
                pool = gr.Textbox(MBR_POOL, label="mbr_pool: the candidates (pool size: their sum), chosen by "
                                  "chrF consensus; e.g. beam:4,sample:8,contrastive:1", elem_id="mbr_pool",
                                  visible=False)
                sliders = {name: gr.Slider(low, high, value=default, step=step, label=name, elem_id=name,
                                           visible=name in ALWAYS)
                           for name, low, high, step, default in SLIDERS}
                quantize = gr.Radio(list(QUANTIZE_CHOICES), value="none", label="quantize (the weights)",
                                    elem_id="quantize")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                sonnet = gr.Textbox(lines=16, label="sonnet", elem_id="sonnet", interactive=False)
                form = gr.Markdown(elem_id="form")
                command = gr.Textbox(label="the same with generate.py", elem_id="command", interactive=False)

        def show(chosen: str) -> list:
            return [gr.update(visible=shown(name, chosen)) for name in ("mbr_pool", *sliders)]

        def run(spec: str, opening: str, chosen: str, weights: str, pool_spec: str,
                *values: float) -> Iterator[tuple[str, str, str]]:
            try:
                request = sonnet_request(spec, opening, chosen, weights, pool_spec, **dict(zip(sliders, values)))
                out = ""
                for piece in sonnets.stream(request):
                    out += piece
                    yield out, "", ""
            except (ValueError, InputError) as e:
                raise gr.Error(str(e)) from None
            yield out, form_markdown(out, opening), sonnets.command(request)

        strategy.change(show, strategy, [pool, *sliders.values()])
        button.click(run, [model, text, strategy, quantize, pool, *sliders.values()], [sonnet, form, command])
    return page


__all__ = ["MBR_POOL", "SONNET_18", "STRATEGIES", "STRATEGY_SETTINGS", "SonnetRequest", "Sonnets", "build_page",
           "form_markdown", "generation_config", "model_file", "sonnet_models", "sonnet_request"]
