"""What a resumed run must match: the settings of the saved run that change its result.

``--resume`` with nothing to resume is an error; the saved run's settings that change the result
(``run_settings``) must equal the current ones, or the run is refused with the whole list of
differences (``--resume_allow_changes`` accepts them and prints them). A setting newer than the
saved run, which the run therefore lacks, had its default there (``setting_defaults``: the
``TrainConfig`` field's, and those the layers above register); ``metrics.jsonl`` records
past the checkpoint (written before a kill) are dropped, so no epoch is logged twice.
``Trainer.fit`` runs inside ``fit_guard``: the run folder claimed (``engine.run_dir``) and, on
resume, these checks made before any step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from engine import ranks
from engine.checkpoints import load_checkpoint
from engine.run_dir import RunDirError, claim, release
from engine.tracking import trim_metrics
from engine.train_config import TrainConfig
from errors import CheckpointError

# Settings that do not change the weights a run produces: where it writes, how it logs, how far
# it goes (a resume may extend a run), the device, and the flags of this very mechanism.
IGNORED_SETTINGS = frozenset({
    "output_dir", "resume", "overwrite", "resume_allow_changes", "progress", "no_progress", "plot", "log_every",
    "max_steps", "save_every_steps", "save_top_k", "patience", "epochs", "device", "use_gpu", "num_workers",
    "no_bf16", "predictions_dir", "filepath", "load", "checkpoint", "generate_only", "tokenizer", "compile",
    "no_cache", "gen_batch_size", "eval_batch_size", "gradient_checkpointing", "pretrain_epochs",
    "report_to", "fsdp", "final_weights", "generate_from", "recipe",
})
# Resumed from the saved optimizer, so a changed value would not take effect.
OPTIMIZER_SETTINGS = ("lr", "weight_decay", "betas", "eps")
# (the resumed run's settings) -> {setting: the value a run saved before the setting existed had}
DefaultsFn = Callable[[Mapping[str, Any]], Mapping[str, Any]]
_DEFAULTS: dict[str, DefaultsFn] = {}


def register_defaults(name: str, fn: DefaultsFn) -> None:
    """Say what the settings of a layer above the engine (which it does not import: the tasks' flags)
    were in a run saved before they existed; ``name`` keeps a second registration from adding twice."""
    _DEFAULTS[name] = fn


def field_defaults(cls: type) -> dict[str, Any]:
    """The defaults of a settings dataclass's fields, by name (fields without a plain default left out)."""
    return {f.name: f.default for f in fields(cls) if f.default is not MISSING}


def setting_defaults(current: Mapping[str, Any]) -> dict[str, Any]:
    """The value of each setting a run saved before it existed had: its default (that run behaved
    as the default does): the ``TrainConfig`` field's, then the registered ones (``register_defaults``)."""
    out = field_defaults(TrainConfig)
    for fn in _DEFAULTS.values():
        out.update(fn(current))
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}  # as run_settings has them


def run_settings(train_config: Mapping[str, Any], model_config: Mapping[str, Any] | None,
                 extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """The settings of a run that change its result, flat: the CLI args saved in ``extra["args"]``,
    the other plain values of ``extra`` (dataset, number of labels...), the TrainConfig (which
    wins where both name a setting) and the model config as ``model.<field>``. Left out:
    ``IGNORED_SETTINGS``, output paths (``*_out``), and ``epochs`` unless the learning-rate
    schedule depends on the total number of steps."""
    extra = dict(extra or {})
    out: dict[str, Any] = {}
    for source in (extra.pop("args", None) or {}, extra, train_config):
        out.update({k: v for k, v in source.items() if isinstance(v, (str, int, float, bool, list, tuple, type(None)))})
    out = {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()
           if k not in IGNORED_SETTINGS and not k.endswith("_out")}
    if train_config.get("scheduler", "constant") != "constant" or train_config.get("warmup_ratio", 0):
        out["epochs"] = train_config.get("epochs")
    for k, v in (model_config or {}).items():
        if k not in IGNORED_SETTINGS:
            out[f"model.{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def changed_settings(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``name saved -> current`` for each setting that differs (missing on one side shown as such).
    A setting the saved run lacks (newer than it) had its default there (``setting_defaults``).
    A ``model.`` field that only the saved run has is no setting of this version's model (configs
    saved before they held the architecture only kept switches there whose flags are compared as
    flags), so it is not counted as a change."""
    missing = "(not set)"
    defaults = setting_defaults(current)
    saved = {**{k: defaults[k] for k in current if k in defaults}, **saved}
    saved = {k: v for k, v in saved.items() if not k.startswith("model.") or k in current}
    return [f"{k} {saved.get(k, missing)!r} -> {current.get(k, missing)!r}"
            for k in sorted(set(saved) | set(current)) if saved.get(k, missing) != current.get(k, missing)]


def check_resume(last: str | Path, current: Mapping[str, Any], allow_changes: bool = False) -> None:
    """Compare ``last``'s saved settings with ``current`` (both from ``run_settings``): refuse
    differences with the whole list unless ``allow_changes``, then print them; trim
    ``metrics.jsonl`` to the checkpoint. The checkpoint is memory-mapped: its tensors are not read."""

    last = Path(last)
    try:
        ckpt = load_checkpoint(last, mmap=True)
    except CheckpointError as e:
        raise RunDirError(f"{e}; delete it or use --overwrite to start afresh") from None
    saved = run_settings(ckpt.get("train_config") or {}, ckpt.get("model_config"), ckpt.get("extra"))
    changes = changed_settings(saved, current)
    was, now = (s.get("optimizer", TrainConfig.optimizer) for s in (saved, current))
    if was != now:  # the saved optimizer state is that optimizer's: no other can take it
        raise RunDirError(f"{last}: --resume cannot change the optimizer (optimizer {was!r} -> {now!r}); "
                          "start a new run instead")
    if changes and not allow_changes:
        raise RunDirError(f"{last}: --resume with settings that differ from the saved run's: {'; '.join(changes)}. "
                          "Rerun with the saved settings, or add --resume_allow_changes to continue with the "
                          "new ones")
    if changes:
        kept = [k for k in OPTIMIZER_SETTINGS if saved.get(k) != current.get(k)]
        print(f"--resume_allow_changes: resuming with changed settings: {'; '.join(changes)}"
              + (f" ({', '.join(kept)}: the saved optimizer's values stay in force)" if kept else ""))
    dropped = trim_metrics(last.parent / "metrics.jsonl", int(ckpt.get("epoch", 0)), int(ckpt.get("global_step", 0)))
    if dropped:
        print(f"dropped {dropped} metrics.jsonl records written after {last.name} (an interrupted run's)")


@contextlib.contextmanager
def fit_guard(output_dir: str | Path, config: Any, current: Mapping[str, Any]) -> Iterator[None]:
    """What ``Trainer.fit`` runs inside: the folder claimed (``config.resume``/``overwrite``) for
    the fit and released after, and on resume the saved settings checked (``check_resume``).
    A resumed stage that has no ``last.pt`` of its own (its run has one in a subfolder, of an
    earlier stage) starts afresh with a note. Under torchrun only rank 0 claims and checks;
    the other ranks wait for its verdict."""
    def claim_and_check() -> Path:
        folder = claim(output_dir, resume=config.resume, overwrite=getattr(config, "overwrite", False))
        try:
            if config.resume:
                last = folder / "last.pt"
                if last.exists():
                    check_resume(last, current, getattr(config, "resume_allow_changes", False))
                else:
                    print(f"note: {folder} has no last.pt of its own (an earlier stage's is in a subfolder): "
                          "this stage starts afresh")
        except BaseException:
            release(folder)
            raise
        return folder

    folder = ranks.on_main(claim_and_check)  # under torchrun rank 0 owns the folder
    try:
        yield
    finally:
        if ranks.is_main():
            release(folder)
