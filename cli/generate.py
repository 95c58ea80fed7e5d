"""The command line of ``generate.py`` and its reading into ``GenerateSettings``: every
``GenerationConfig`` setting is a flag of the same name, checked by ``GenerationConfig`` itself
while the command line is parsed (a bad value or combination is one error line, exit status 2,
before the model loads), as are the candidate pool, the prompts and the output file."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from cli.decoding import add_inference_args
from cli.defaults import RawTextDefaultsHelpFormatter
from cli.validation import seed_int
from decoding.gptq import CALIBRATION_TEXT
from decoding.mbr import CandidatePool
from models.generation_config import GenerationConfig

# GenerationConfig fields that are flags of the same name: (field, argparse type or "flag")
SETTINGS: tuple[tuple[str, Any], ...] = (
    ("max_new_tokens", int), ("do_sample", "flag"), ("temperature", float), ("top_k", int), ("top_p", float),
    ("num_beams", int), ("num_return_sequences", int), ("length_penalty", float), ("no_repeat_ngram_size", int),
    ("penalty_alpha", float), ("contrastive_mean_sim", "flag"), ("contrastive_dynamic_alpha", "flag"),
    ("contrastive_alpha_sensitivity", float), ("contrastive_alpha_min", float), ("repetition_penalty", float),
)
EARLY_STOPPING = {"false": False, "true": True, "never": "never"}


@dataclass(frozen=True)
class GenerateSettings:
    """A ``generate.py`` run: the ``model`` to load, the ``prompts``, how they are decoded
    (``generation``; EOS unless not ``stop_at_eos``, ``num_lines`` lines at most if > 0, the MBR
    choice among ``pool``'s candidates if given), ``batch_size`` prompts at a time from a generator
    seeded with ``seed``, on ``device`` with ``quantize``'s weights (GPTQ's calibrated on the
    ``calibration`` text), through a compiled step if ``compile_decode``; the completions go to
    ``output`` (None: stdout)."""

    model: str
    prompts: tuple[str, ...]
    generation: GenerationConfig
    pool: CandidatePool | None = None
    stop_at_eos: bool = True
    num_lines: int = 0
    output: str | None = None
    tokenizer: str | None = None
    batch_size: int = 8
    seed: int = 11711
    device: str = "auto"
    quantize: str = "none"
    calibration: str = CALIBRATION_TEXT
    compile_decode: bool = False
    draft_model: str | None = None  # speculative decoding: this model proposes draft_k tokens per target forward
    draft_k: int = 4
    progress: bool = True  # a bar over the prompts on stderr, when they take more than one batch


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """``generate.py``'s flags."""
    p = argparse.ArgumentParser(description=description, formatter_class=RawTextDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="saved model (.pt), Trainer checkpoint, or Hugging Face folder/id")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat the flag for several)")
    p.add_argument("--prompts_file", type=str, default=None, help="one prompt per line (\\n for a newline)")
    p.add_argument("--output", type=str, default=None, help="write here instead of stdout (.jsonl: JSON lines)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--tokenizer", type=str, default=None, help="GPT-2 tokenizer folder (vocab.json + merges.txt)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--seed", type=seed_int, default=11711, help="seeds sampling")
    p.add_argument("--device", type=str, default="auto")
    p.add_argument("--no_progress", action="store_true",
                   help="no progress bar over the prompts (shown on stderr when they take more than one batch)")
    add_inference_args(p)  # --quantize
    g = p.add_argument_group("decoding (GenerationConfig's settings and meanings)")
    defaults = GenerationConfig(max_new_tokens=64)
    for name, kind in SETTINGS:
        if kind == "flag":
            g.add_argument(f"--{name}", action="store_true")
        else:
            g.add_argument(f"--{name}", type=kind, default=getattr(defaults, name))
    g.add_argument("--early_stopping", choices=sorted(EARLY_STOPPING), default="false", help="beam search")
    g.add_argument("--no_eos", action="store_true", help="do not stop at the end-of-text token")
    g.add_argument("--num_lines", type=int, default=0, help="stop a row after this many lines (0: off; sonnets: 14)")
    g.add_argument("--no_cache", action="store_true", help="recompute every position (slow; for checks)")
    g.add_argument("--mbr_pool", type=str, default=None,
                   help="MBR over a candidate pool, e.g. beam:4,sample:8,contrastive:1 (chrF consensus)")
    g.add_argument("--draft_model", type=str, default=None,
                   help="speculative decoding (greedy or sampling, one prompt at a time): this smaller model, "
                        "with the same tokenizer, proposes tokens that --model verifies; same output distribution")
    g.add_argument("--draft_k", type=int, default=4, help="tokens the draft model proposes per --model forward")
    return p


def parse_settings(argv: list[str] | None = None, description: str | None = None) -> GenerateSettings:
    """Parse and check everything that needs no model: the decoding settings (through
    ``GenerationConfig``), the pool, the prompts and the output file."""
    parser = build_parser(description)
    args = parser.parse_args(argv)
    settings = {name: getattr(args, name) for name, _ in SETTINGS}
    try:
        generation = GenerationConfig(**settings, early_stopping=EARLY_STOPPING[args.early_stopping],
                                      use_cache=not args.no_cache)
        pool = CandidatePool.parse(args.mbr_pool) if args.mbr_pool is not None else None
    except ValueError as e:
        parser.error(f"--{e}" if str(e).split()[0] in settings else str(e))
    if args.batch_size < 1 or args.num_lines < 0:
        parser.error("--batch_size must be >= 1 and --num_lines >= 0")
    if pool is not None and args.num_return_sequences != 1:
        parser.error("--mbr_pool returns one completion per prompt; drop --num_return_sequences")
    if args.draft_k < 1:
        parser.error("--draft_k must be >= 1")
    if args.draft_model is not None and (generation.strategy not in ("greedy", "sample") or pool is not None
                                         or args.num_return_sequences != 1 or args.no_cache or args.compile_decode):
        parser.error("--draft_model runs greedy decoding or sampling of one completion per prompt, with the "
                     "dynamic cache; drop --num_beams, --penalty_alpha, --mbr_pool, --num_return_sequences, "
                     "--no_cache and --compile_decode")
    prompts = list(args.prompt)
    if args.prompts_file is not None:
        path = Path(args.prompts_file)
        if not path.is_file():
            parser.error(f"--prompts_file {path} does not exist")
        prompts += [line.replace("\\n", "\n") for line in path.read_text(encoding="utf-8").splitlines() if line]
    if not prompts:
        parser.error("give at least one --prompt or a --prompts_file")
    for flag, model in (("--model", args.model), ("--draft_model", args.draft_model)):
        if model is not None and not Path(model).exists() and (model.endswith((".pt", ".bin")) or model.count("/") > 1):
            parser.error(f"{flag} {model} does not exist (a saved model, checkpoint, Hugging Face folder or hub id)")
    if args.output is not None and Path(args.output).is_dir():
        parser.error(f"--output {args.output} is a directory; name a file, e.g. {Path(args.output) / 'out.jsonl'}")
    if args.output is not None and Path(args.output).exists() and not args.overwrite:
        parser.error(f"--output {args.output} exists; pass --overwrite to replace it")
    return GenerateSettings(model=args.model, prompts=tuple(prompts), generation=generation, pool=pool,
                            stop_at_eos=not args.no_eos, num_lines=args.num_lines, output=args.output,
                            tokenizer=args.tokenizer, batch_size=args.batch_size, seed=args.seed, device=args.device,
                            quantize=args.quantize, calibration=args.calibration,
                            compile_decode=args.compile_decode, draft_model=args.draft_model, draft_k=args.draft_k,
                            progress=not args.no_progress)


# the GenerateSettings fields that are not a flag of the same name; every other field is one
SPECIAL_FIELDS = ("model", "prompts", "generation", "pool", "stop_at_eos", "progress")


def command_line(settings: GenerateSettings) -> list[str]:
    """The ``generate.py`` arguments that ``parse_settings`` reads back into ``settings``: the model, the
    prompts, and every setting whose value differs from its flag's default (from ``SETTINGS`` and the
    parser itself, so a new flag cannot be left out). What prints a completion shown elsewhere (the demo)."""
    defaults = build_parser().parse_args(["--model", "m", "--prompt", "p"])
    g = settings.generation
    # "--flag=value": a prompt (or model) that begins with "-" would read back as a flag of its own
    argv = [f"--model={settings.model}", *(f"--prompt={p}" for p in settings.prompts)]
    for name, kind in SETTINGS:
        value = getattr(g, name)
        if value != getattr(defaults, name):
            argv += [f"--{name}"] if kind == "flag" else [f"--{name}", str(value)]
    flags = {"early_stopping": {v: k for k, v in EARLY_STOPPING.items()}[g.early_stopping], "no_cache": not g.use_cache,
             "mbr_pool": None if settings.pool is None else str(settings.pool), "no_eos": not settings.stop_at_eos,
             "no_progress": not settings.progress,
             **{f.name: getattr(settings, f.name) for f in fields(GenerateSettings) if f.name not in SPECIAL_FIELDS}}
    for name, value in flags.items():
        if value != getattr(defaults, name):
            argv += [f"--{name}"] if value is True else [f"--{name}", str(value)]
    return argv


__all__ = ["EARLY_STOPPING", "SETTINGS", "GenerateSettings", "build_parser", "command_line", "parse_settings"]
