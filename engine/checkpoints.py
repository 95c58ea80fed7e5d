"""Our checkpoint files: how they are written and read, what they hold of a model, and
which best checkpoints stay on disk.

Checkpoint files are the training engine's business (the model package knows weights and
Hugging Face names only), and the engine knows any ``nn.Module``, not GPT-2: a model's
``config`` is whatever object it holds with ``to_dict()`` (and ``architecture()``, the fields
that decide whether weights fit). Every file is written by ``atomic_save`` and read by
``load_checkpoint``; ``save_module`` writes a model with its config, what the task scripts
keep as their final model (``methods.restore`` saves and rebuilds GPT-2 bodies through it).
A Trainer checkpoint may hold every weight or only the trainable ones (LoRA, a frozen body);
``trainable_state_dict`` and ``load_model_state`` are the two sides of that choice, also used by
the CLIs that reload a checkpoint for prediction (one that does not fit is refused with the
complete list of what differs). ``keep_top_k`` writes a new best checkpoint and deletes those
that fell out of the top k.

``CheckpointMixin`` is what the Trainer writes and reads back of a run: ``last.pt`` (the full state for exact
resume), the top-k best checkpoints, the metrics log, and the replay of an interrupted epoch.

Kept beside the loop as a mixin of ``engine.trainer.Trainer`` (the methods use its
attributes: model, optimizer, scheduler, config, counters, history, top-k list), so the
loop reads on its own and every file the engine writes is listed here. What a checkpoint holds
of the model and optimizer, which rank writes, and the other ranks' RNG states come from the
Trainer's strategy (``engine.strategy``): under FSDP the weights are gathered from their shards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from engine import ranks, run_dir
from engine.rng import get_rng_state, sampler_rng_state, set_rng_state, set_sampler_rng_state
from engine.tracking import append_record
from errors import CheckpointError, InputError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)  # a full disk, an exhausted quota


class NoSpaceError(InputError):
    """The disk filled while a checkpoint was written: the half-written file is gone and the
    previous one kept, so ``run_main`` says so in one line instead of torch's "unexpected pos"."""


class _Writer(io.BufferedWriter):
    """A file that keeps the first ``OSError`` a write raised: ``torch.save`` turns it into its own
    "unexpected pos 7424 vs 7318" error, which no longer says that the disk is full."""

    error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return super().write(data)
        except OSError as e:
            self.error = self.error or e
            raise


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any]) -> None:
    """``write(f)`` into a temporary file in ``path``'s folder, then rename it to ``path``: a crash
    never leaves a half-written file. A full disk removes the temporary file and raises
    ``NoSpaceError`` (the file at ``path``, if any, is kept)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with _Writer(open(tmp, "wb", buffering=0)) as f:
            try:
                write(f)
            except RuntimeError:  # torch.save wraps the OSError of a full disk
                if f.error is None:
                    raise
                raise f.error from None
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.errno not in NO_SPACE:
            raise
        kept = f"the previous {path.name} is kept" if path.exists() else f"no {path.name} was written"
        raise NoSpaceError(f"no space left on {path.parent} while saving {path.name}; {kept}") from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save through ``atomic_write``; the file is recorded as the run's in its run folder's
    manifest (``run_dir.note_written``)."""
    atomic_write(path, lambda f: torch.save(obj, f))
    run_dir.note_written(Path(path))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """A checkpoint, ``weights_only``; with ``mmap`` its tensors are mapped, not read (for its settings)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from e


def save_module(model: nn.Module, path: str | Path, **extra: Any) -> None:
    """A module with a ``.config`` as {config, model weights, extra}. Under torchrun every rank
    calls it (FSDP-sharded weights are gathered) and rank 0 writes."""
    state = model.state_dict()
    if ranks.active():  # FSDP shards its weights as DTensors (a module ``import torch`` alone does not load)
        from torch.distributed.tensor import DTensor

        state = {k: v.full_tensor().cpu() if isinstance(v, DTensor) else v for k, v in state.items()}
    if ranks.is_main():
        atomic_save({"config": model.config.to_dict(), "model": state, "extra": extra}, path)


_ANY_MODEL = "the model (another model size or fine-tune mode?)"  # what a misfit names when the caller names nothing


def check_config(saved: Mapping[str, Any], config: Any, path: str | Path, fits: str | None = None) -> None:
    """Raise if a checkpoint's architecture differs from the model it is loaded into (``fits``:
    what the model was built for, named in the message). ``config`` is the model's config object:
    the fields its ``architecture()`` names are compared, nothing else (a config saved by an older
    version holds more fields; ``methods.restore`` knows them)."""
    ours = config.architecture()
    diff = {k: (saved.get(k), v) for k, v in ours.items() if saved.get(k) != v}
    if diff:
        detail = ", ".join(f"{k}: checkpoint {a} vs model {b}" for k, (a, b) in diff.items())
        where = f"{path} does not fit {fits}: saved" if fits else f"{path} was saved"
        raise CheckpointError(f"{where} from another model config ({detail})")


# ------------------------------------------------------------ Trainer checkpoints

TopK = list[tuple[float, int, str]]  # (score, epoch, path); higher scores are better


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the parameters that train: what a LoRA or frozen-body run needs to save."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def load_model_state(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    partial: bool,
    path: Any = "",
    saved_config: Mapping[str, Any] | None = None,
    fits: str = _ANY_MODEL,
) -> None:
    """Load full or trainable-only weights; a partial state must still match the names it holds.
    ``fits`` names what the checkpoint was meant for in the error ("--model_size gpt2 ...").

    A checkpoint that does not fit raises one ``CheckpointError`` line that lists everything that
    differs: every architecture field of ``saved_config`` (the checkpoint's ``model_config``), then
    every missing, unexpected and differently shaped tensor (torch's own message names them on
    many lines, of which a command-line error showed only the first)."""
    ours = config_of(model)
    if saved_config is not None and hasattr(ours, "architecture"):
        check_config(saved_config, ours, path, fits)
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    missing = [] if partial else sorted(set(own) - set(state))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state
              if k in own and state[k].shape != own[k].shape]
    problems = [f"{what} ({len(keys)}): {', '.join(keys)}" for what, keys in (
        ("missing from the checkpoint", missing), ("not in the model", unexpected),
        ("other shapes, checkpoint vs model", shapes)) if keys]
    if problems:
        raise CheckpointError(f"{path} does not fit {fits}: " + "; ".join(problems))
    model.load_state_dict(state, strict=not partial)


def config_of(model: nn.Module) -> Any | None:
    """The config object of the (first) body inside the model: any ``config`` with ``to_dict()``."""
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if hasattr(cfg, "to_dict"):
            return cfg
    return None


def model_config_of(model: nn.Module) -> dict[str, Any] | None:
    """The config of the (first) body inside the model as a dict, so a checkpoint says what it fits."""
    cfg = config_of(model)
    return None if cfg is None else cfg.to_dict()


def rank_top_k(top_k: Sequence[tuple[float, int, str]]) -> TopK:
    """Best score first; on a tie the earlier epoch first."""
    return sorted(top_k, key=lambda t: (-t[0], t[1]))


def keep_top_k(
    top_k: TopK, k: int, score: float, epoch: int, output_dir: str | Path, payload: Callable[[], dict[str, Any]]
) -> TopK:
    """The top-k list after offering this epoch's ``score``. If it ranks among the ``k`` best,
    ``payload()`` is saved as ``best.pt`` (k == 1) or ``best-epochN.pt`` and checkpoints that
    fell out of the top k are deleted; otherwise nothing is written. ``k`` <= 0 keeps none."""
    if k <= 0:
        return top_k
    ranked = rank_top_k(top_k)
    if len(ranked) >= k and score <= ranked[-1][0]:
        return top_k
    name = "best.pt" if k == 1 else f"best-epoch{epoch}.pt"
    path = Path(output_dir) / name
    atomic_save(payload(), path)
    ranked = [t for t in ranked if t[2] != str(path)] + [(score, epoch, str(path))]
    ranked = rank_top_k(ranked)
    for _, _, old in ranked[k:]:
        Path(old).unlink(missing_ok=True)
    return ranked[:k]


def load_checkpoint_weights(model: nn.Module, ckpt: Mapping[str, Any], path: str | Path,
                            fits: str = _ANY_MODEL) -> None:
    """The weights of a loaded Trainer checkpoint into ``model`` (full or trainable-only, its saved
    config checked when it has one): the one way every loader does it, so a misfit reads the same
    everywhere, one ``CheckpointError`` line naming ``path`` once and what it should ``fit``."""
    if "model" not in ckpt:
        raise CheckpointError(f"{path}: not a checkpoint of a training run (no model weights)")
    try:
        load_model_state(model, ckpt["model"], ckpt.get("trainable_only", False), path, ckpt.get("model_config"),
                         fits=fits)
    except CheckpointError:
        raise
    except (RuntimeError, ValueError) as e:  # anything torch raised past the checks: its first line
        raise CheckpointError(f"{path} does not fit {fits}: {str(e).splitlines()[0]}") from e


def load_weights_into(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Put the weights of a Trainer checkpoint (``best.pt``, ``last.pt``...) into ``model``, as
    ``--load`` does; a checkpoint that does not fit the model is a ``CheckpointError``. Returns
    the checkpoint (its ``extra`` holds what the weights do not show, e.g. the head's pooling)."""
    ckpt = load_checkpoint(path)
    load_checkpoint_weights(model, ckpt, path)
    return ckpt


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``Trainer.fit``, with where it stopped: the epoch it was in, the optimizer steps
    done, the run ``folder``, and the ``last.pt`` a ``--resume`` continues from (None: not saved yet)
    with its step (``saved_step``, None where unknown). ``cli.common.run_main`` makes it one line."""

    def __init__(self, epoch: int, step: int, folder: Path, checkpoint: Path | None, saved_step: int | None) -> None:
        super().__init__(f"interrupted at epoch {epoch} step {step}")
        self.epoch, self.step, self.folder = epoch, step, folder
        self.checkpoint, self.saved_step = checkpoint, saved_step


class CheckpointMixin:
    """Checkpoint save/resume bookkeeping and the log of a ``Trainer``."""

    @contextlib.contextmanager
    def _reporting_interrupts(self) -> Iterator[None]:
        """Turn Ctrl-C inside the block into ``TrainingInterrupted`` (still a ``KeyboardInterrupt``)."""
        try:
            yield
        except KeyboardInterrupt as e:
            if isinstance(e, TrainingInterrupted):
                raise
            last = self.output_dir / "last.pt"
            raise TrainingInterrupted(
                max(1, getattr(self, "running_epoch", 0)), self.global_step, self.output_dir,
                last if last.exists() else None, getattr(self, "_saved_step", None),
            ).with_traceback(e.__traceback__) from None

    def _keep_top_k(self, score: float) -> None:
        """Offer this epoch to the top k; rank 0 writes (FSDP weights are gathered by every rank
        first) and every rank keeps the same list."""
        gathered = self._model_state() if self.strategy.sharded else None
        self.top_k = self.strategy.on_main(lambda: keep_top_k(
            self.top_k, self.config.save_top_k, score, self.epoch, self.output_dir, lambda: {
                "model": gathered if gathered is not None else self._model_state(),
                "trainable_only": self.config.save_trainable_only, "epoch": self.epoch,
                "dev": self.history[-1]["dev"], "train_config": self._config_dict(),
                "model_config": model_config_of(self.model), "extra": self.extra}))

    def _model_state(self) -> dict[str, torch.Tensor]:
        """The weights a checkpoint holds (FSDP: gathered on rank 0, a collective call)."""
        return self.strategy.model_state(self.model, self.config.save_trainable_only)

    def _state_keys(self) -> set[str]:
        if self.config.save_trainable_only:
            return {n for n, p in self.model.named_parameters() if p.requires_grad}
        return set(self.model.state_dict())

    def _config_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self.config)
        d["betas"] = list(d["betas"])
        if self.strategy.world_size > 1:  # the global batch: a resume with another number of ranks differs
            d["world_size"] = self.strategy.world_size
        return d

    def _save_last(self) -> None:
        """``last.pt``, written by rank 0; under torchrun it also holds every rank's RNG state, so
        that each rank resumes its own dropout stream."""
        rng = get_rng_state()
        rng["sampler"] = sampler_rng_state(self.train_loader)
        ranks_rng = self.strategy.gather_objects(rng)
        model_state = self._model_state()
        optim_state = self.strategy.optimizer_state(self.model, self.optimizer)
        if not self.strategy.is_main:
            return
        atomic_save({
            "model": model_state,
            "trainable_only": self.config.save_trainable_only,
            "optimizer": optim_state,
            "scheduler": self.scheduler.state_dict(),
            "rng": rng,
            **({"rank_rng": ranks_rng} if len(ranks_rng) > 1 else {}),
            "epoch_rng": self.epoch_rng if self.step_in_epoch else None,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "step_in_epoch": self.step_in_epoch,
            "partial_loss": list(self._partial_loss),
            "history": self.history,
            "best_metrics": self.best_metrics,
            "best_score": self.best_score,
            "top_k": [list(t) for t in self.top_k],
            "bad_epochs": self.bad_epochs,
            "stopped": self.stop,
            "train_config": self._config_dict(),
            "model_config": model_config_of(self.model),
            "extra": self.extra,
        }, self.output_dir / "last.pt")
        self._saved_step = self.global_step

    def _resume(self, path: Path) -> None:
        ckpt = load_checkpoint(path, map_location=self.device)
        self._check_same_parameters(ckpt, path)
        self._load_model(ckpt, path)
        self.strategy.load_optimizer_state(self.model, self.optimizer, ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.epoch = ckpt["epoch"]
        self.global_step = self._saved_step = ckpt["global_step"]
        self.step_in_epoch = ckpt["step_in_epoch"]
        self._partial_loss = (float(ckpt["partial_loss"][0]), int(ckpt["partial_loss"][1]))
        self.epoch_rng = ckpt["epoch_rng"]
        self.history = list(ckpt["history"])
        self.best_metrics = dict(ckpt["best_metrics"])
        self.best_score = ckpt["best_score"]
        self.top_k = [(float(s), int(e), str(p)) for s, e, p in ckpt["top_k"]]
        self.bad_epochs = ckpt["bad_epochs"]
        self.stop = ckpt["stopped"]
        ranks_rng = ckpt.get("rank_rng") or [ckpt["rng"]]
        rng = ranks_rng[self.strategy.rank] if len(ranks_rng) == self.strategy.world_size else ckpt["rng"]
        set_rng_state(rng)
        set_sampler_rng_state(self.train_loader, rng)

    def _batches(self) -> Iterator[tuple[int, Any]]:
        """This epoch's batches; after a mid-epoch resume the seen ones are replayed and skipped."""
        cfg = self.config
        # A save on an epoch's last step leaves step_in_epoch * grad_accum past the last batch when
        # the last group is short; skipping more batches than the epoch has raised StopIteration.
        skip = min(self.step_in_epoch * cfg.grad_accum, len(self.train_loader))  # type: ignore[arg-type]
        if skip:
            resume_rng = get_rng_state()
            set_rng_state(self.epoch_rng)  # the shuffle of the interrupted epoch
            set_sampler_rng_state(self.train_loader, self.epoch_rng)
        else:
            self.epoch_rng = get_rng_state()
            self.epoch_rng["sampler"] = sampler_rng_state(self.train_loader)
        it = iter(self.train_loader)
        if skip:
            for _ in range(skip):  # the sampler draws its seed at the first next(), so replay first
                next(it)
            set_rng_state(resume_rng)
        yield from enumerate(it, start=skip)

    def _load_model(self, ckpt: Mapping[str, Any], path: str | Path) -> None:
        self.strategy.load_model_state(self.model, ckpt, path)

    def _check_same_parameters(self, ckpt: Mapping[str, Any], path: Path) -> None:
        """A run resumes only into the parameters it trained: a checkpoint of another fine-tune mode
        (a frozen body's head, LoRA adapters, the full model) is refused with what differs, before
        the optimizer state (one slot per trained parameter) is forced onto other parameters."""
        saved, ours = set(ckpt.get("model", {})), self._state_keys()
        if ckpt.get("trainable_only", False) != self.config.save_trainable_only or saved != ours:
            detail = "; ".join(f"{what} ({len(keys)}): {', '.join(sorted(keys))}" for what, keys in (
                ("only in the checkpoint", saved - ours), ("only in this run", ours - saved)) if keys)
            raise CheckpointError(f"{path} was written by a run that trains other parameters (another fine-tune "
                                  f"mode or model?){': ' + detail if detail else ''}; resume with that run's flags "
                                  "or start a new run in another --output_dir")

    # ------------------------------------------------------------ logging

    def _log(self, record: dict[str, Any]) -> None:
        if self.strategy.is_main:
            append_record(self.output_dir / "metrics.jsonl", record)

