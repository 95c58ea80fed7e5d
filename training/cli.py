"""The one place for command-line flags every task shares, and the helpers that act on them.

Each task CLI calls ``add_common_args(parser, ...)`` with its own defaults, adds only
its task flags (file paths, fine-tune mode...), then uses ``seed_everything``,
``pick_device``, ``build_from_args`` and ``train_config_from_args`` -- so no argument or
seeding code is copied between ``classifier.py``, ``paraphrase_detection.py`` and
``sonnet_generation.py``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from training.rng import seed_everything
from training.schedule import SCHEDULES
from training.trainer import TrainConfig

LORA_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")

__all__ = [
    "LORA_TARGETS", "add_common_args", "build_from_args", "default_output_dir", "lora_kwargs", "lora_targets",
    "pick_device", "run_main", "seed_everything", "train_config_from_args",
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
    ``lr=None`` lets the task choose a default later (e.g. by fine-tuning mode)."""
    g = parser.add_argument_group("course starter")
    g.add_argument("--seed", type=int, default=seed)
    g.add_argument("--epochs", type=int, default=epochs)
    g.add_argument("--use_gpu", action="store_true", help="train on CUDA (error if there is none)")
    g.add_argument("--batch_size", type=int, default=batch_size)
    g.add_argument("--lr", type=float, default=lr, help="learning rate" + ("" if lr is not None else
                                                                          " (default depends on the mode)"))
    g.add_argument("--hidden_dropout_prob", type=float, default=hidden_dropout_prob)
    g.add_argument("--model_size", type=str, default=model_size,
                   help="gpt2, gpt2-medium, gpt2-large, gpt2-xl, tiny, or a local Hugging Face folder")

    g = parser.add_argument_group("model and data")
    g.add_argument("--random_init", action="store_true", help="random weights instead of pretrained ones")
    g.add_argument("--tokenizer", type=str, default=None, help="GPT-2 tokenizer folder (vocab.json + merges.txt)")
    g.add_argument("--limit", type=int, default=0, help="use only the first N examples of each split (quick runs)")
    g.add_argument("--max_length", type=int, default=0, help="truncate inputs to this many tokens (0: the context)")
    g.add_argument("--device", type=str, default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, mps")
    g.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes")

    g = parser.add_argument_group("training engine")
    g.add_argument("--grad_accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--scheduler", choices=SCHEDULES, default=scheduler)
    g.add_argument("--warmup_ratio", type=float, default=warmup_ratio, help="fraction of steps of linear warm-up")
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm (0: off)")
    g.add_argument("--patience", type=int, default=patience, help="early-stopping patience in epochs (0: off)")
    g.add_argument("--save_top_k", type=int, default=1, help="best checkpoints kept")
    g.add_argument("--save_every_steps", type=int, default=0, help="also checkpoint every N steps (resume)")
    g.add_argument("--output_dir", type=str, default=None, help="run folder (default runs/<task>/...)")
    g.add_argument("--resume", action="store_true", help="continue from <output_dir>/last.pt")
    g.add_argument("--no_progress", action="store_true", help="no tqdm bars (logs only)")
    g.add_argument("--no_bf16", action="store_true", help="no bf16 autocast on CUDA")

    g = parser.add_argument_group("speed")
    g.add_argument("--group_by_length", action="store_true",
                   help="shuffle, then batch examples of similar length together (less padding)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the GPT-2 body (falls back to eager with a warning where it fails)")
    g.add_argument("--gradient_checkpointing", action="store_true",
                   help="recompute each block's activations in the backward pass (less memory, ~30%% slower)")

    g = parser.add_argument_group("LoRA")
    g.add_argument("--lora_r", type=int, default=8)
    g.add_argument("--lora_alpha", type=float, default=16.0)
    g.add_argument("--lora_dropout", type=float, default=0.05)
    g.add_argument("--lora_targets", type=str, default=",".join(LORA_TARGETS),
                   help="comma-separated Linear name suffixes to adapt")
    g.add_argument("--use_dora", action="store_true",
                   help="DoRA: adapters that also learn a magnitude per output row (Liu et al. 2024)")
    return parser


def pick_device(use_gpu: bool = False, device: str = "auto") -> torch.device:
    """``--use_gpu`` demands CUDA (the starter's flag); otherwise ``--device``, where ``auto``
    takes CUDA, then Apple's MPS, then the CPU -- with one line on what the CPU costs."""
    import sys

    from training.device import best_device, cpu_hint

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


def lora_targets(args: argparse.Namespace) -> tuple[str, ...]:
    return tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())


def lora_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The LoRA keywords of ``models.heads.set_fine_tune_mode`` from the LoRA flags, so every
    task script (and a teacher rebuilt from saved args, which may predate ``--use_dora``)
    passes the same ones."""
    return {"lora_r": args.lora_r, "lora_alpha": args.lora_alpha, "lora_dropout": args.lora_dropout,
            "lora_targets": lora_targets(args), "use_dora": getattr(args, "use_dora", False)}


def build_from_args(args: argparse.Namespace, **config_overrides: Any):
    """(GPT2Model, tokenizer) from ``--model_size``, ``--random_init`` and ``--tokenizer``, with
    ``--gradient_checkpointing`` and ``--compile`` applied when the parser has them.
    ``config_overrides`` (e.g. ``hidden_dropout_prob=...``) change the body's config; the course
    classifier keeps GPT-2's own dropout in the body and uses ``--hidden_dropout_prob`` in its head."""
    from models.gpt2 import maybe_compile
    from models.loading import build_model, load_tokenizer

    if getattr(args, "gradient_checkpointing", False):
        config_overrides.setdefault("gradient_checkpointing", True)
    model = build_model(args.model_size, args.random_init, **config_overrides)  # run_main reports its errors
    maybe_compile(model, getattr(args, "compile", False))
    tokenizer = load_tokenizer(args.tokenizer)
    return model, tokenizer


def run_main(main: Callable[[], Any]) -> None:
    """Run a task's ``main()`` as a command: bad input (a malformed or missing file, weights
    that do not fit) ends in one ``error: file:line: problem`` line and exit status 2, not
    a traceback. Called from each script's ``if __name__ == "__main__"`` block only, so
    tests and callers of ``main`` still get the exception."""
    import sys

    from models.loading import CheckpointError
    from training.data import DataFormatError

    try:
        main()
    except (CheckpointError, DataFormatError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def default_output_dir(task: str, *parts: str) -> str:
    """``runs/<task>/<part>/...``: run folders stay out of the repository root (runs/ is gitignored)."""
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
    )
    values.update(fields)
    return TrainConfig(**values)
