"""Where tensors run: batches moved to the model's device, and bf16 autocast on CUDA only.

Shared by the Trainer's loop and ``predict``, so training and evaluation place and cast
batches the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def move_to_device(batch: Any, device: torch.device | str) -> Any:
    """Tensors inside dicts/lists/tuples moved to ``device``; other values (ids, strings) left as they are."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch


def autocast_context(device: torch.device | str, bf16: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; nothing elsewhere (CPU bf16 is slow and changes numbers)."""
    if torch.device(device).type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


__all__ = ["autocast_context", "model_device", "move_to_device"]
