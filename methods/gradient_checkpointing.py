"""Gradient checkpointing: while training, each GPT-2 block keeps only its input for the
backward pass and recomputes its activations there (``torch.utils.checkpoint``), which
trades one more forward pass of the blocks for the memory of their activations.

``enable_gradient_checkpointing(model)`` gives every block the class ``CheckpointedLayer``,
holding the same weights; dropout draws the same numbers when a block is recomputed (the
RNG state is replayed), so the gradients are those without checkpointing.
"""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from methods.layer_swap import gpt2_body, swap_blocks
from modules.gpt2_layer import GPT2Layer
from modules.kv_cache import BaseKVCache

M = TypeVar("M", bound=nn.Module)


class CheckpointedLayer(GPT2Layer):
    """A block that recomputes its activations in the backward pass when training without a
    cache (decoding and evaluation keep nothing for a backward pass anyway)."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                cache: BaseKVCache | None = None) -> torch.Tensor:
        if self.training and cache is None:
            return checkpoint(super().forward, x, mask, None, use_reentrant=False)
        return super().forward(x, mask, cache)


def enable_gradient_checkpointing(model: M) -> M:
    """Checkpoint every block of ``model``'s GPT-2 body (the model or a head's ``.gpt``); returns ``model``."""
    body = gpt2_body(model, "gradient checkpointing")
    if not all(isinstance(block, CheckpointedLayer) for block in body.h):
        swap_blocks(body, lambda old: CheckpointedLayer(old.attn.config, old.attn.layer_idx))
    return model
