"""What the Trainer's checkpoints hold of a model, and which best checkpoints stay on disk.

A checkpoint may hold every weight or only the trainable ones (LoRA, a frozen body);
``trainable_state_dict`` and ``load_model_state`` are the two sides of that choice, also
used by the CLIs that reload a checkpoint for prediction; a checkpoint that does not fit is
refused with the complete list of what differs. ``keep_top_k`` writes a new best
checkpoint and deletes those that fell out of the top k. Files are written atomically
by ``models.loading.atomic_save``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from config import GPT2Config
from models.loading import CheckpointError, atomic_save, check_config

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
) -> None:
    """Load full or trainable-only weights; a partial state must still match the names it holds.

    A checkpoint that does not fit raises one ``CheckpointError`` line that lists everything that
    differs: every architecture field of ``saved_config`` (the checkpoint's ``model_config``), then
    every missing, unexpected and differently shaped tensor (torch's own message names them on
    many lines, of which a command-line error showed only the first)."""
    if saved_config is not None:
        ours = model_config_of(model)
        if ours is not None:
            check_config(dict(saved_config), GPT2Config.from_dict(ours), path)
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    missing = [] if partial else sorted(set(own) - set(state))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in state
              if k in own and state[k].shape != own[k].shape]
    problems = [f"{what} ({len(keys)}): {', '.join(keys)}" for what, keys in (
        ("missing from the checkpoint", missing), ("not in the model", unexpected),
        ("other shapes, checkpoint vs model", shapes)) if keys]
    if problems:
        raise CheckpointError(f"{path} does not fit the model (another model size or fine-tune mode?): "
                              + "; ".join(problems))
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


def load_weights_into(model: nn.Module, path: str | Path) -> None:
    """Put the weights of a Trainer checkpoint (``best.pt``, ``last.pt``...) into ``model``, as
    ``--load`` does; a checkpoint that does not fit the model is a ``CheckpointError``."""
    from models.loading import CheckpointError, load_checkpoint

    ckpt = load_checkpoint(path)
    if "model" not in ckpt:
        raise CheckpointError(f"{path}: not a checkpoint of a training run (no 'model' entry)")
    try:
        load_model_state(model, ckpt["model"], ckpt.get("trainable_only", False), path)
    except (RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path} does not fit this model: {str(e).splitlines()[0]}") from e


__all__ = ["TopK", "keep_top_k", "load_model_state", "load_weights_into", "model_config_of", "rank_top_k",
           "trainable_state_dict"]
