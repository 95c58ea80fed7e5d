"""Flag checks that run while the command line is parsed, so a bad value stops the run at once.

A flag such as ``--batch_size 0`` or ``--top_p 1.5`` used to surface as a traceback deep in the
DataLoader, or worse only at the first dev evaluation after a whole epoch (``--temperature 0``),
or never (``--num_beams 0`` decoded greedily). Each numeric flag therefore gets an argparse
``type`` from here that states its range; argparse then reports a bad value as one
``error: argument --flag: ...`` line with exit status 2, before any model or file is touched.

- ``int_in(low, high)`` / ``float_in(low, high, low_open=..., high_open=...)`` build such types;
  the common ones are named (``positive_int``, ``non_negative_int``, ``positive_float``,
  ``probability``, ``unit_fraction``...).
- ``model_size_or_folder`` (``--model_size``) accepts a named size (``config.SIZES``) or an
  existing local folder, and names the choices otherwise (``--model_size huge --random_init``
  was a traceback).
- ``check_decoding`` is the post-parse check of decoding flags that are fine alone but not together;
  ``check_objectives`` refuses a training objective the distribution asked for cannot run (SMART
  under ``--fsdp``).
- ``name_list`` refuses an empty comma-separated list (``--lora_targets ""`` adapted nothing).
- ``report_to`` (``--report_to``) names a tracker whose package is installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
from collections.abc import Callable
from pathlib import Path

from config import SIZES
from engine.tracking import INSTALL_HINT, REPORT_TO
from errors import InputError

ArgType = Callable[[str], object]


def _range_text(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    return " and ".join(parts)


def int_in(low: int | None = None, high: int | None = None) -> ArgType:
    """An argparse ``type``: an integer in [low, high] (either bound may be None)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be an integer {_range_text(low, high, False, False)}, got {value}")
        return value

    parse.__name__ = "int"  # what argparse names the type in its own messages
    return parse


def float_in(low: float | None = None, high: float | None = None, *, low_open: bool = False,
             high_open: bool = False) -> ArgType:
    """An argparse ``type``: a finite number in the range (open at a bound when asked)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        bad = not math.isfinite(value)
        bad = bad or (low is not None and (value <= low if low_open else value < low))
        bad = bad or (high is not None and (value >= high if high_open else value > high))
        if bad:
            raise argparse.ArgumentTypeError(
                f"must be a number {_range_text(low, high, low_open, high_open)}, got {text}")
        return value

    parse.__name__ = "float"
    return parse


positive_int = int_in(1)  # batch sizes, accumulation, beams, candidates, token counts
non_negative_int = int_in(0)  # --limit, --max_length, patience: 0 means "off" or "all"
positive_float = float_in(0.0, low_open=True)  # learning rates, temperatures, penalties
non_negative_float = float_in(0.0)  # weight decay, clipping norm (0: off)
probability = float_in(0.0, 1.0, low_open=True)  # --top_p: a nucleus of mass 0 keeps nothing
unit_interval = float_in(0.0, 1.0)  # thresholds, mixing weights (alpha), ROUGE bounds
unit_fraction = float_in(0.0, 1.0, high_open=True)  # dropout, warm-up and held-out fractions


def model_size_or_folder(text: str) -> str:
    """``--model_size``: a named size, a local Hugging Face folder, or a model file a run saved
    (``pretrain.py``'s ``model.pt``, a task's ``*-model.pt``)."""
    if text in SIZES or Path(text).is_dir() or Path(text).is_file():
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is neither a model size ({', '.join(SIZES)}), an existing local "
                                     "folder nor a saved model file")


MAX_SEED = 2**32 - 1  # numpy's seeds stop here


def seed_int(text: str) -> int:
    """``--seed``: an integer numpy, torch and python can all be seeded with, so a bad one is a
    parse error rather than a traceback after the run folder is made."""
    value = int_in()(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to {MAX_SEED} (2**32 - 1), got {value}")
    return value


def name_list(text: str) -> str:
    """A comma-separated list with at least one name (``--lora_targets``); kept as the string."""
    if not any(t.strip() for t in text.split(",")):
        raise argparse.ArgumentTypeError("give at least one name (comma-separated), e.g. attn.c_attn")
    return text


def report_to(text: str) -> str:
    """``--report_to``: one of ``engine.tracking.REPORT_TO`` whose package is installed."""
    if text not in REPORT_TO:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(REPORT_TO)}, got {text!r}")
    module = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(text)
    if module is not None and importlib.util.find_spec(module) is None:
        raise argparse.ArgumentTypeError(f"{text} is not installed; {INSTALL_HINT[text]}, or use --report_to none")
    return text


def check_decoding(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Post-parse: a ``--decoding`` whose settings would make ``generate`` fall back to another
    strategy (contrastive search needs ``--penalty_alpha`` > 0 and ``--top_k`` >= 2, otherwise it
    decodes greedily while the log says contrastive) is a parser error (exit status 2)."""
    if getattr(args, "decoding", None) == "contrastive":
        if args.penalty_alpha <= 0 or (args.top_k is not None and args.top_k < 2):
            parser.error(f"--decoding contrastive needs --penalty_alpha > 0 and --top_k >= 2 (got "
                         f"{args.penalty_alpha} and {args.top_k}); with these it would decode greedily")


def check_objectives(args: argparse.Namespace) -> None:
    """Post-parse, before any model work: SMART under ``--fsdp`` is refused (``InputError``, which a
    command prints as one ``error:`` line with exit status 2). Its gradient ascent calls
    ``torch.autograd.grad`` inside FSDP2's root forward, which fires FSDP's backward hooks and
    reshards, so the next forward mixes tensors and DTensors; its momentum teacher swaps ``.data``
    of parameters FSDP2 has unsharded, and the worker dies (SIGSEGV). Under DDP it runs."""
    smart = getattr(args, "smart_weight", 0) > 0 or getattr(args, "smart_proximal_weight", 0) > 0
    if smart and getattr(args, "fsdp", False):
        raise InputError("SMART (--smart_weight, --smart_proximal_weight) cannot train under --fsdp (FSDP2 shards "
                         "what its adversarial step and momentum teacher use); drop --fsdp to train it under DDP")


__all__ = [
    "check_decoding", "check_objectives", "float_in", "int_in", "model_size_or_folder", "name_list",
    "non_negative_float", "non_negative_int", "positive_float", "positive_int", "probability", "report_to",
    "seed_int", "unit_fraction", "unit_interval",
]
