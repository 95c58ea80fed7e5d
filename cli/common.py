"""The one place for command-line flags every task shares, and the functions that read the parsed
flags into the typed settings a task takes (``tasks.settings``).

Each task CLI calls ``add_common_args(parser, ...)`` with its own defaults, adds only its task
flags (file paths, fine-tune mode...), parses argv once, and turns the Namespace into settings:
``task_settings_from_args`` (all of ``TaskSettings``: ``model_settings_from_args``,
``data_settings_from_args``, ``run_settings_from_args``, ``train_config_from_args``,
``fine_tune_config``), extended by the task's own fields. Below the script nothing sees the
Namespace, so no argument or seeding code is copied between ``classifier.py``,
``paraphrase_detection.py`` and ``sonnet_generation.py``.

The classification tasks (``classifier.py``, ``paraphrase_detection.py``) also share the training
objectives' flags (``add_classification_args``: R-Drop, SimCSE, SMART, ``--pooling``), read into
``methods.objectives.ObjectiveSettings`` by ``objective_settings_from_args``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import torch

from cli.failures import failure_line, nesting
from cli.validation import (
    check_objectives,
    model_size_or_folder,
    name_list,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    report_to,
    seed_int,
    unit_fraction,
)
from engine import ranks, run_dir
from engine.optimizers import OPTIMIZERS
from engine.rng import seed_everything
from engine.train_config import SCHEDULES
from engine.trainer import TrainConfig
from errors import InputError
from methods.fine_tune import (
    DEFAULT_TARGETS,
    QUANTIZE_BASE,
    FineTuneConfig,
    peft_adapter_settings,
    reft_layers,
    reft_positions,
)
from methods.objectives import ObjectiveSettings
from models.heads import POOLINGS
from tasks.common import default_output_dir, pick_device
from tasks.settings import (
    DataSettings,
    ModelSettings,
    RunSettings,
    TaskSettings,
    fine_tune_from_flags,
    from_flags,
)


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
    max_grad_norm: float = 1.0,
    lr_help: str = "default depends on the mode",
) -> argparse.ArgumentParser:
    """Add the course starter's flags (same names and defaults) and the engine's.
    ``lr=None`` lets the task choose a default later (e.g. by fine-tuning mode; ``lr_help`` says
    how); the starter's scripts pass ``max_grad_norm=0`` (the starter never clips). Every numeric
    flag is range-checked while parsing (``cli.validation``): a bad value is one argparse
    error line and exit status 2, before any work."""
    g = parser.add_argument_group("course starter")
    g.add_argument("--seed", type=seed_int, default=seed)
    g.add_argument("--epochs", type=non_negative_int, default=epochs)
    g.add_argument("--use_gpu", action="store_true", help="train on CUDA (error if there is none)")
    g.add_argument("--batch_size", type=positive_int, default=batch_size)
    g.add_argument("--lr", type=positive_float, default=lr, help="learning rate" + ("" if lr is not None else
                                                                          f" ({lr_help})"))
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
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw",
                   help="adamw (the course's), sgd (momentum 0.9), or from pytorch-optimizer soap, shampoo, lion, "
                        "adan; --lr is used as given (sgd and lion usually want another one)")
    g.add_argument("--max_grad_norm", type=non_negative_float, default=max_grad_norm,
                   help="gradient clipping norm (0: off)")
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
    g.add_argument("--quantize_base", choices=QUANTIZE_BASE, default="none",
                   help="QLoRA: keep the frozen base of each adapted layer quantised (int8 per row, int4 per group "
                        "of 64 inputs), dequantised in each pass; the adapters train in float32")
    g.add_argument("--load_adapter", metavar="DIR",
                   help="start from a PEFT LoRA/DoRA adapter folder (adapter_config.json + adapter_model."
                        "safetensors; needs --fine-tune-mode lora): its r, alpha, dropout, targets and DoRA "
                        "replace the flags above")
    g = parser.add_argument_group("prefix tuning")
    g.add_argument("--prefix_length", type=positive_int, default=10, help="prefix positions per layer")
    g.add_argument("--prefix_hidden", type=positive_int, default=512, help="hidden width of the prefix MLP")
    g = parser.add_argument_group("ReFT (LoReFT)")
    g.add_argument("--reft_rank", type=positive_int, default=4, help="rank r of each intervention")
    g.add_argument("--reft_layers", type=reft_layers, default="all", help="edited blocks: all, or indices 0,2")
    g.add_argument("--reft_positions", type=reft_positions, default="f1+l1",
                   help="edited tokens: the first N and/or last N real ones, fN, lN or fN+lN (sonnets: f4)")
    return parser


def model_settings_from_args(args: argparse.Namespace) -> ModelSettings:
    """``--model_size``, ``--random_init``, ``--tokenizer``, ``--hidden_dropout_prob``, ``--compile``,
    ``--gradient_checkpointing``."""
    return from_flags(ModelSettings, vars(args))


def data_settings_from_args(args: argparse.Namespace) -> DataSettings:
    """``--limit``, ``--max_length``, ``--batch_size``, ``--num_workers``, ``--group_by_length``."""
    return from_flags(DataSettings, vars(args))


def run_settings_from_args(args: argparse.Namespace) -> RunSettings:
    """``--use_gpu``, ``--device``, ``--output_dir``, ``--load``."""
    return from_flags(RunSettings, vars(args))


def fine_tune_config(args: argparse.Namespace) -> FineTuneConfig:
    """``--fine-tune-mode`` and its adapter settings from the flags the registry names for it
    (``--lora_r`` ... for lora), so every task script builds the same ``FineTuneConfig``. With
    ``--load_adapter DIR`` the adapter settings are the PEFT folder's, and its weights load into them."""
    folder, quantize = getattr(args, "load_adapter", None), getattr(args, "quantize_base", "none")
    if quantize != "none" and vars(args).get("fine_tune_mode") != "lora":
        raise InputError(f"--quantize_base {quantize} quantises the frozen base under LoRA/DoRA adapters: " + (
            "add --fine-tune-mode lora" if "fine_tune_mode" in vars(args) else "this script trains the full model"))
    if folder is None:
        return fine_tune_from_flags(vars(args))
    if "fine_tune_mode" not in vars(args):
        raise InputError(f"--load_adapter {folder}: this script trains the full model; a LoRA/DoRA adapter loads in "
                         "the task scripts' --fine-tune-mode lora")
    if args.fine_tune_mode != "lora":
        raise InputError(f"--load_adapter {folder} loads a LoRA/DoRA adapter: add --fine-tune-mode lora")
    return peft_adapter_settings(folder, quantize)


def task_settings_from_args(args: argparse.Namespace, cls: type[TaskSettings] = TaskSettings,
                            **fields: Any) -> TaskSettings:
    """Every shared setting of a task from its parsed flags, as ``cls`` (a task's own settings
    class) with its own ``fields`` added. ``flags`` keeps every parsed value, for the checkpoints.
    A script without ``--fine-tune-mode`` (pretraining) trains the full model."""
    adapter = ("fine_tune_mode" in vars(args) or vars(args).get("load_adapter") is not None
               or vars(args).get("quantize_base", "none") != "none")
    fine_tune = fine_tune_config(args) if adapter else FineTuneConfig()
    return cls(model=model_settings_from_args(args), data=data_settings_from_args(args),
               run=run_settings_from_args(args), train=train_config_from_args(args), fine_tune=fine_tune,
               flags=dict(vars(args)), **fields)


def run_main(main: Callable[[], Any]) -> None:
    """Run a task's ``main()`` as a command: bad input (a malformed or missing file, weights
    that do not fit) ends in one ``error: file:line: problem`` line and exit status 2, not
    a traceback; so does a full disk, and Ctrl-C in one ``interrupted ...; resume with: ...``
    line and status 130 (``cli.failures``). Called from each script's ``if __name__ ==
    "__main__"`` block only, so tests and callers of ``main`` still get the exception."""
    try:
        with nesting() as around:
            main()
    except BaseException as e:  # whatever ended it: a run that wrote nothing leaves no folder
        run_dir.discard_unused_runs()
        failure = failure_line(e, outer=not around)
        if failure is None:  # a bug, or an exit: its own traceback or status
            raise
        if ranks.is_main() or not isinstance(e, KeyboardInterrupt):  # torchrun: every rank gets Ctrl-C
            print(failure[0], file=sys.stderr)
        raise SystemExit(failure[1]) from None
    # Under torchrun, leave the process group together: exiting while Gloo's threads still run
    # can abort the process after a successful run.
    ranks.barrier()
    ranks.teardown()


def train_config_from_args(args: argparse.Namespace, device: torch.device | str = "cpu", **fields: Any) -> TrainConfig:
    """A TrainConfig from the shared flags; ``fields`` (metric, output_dir, lr...) take precedence.
    A task's run sets the device and the run folder later (``tasks.common.train_config``)."""
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
        optimizer=getattr(args, "optimizer", "adamw"),
    )
    values.update(fields)
    return TrainConfig(**values)


def _number(kind: type, low: float, low_open: bool = False, high: float | None = None) -> Callable[[str], Any]:
    """An argparse type: ``kind`` parsed, then checked against [low, high) (or (low, ...) if ``low_open``)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if value < low or (low_open and value == low) or (high is not None and value >= high):
            bound = f"> {low}" if low_open else f">= {low}"
            raise argparse.ArgumentTypeError(f"{value} must be {bound}" + (f" and < {high}" if high else ""))
        return value

    return parse


def add_objective_args(parser: argparse.ArgumentParser, pooling_help: str | None = None) -> argparse.ArgumentParser:
    """The flags of the training objectives (one group), all off by default; bad values (a negative
    weight, a zero temperature) stop at parse time with argparse's usage error. ``pooling_help``:
    what ``--pooling`` does in a task where it means less than a sentence representation."""
    d = ObjectiveSettings()
    g = parser.add_argument_group("training objectives (off by default; combinable)")
    g.add_argument("--rdrop_alpha", type=_number(float, 0), default=d.rdrop_alpha,
                   help="R-Drop (Liang et al. 2021): weight of the symmetric KL between two dropout passes")
    g.add_argument("--contrastive_weight", type=_number(float, 0), default=d.contrastive_weight,
                   help="SimCSE (Gao et al. 2021): weight of the in-batch InfoNCE on sentence representations")
    g.add_argument("--contrastive_temperature", type=_number(float, 0, low_open=True),
                   default=d.contrastive_temperature, help="InfoNCE temperature tau")
    g.add_argument("--contrastive_supervised", action="store_true",
                   help="paraphrase pairs: the two questions of a positive pair are the positives "
                        "(default: two dropout views of the same text)")
    g.add_argument("--smart_weight", type=_number(float, 0), default=d.smart_weight,
                   help="SMART (Jiang et al. 2020): weight lambda_s of the adversarial smoothness term")
    g.add_argument("--smart_epsilon", type=_number(float, 0), default=d.smart_epsilon,
                   help="radius of the inf-norm ball the embedding perturbation stays in")
    g.add_argument("--smart_steps", type=_number(int, 0), default=d.smart_steps,
                   help="projected gradient-ascent steps that find the perturbation")
    g.add_argument("--smart_step_size", type=_number(float, 0), default=d.smart_step_size,
                   help="ascent step eta (along the inf-norm-normalised gradient)")
    g.add_argument("--smart_proximal_weight", type=_number(float, 0), default=d.smart_proximal_weight,
                   help="weight mu of SMART's Bregman proximal term against the momentum teacher (paper: 1)")
    g.add_argument("--smart_momentum", type=_number(float, 0, high=1.0), default=d.smart_momentum,
                   help="beta of the momentum teacher, theta~ <- beta theta~ + (1 - beta) theta")
    g.add_argument("--pooling", choices=POOLINGS, default=d.pooling,
                   help=pooling_help or "sentence representation: the last real token's state or the mean over "
                                        "real tokens")
    return parser


def add_classification_args(parser: argparse.ArgumentParser, pooling_help: str | None = None,
                            **common_defaults: Any) -> argparse.ArgumentParser:
    """The flags every classification task shares: the course's and the engine's
    (``add_common_args`` with the task's defaults) and the training objectives'."""
    return add_objective_args(add_common_args(parser, **common_defaults), pooling_help)


def objective_settings_from_args(args: argparse.Namespace) -> ObjectiveSettings:
    """The objectives' settings from parsed flags (flags a parser lacks keep their defaults); an
    objective the run's distribution cannot train is refused first (``check_objectives``)."""
    check_objectives(args)
    return from_flags(ObjectiveSettings, vars(args))


__all__ = [
    "add_classification_args", "add_common_args", "add_objective_args",
    "data_settings_from_args", "default_output_dir", "fine_tune_config", "model_settings_from_args",
    "objective_settings_from_args", "pick_device", "run_main", "run_settings_from_args",
    "seed_everything", "task_settings_from_args", "train_config_from_args",
]
