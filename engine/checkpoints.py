"""Our checkpoint files: how they are written and read, what they hold of a model, and
which best checkpoints stay on disk.

Checkpoint files are the training engine's business (the model package knows weights and
Hugging Face names only). Every file is written by ``atomic_save`` and read by
``load_checkpoint``; ``save_model``/``load_model`` are a plain GPT-2 with its config, what
the task scripts keep as their final model. A Trainer checkpoint may hold every weight or
only the trainable ones (LoRA, a frozen body); ``trainable_state_dict`` and
``load_model_state`` are the two sides of that choice, also used by the CLIs that reload a
checkpoint for prediction (one that does not fit is refused with the complete list of what
differs). ``keep_top_k`` writes a new best checkpoint and deletes those
that fell out of the top k.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from config import GPT2Config
from models.loading import CheckpointError

# ------------------------------------------------------------ our checkpoints


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save to a temporary file in the same folder, then rename: a crash
    never leaves a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from e


def save_model(model, path: str | Path, **extra: Any) -> None:
    """A GPT2Model (or any module with ``.config``) as {config, model weights, extra}. Under
    torchrun every rank calls it (FSDP-sharded weights are gathered) and rank 0 writes."""
    from torch.distributed.tensor import DTensor  # not loaded by ``import torch`` alone

    from engine import distributed

    state = model.state_dict()
    if any(isinstance(v, DTensor) for v in state.values()):
        state = {k: v.full_tensor().cpu() if isinstance(v, DTensor) else v for k, v in state.items()}
    if distributed.is_main():
        atomic_save({"config": model.config.to_dict(), "model": state, "extra": extra}, path)


# What a checkpoint is said not to fit when the caller names nothing more particular.
_ANY_MODEL = "the model (another model size or fine-tune mode?)"


def check_config(saved: dict[str, Any], config: GPT2Config, path: str | Path, fits: str | None = None) -> None:
    """Raise if a checkpoint's architecture differs from the model it is loaded into (``fits``:
    what the model was built for, named in the message)."""
    theirs = GPT2Config.from_dict(saved).architecture()
    ours = config.architecture()
    diff = {k: (theirs[k], ours[k]) for k in ours if theirs[k] != ours[k]}
    if diff:
        detail = ", ".join(f"{k}: checkpoint {a} vs model {b}" for k, (a, b) in diff.items())
        where = f"{path} does not fit {fits}: saved" if fits else f"{path} was saved"
        raise CheckpointError(f"{where} from another model config ({detail})")


def load_model(path: str | Path, map_location: str | torch.device = "cpu", random_init: bool = False,
               **config_overrides: Any):
    """A GPT2Model saved with ``save_model``; ``config_overrides`` change fields of its config that
    do not touch the weights (e.g. ``hidden_dropout_prob`` for a model trained further).
    ``random_init``: its architecture with fresh weights."""
    from methods.prefix import restore_prefix
    from models.gpt2 import GPT2Model

    ckpt = load_checkpoint(path, map_location)
    if "config" not in ckpt:
        kind = "a training-engine checkpoint (best.pt, last.pt)" if "train_config" in ckpt else "not a saved model"
        raise CheckpointError(f"{path} is {kind}, not a model saved by a task script; pass the model file the "
                              "run wrote (e.g. <output_dir>/paraphrase-model.pt or sonnet-model.pt)")
    model = GPT2Model(GPT2Config.from_dict({**ckpt["config"], **config_overrides}))
    if random_init:
        return model
    restore_prefix(model, ckpt["model"])  # a prefix-tuned body is saved with its prefix
    model.load_state_dict(ckpt["model"])
    return model


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
    if saved_config is not None:
        ours = model_config_of(model)
        if ours is not None:
            check_config(dict(saved_config), GPT2Config.from_dict(ours), path, fits)
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


def model_config_of(model: nn.Module) -> dict[str, Any] | None:
    """The GPT2Config of the (first) body inside the model, so a checkpoint says what it fits."""
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if hasattr(cfg, "to_dict"):
            return cfg.to_dict()
    return None


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


def load_any_model(spec: str):
    """A GPT2Model from a ``save_model`` file, a Trainer checkpoint with every weight (keys of a
    task head's ``gpt.`` body), or a Hugging Face folder / hub id."""
    from methods.prefix import restore_prefix
    from models.gpt2 import GPT2Model

    if not Path(spec).is_file():
        return GPT2Model.from_pretrained(spec)
    ckpt = load_checkpoint(spec)
    if "config" in ckpt:
        return load_model(spec)
    if "model" not in ckpt or "model_config" not in ckpt:
        raise CheckpointError(f"{spec}: neither a saved model, a Trainer checkpoint nor a Hugging Face folder")
    if ckpt.get("trainable_only", False):
        raise CheckpointError(f"{spec} holds only the trained parameters (LoRA, prefix or a frozen body); pass the "
                              "model file the run saved (e.g. sonnet-model.pt)")
    state = {k.removeprefix("gpt."): v for k, v in ckpt["model"].items()}
    model = GPT2Model(GPT2Config.from_dict(ckpt["model_config"]))
    restore_prefix(model, state)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{spec}: not a plain GPT-2 language model ({str(e).splitlines()[0]})") from e
    return model


__all__ = [
    "TopK", "atomic_save", "check_config", "keep_top_k", "load_any_model", "load_checkpoint", "load_checkpoint_weights",
    "load_model", "load_model_state", "load_weights_into", "model_config_of", "rank_top_k", "save_model",
    "trainable_state_dict",
]
