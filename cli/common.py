"""The one place for command-line flags every task shares, and the helpers that act on them.

Each task CLI calls ``add_common_args(parser, ...)`` with its own defaults, adds only
its task flags (file paths, fine-tune mode...), then the task (``tasks/``) uses
``seed_everything``, ``pick_device``, ``build_from_args``, ``fine_tune_config`` (the
``methods.fine_tune.FineTuneConfig`` of ``--fine-tune-mode`` and the LoRA flags) and
``train_config_from_args`` -- so no argument or seeding code is copied between
``classifier.py``, ``paraphrase_detection.py`` and ``sonnet_generation.py``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cli.validation import (
    model_size_or_folder,
    name_list,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    unit_fraction,
)
from engine import distributed
from engine.rng import seed_everything
from engine.run_dir import open_run_on_main
from engine.schedule import SCHEDULES
from engine.tracking import report_to
from engine.trainer import TrainConfig
from methods.fine_tune import MODES, FineTuneConfig
from methods.lora import DEFAULT_TARGETS

__all__ = [
    "add_common_args", "build_from_args", "default_output_dir", "fine_tune_config",
    "open_run", "pick_device", "run_main", "seed_everything", "train_config_from_args",
]


def add_common_args(
    parser: argparse.ArgumentParser,
    *,
    batch_size: int = 8,
    lr: float | None = 1e-3,
    epochs: int = 10,
    seed: int = 11711,
    hidden_dropout_prob: float = 0.3,
    model_size: str = "gpt2",
    scheduler: str = "constant",
    warmup_ratio: float = 0.0,
    patience: int = 0,
) -> argparse.ArgumentParser:
    """Add the course starter's flags (same names and defaults) and the engine's.
    ``lr=None`` lets the task choose a default later (e.g. by fine-tuning mode). Every numeric
    flag is range-checked while parsing (``cli.validation``): a bad value is one argparse
    error line and exit status 2, before any work."""
    g = parser.add_argument_group("course starter")
    g.add_argument("--seed", type=int, default=seed)
    g.add_argument("--epochs", type=non_negative_int, default=epochs)
    g.add_argument("--use_gpu", action="store_true", help="train on CUDA (error if there is none)")
    g.add_argument("--batch_size", type=positive_int, default=batch_size)
    g.add_argument("--lr", type=positive_float, default=lr, help="learning rate" + ("" if lr is not None else
                                                                          " (default depends on the mode)"))
    g.add_argument("--hidden_dropout_prob", type=unit_fraction, default=hidden_dropout_prob)
    g.add_argument("--model_size", type=model_size_or_folder, default=model_size,
                   help="gpt2, gpt2-medium, gpt2-large, gpt2-xl, tiny, a local Hugging Face folder, or a model "
                        "file a run saved (pretrain.py's model.pt, a task's *-model.pt)")

    g = parser.add_argument_group("model and data")
    g.add_argument("--random_init", action="store_true", help="random weights instead of pretrained ones")
    g.add_argument("--tokenizer", type=str, default=None, help="GPT-2 tokenizer folder (vocab.json + merges.txt)")
    g.add_argument("--limit", type=non_negative_int, default=0,
                   help="use only the first N examples of each split (quick runs)")
    g.add_argument("--max_length", type=non_negative_int, default=0,
                   help="truncate inputs to this many tokens (0: the context)")
    g.add_argument("--device", type=str, default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, mps")
    g.add_argument("--num_workers", type=non_negative_int, default=0, help="DataLoader worker processes")

    g = parser.add_argument_group("training engine")
    g.add_argument("--grad_accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--scheduler", choices=SCHEDULES, default=scheduler)
    g.add_argument("--warmup_ratio", type=unit_fraction, default=warmup_ratio,
                   help="fraction of steps of linear warm-up")
    g.add_argument("--weight_decay", type=non_negative_float, default=0.0)
    g.add_argument("--max_grad_norm", type=non_negative_float, default=1.0, help="gradient clipping norm (0: off)")
    g.add_argument("--patience", type=non_negative_int, default=patience,
                   help="early-stopping patience in epochs (0: off)")
    g.add_argument("--save_top_k", type=non_negative_int, default=1, help="best checkpoints kept")
    g.add_argument("--save_every_steps", type=non_negative_int, default=0,
                   help="also checkpoint every N steps (resume)")
    g.add_argument("--output_dir", type=str, default=None, help="run folder (default: a new one in runs/<task>/...)")
    g.add_argument("--resume", action="store_true",
                   help="continue from <output_dir>/last.pt (without --output_dir: the latest run of this task)")
    g.add_argument("--resume_allow_changes", action="store_true",
                   help="resume even if settings that change the result (lr, batch size, limit...) differ")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run an explicit --output_dir holds (else it is refused unless --resume)")
    g.add_argument("--load", type=str, default=None,
                   help="start from a model saved by an earlier run; with --epochs 0 only predict")
    g.add_argument("--no_progress", action="store_true", help="no tqdm bars (logs only)")
    g.add_argument("--no_bf16", action="store_true", help="no bf16 autocast on CUDA")
    g.add_argument("--report_to", type=report_to, default="none",
                   help="also log to none, tensorboard (event files in the run folder) or wandb (offline "
                        "without network; needs pip install wandb)")

    g = parser.add_argument_group("speed")
    g.add_argument("--group_by_length", action="store_true",
                   help="shuffle, then batch examples of similar length together (less padding)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the GPT-2 body (falls back to eager with a warning where it fails)")
    g.add_argument("--gradient_checkpointing", action="store_true",
                   help="recompute each block's activations in the backward pass (less memory, ~30%% slower)")
    g.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard weights, gradients and optimizer state over the ranks (FSDP2) "
                        "instead of replicating the model (DDP); for full fine-tuning of gpt2-large/-xl")

    g = parser.add_argument_group("LoRA")
    g.add_argument("--lora_r", type=positive_int, default=8)
    g.add_argument("--lora_alpha", type=positive_float, default=16.0)
    g.add_argument("--lora_dropout", type=unit_fraction, default=0.05)
    g.add_argument("--lora_targets", type=name_list, default=",".join(DEFAULT_TARGETS),
                   help="comma-separated Linear name suffixes to adapt")
    g.add_argument("--use_dora", action="store_true",
                   help="DoRA: adapters that also learn a magnitude per output row (Liu et al. 2024)")
    g = parser.add_argument_group("prefix tuning")
    g.add_argument("--prefix_length", type=positive_int, default=10, help="prefix positions per layer")
    g.add_argument("--prefix_hidden", type=positive_int, default=512, help="hidden width of the prefix MLP")
    return parser


def pick_device(use_gpu: bool = False, device: str = "auto") -> torch.device:
    """``--use_gpu`` demands CUDA (the starter's flag); otherwise ``--device``, where ``auto``
    takes CUDA, then Apple's MPS, then the CPU -- with one line on what the CPU costs."""
    import sys

    from engine.device import best_device, cpu_hint

    if use_gpu:
        if not torch.cuda.is_available():
            raise SystemExit("--use_gpu was given but CUDA is not available; drop the flag to run on the CPU")
        return torch.device("cuda")
    if device == "auto":
        dev = best_device()
        if dev.type == "cpu":
            print(cpu_hint(), file=sys.stderr)
        return dev
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {device} was given but CUDA is not available")
    return dev


def fine_tune_config(args: argparse.Namespace) -> FineTuneConfig:
    """``--fine-tune-mode`` and its adapter settings from the flags the registry names for it
    (``--lora_r`` ... for lora), so every task script (and a KD teacher rebuilt from saved args,
    which may predate ``--use_dora``: a missing flag keeps the adapter's default) builds the
    same ``FineTuneConfig``."""
    mode = MODES[args.fine_tune_mode]
    if mode.adapter is None:
        return FineTuneConfig(mode.name)
    settings = {f: getattr(args, flag) for f, flag in mode.flags.items() if hasattr(args, flag)}
    return FineTuneConfig(mode.name, mode.adapter(**settings))


def build_from_args(args: argparse.Namespace, **config_overrides: Any):
    """(GPT2Model, tokenizer) from ``--model_size`` (a size, a Hugging Face folder or a model file a
    run saved), ``--random_init`` and ``--tokenizer``, with
    ``--gradient_checkpointing`` and ``--compile`` applied when the parser has them.
    ``config_overrides`` (e.g. ``hidden_dropout_prob=...``) change the body's config; the course
    classifier keeps GPT-2's own dropout in the body and uses ``--hidden_dropout_prob`` in its head."""
    from models.gpt2 import build_model, maybe_compile
    from models.loading import load_tokenizer

    if getattr(args, "gradient_checkpointing", False):
        config_overrides.setdefault("gradient_checkpointing", True)
    if Path(args.model_size).is_file():  # a model an earlier run saved (pretrain.py's model.pt)
        from engine.checkpoints import load_model

        model = load_model(args.model_size, random_init=args.random_init, **config_overrides)
    else:
        model = build_model(args.model_size, args.random_init, **config_overrides)  # run_main reports its errors
    maybe_compile(model, getattr(args, "compile", False))
    tokenizer = load_tokenizer(args.tokenizer)
    return model, tokenizer


def open_run(args: argparse.Namespace, default_parent: str | Path, **kw: Any) -> Path | None:
    """``engine.run_dir.open_run`` for a task script, first joining torchrun's process group
    when there is one (``engine.distributed.setup``): rank 0 claims the run folder and the
    other ranks get the same one."""
    if distributed.launched():  # one process: nothing happens before open_run, as always
        distributed.setup(pick_device(args.use_gpu, args.device))
    return open_run_on_main(args, default_parent, **kw)


def run_main(main: Callable[[], Any]) -> None:
    """Run a task's ``main()`` as a command: bad input (a malformed or missing file, weights
    that do not fit) ends in one ``error: file:line: problem`` line and exit status 2, not
    a traceback. Called from each script's ``if __name__ == "__main__"`` block only, so
    tests and callers of ``main`` still get the exception."""
    import sys

    from engine import distributed
    from engine.data import DataFormatError
    from engine.run_dir import RunDirError
    from models.loading import CheckpointError

    try:
        main()
    except (CheckpointError, DataFormatError, FileNotFoundError, RunDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    # Under torchrun, leave the process group together: exiting while Gloo's threads still run
    # can abort the process after a successful run.
    distributed.barrier()
    distributed.teardown()


def default_output_dir(task: str, *parts: str) -> str:
    """``runs/<task>/<part>/...``: run folders stay out of the repository root (runs/ is gitignored).
    It is the parent of a task's default run folders: ``open_run`` makes a new timestamped
    one in it for each run, so reruns never collide."""
    return str(Path("runs", task, *parts))


def train_config_from_args(args: argparse.Namespace, device: torch.device, **fields: Any) -> TrainConfig:
    """A TrainConfig from the shared flags; ``fields`` (metric, output_dir, lr...) take precedence."""
    values: dict[str, Any] = dict(
        epochs=args.epochs,
        lr=args.lr,
        weight_decay=args.weight_decay,
        grad_accum=args.grad_accum,
        max_grad_norm=args.max_grad_norm,
        scheduler=args.scheduler,
        warmup_ratio=args.warmup_ratio,
        patience=args.patience,
        save_top_k=args.save_top_k,
        save_every_steps=args.save_every_steps,
        output_dir=args.output_dir or "runs/default",
        seed=args.seed,
        device=str(device),
        bf16=not args.no_bf16,
        progress=not args.no_progress,
        resume=args.resume,
        overwrite=getattr(args, "overwrite", False),
        resume_allow_changes=getattr(args, "resume_allow_changes", False),
        report_to=getattr(args, "report_to", "none"),
        fsdp=getattr(args, "fsdp", False),
    )
    values.update(fields)
    return TrainConfig(**values)
