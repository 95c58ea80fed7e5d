"""Saved GPT-2 bodies: written with what the methods changed in them, and rebuilt from what a file
holds: its config, its weights, and what the weights do not show (a sparse attention pattern; a
prefix, which the weights do show). ``save_model`` / ``load_model`` are the file format of the task
scripts' final models (``model.pt``, ``sonnet-model.pt``...): the mechanics under
``tasks.restore.restore_task_model``, the one way callers get a trained model back.

A sparse model's file keeps its pattern as flag-named fields (``attn_pattern``...) beside
the config: in ``extra`` (``methods.sparse_attention.attention_fields``, which the tasks
pass when they save). Files saved before the config held the architecture only have those
fields, ``gradient_checkpointing`` and a free-form ``extra`` inside the config itself; they
still load: a sparse pattern there is rebuilt as sparse attention, and the rest (dense
defaults, a training-time switch, an empty dict) is dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from config import GPT2Config
from engine.checkpoints import load_checkpoint, save_module
from errors import CheckpointError
from methods.prefix import restore_prefix
from methods.reft import restore_reft
from methods.sparse_attention import FIELD_NAMES, SparseAttention, apply_sparse_attention, attention_fields
from models.gpt2 import GPT2Model

LEGACY_CONFIG_KEYS = (*FIELD_NAMES.values(), "gradient_checkpointing", "extra")


def split_saved_config(saved: Mapping[str, Any], extra: Mapping[str, Any] | None = None,
                       ) -> tuple[dict[str, Any], SparseAttention | None]:
    """(GPT2Config fields, sparse-attention settings or None for dense) of a saved config and the
    file's ``extra`` (whose fields win over those of an old config)."""
    config = {k: v for k, v in saved.items() if k not in LEGACY_CONFIG_KEYS}
    fields = {k: v for k, v in saved.items() if k in FIELD_NAMES.values()}
    fields.update({k: v for k, v in (extra or {}).items() if k in FIELD_NAMES.values()})
    attention = SparseAttention.from_fields(fields)
    return config, None if attention.pattern == "dense" else attention


def rebuild_model(saved_config: Mapping[str, Any], state: Mapping[str, torch.Tensor] | None = None,
                  extra: Mapping[str, Any] | None = None, **config_overrides: Any) -> GPT2Model:
    """The GPT2Model a file describes, with its attention and its prefix, holding ``state``
    (strictly loaded) if given, else fresh weights. ``config_overrides`` change fields that do
    not touch the weights (e.g. ``hidden_dropout_prob`` for a model trained further)."""
    config, attention = split_saved_config(saved_config, extra)
    model = GPT2Model(GPT2Config.from_dict({**config, **config_overrides}))
    if attention is not None:
        apply_sparse_attention(model, attention)
    if state is not None:
        restore_prefix(model, state)  # a prefix-tuned body is saved with its prefix
        restore_reft(model, state)  # and a ReFT-tuned one with its interventions
        model.load_state_dict(state)
    return model


def save_model(model: GPT2Model, path: str | Path, **extra: Any) -> None:
    """A GPT-2 body as {config, weights, extra}, its attention pattern kept in ``extra`` (a sparse
    model comes back sparse from ``load_model``). Under torchrun every rank calls it."""
    save_module(model, path, **{**attention_fields(model), **extra})


def load_model(path: str | Path, map_location: str | torch.device = "cpu", random_init: bool = False,
               **config_overrides: Any) -> GPT2Model:
    """A GPT2Model saved with ``save_model``; ``config_overrides`` change fields of its config that
    do not touch the weights (e.g. ``hidden_dropout_prob`` for a model trained further).
    ``random_init``: its architecture (and attention) with fresh weights."""
    ckpt = load_checkpoint(path, map_location)
    if "config" not in ckpt:
        kind = "a training-engine checkpoint (best.pt, last.pt)" if "train_config" in ckpt else "not a saved model"
        raise CheckpointError(f"{path} is {kind}, not a model saved by a task script; pass the model file the "
                              "run wrote (e.g. <output_dir>/paraphrase-model.pt or sonnet-model.pt)")
    return rebuild_model(ckpt["config"], None if random_init else ckpt["model"], ckpt.get("extra"),
                         **config_overrides)

