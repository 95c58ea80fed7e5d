"""Prediction over a DataLoader: the eval-mode loop every task's ``eval_fn`` and output files use.

``predict`` runs a step function over the batches (eval mode, no grad, autocast on CUDA,
batches on the model's device); ``predict_in_order`` is what the tasks need of it: one value
per example, back in file order (``make_eval_loader`` sorts by length and the examples carry
their ``index``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from engine.data import restore_order
from engine.device import autocast_context, model_device, move_to_device


@torch.no_grad()
def predict(
    model: nn.Module,
    loader: Iterable,
    step_fn: Callable[[nn.Module, Any], Any],
    bf16: bool = True,
    desc: str | None = None,
) -> list[Any]:
    """Run ``step_fn(model, batch)`` over a loader in eval mode (no grad, autocast on CUDA),
    batches moved to the model's device; returns the list of results. Tasks build eval_fn on this."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    out = []
    it = loader
    if desc is not None:
        from tqdm.auto import tqdm

        it = tqdm(loader, desc=desc, leave=False)
    try:
        with autocast_context(device, bf16):
            for batch in it:
                out.append(step_fn(model, move_to_device(batch, device)))
    finally:
        model.train(was_training)
    return out


def predict_in_order(
    model: nn.Module,
    loader: Iterable,
    value_fn: Callable[[nn.Module, Any], torch.Tensor],
    bf16: bool = True,
) -> list[Any]:
    """``value_fn(model, batch)`` -> (B, ...) tensor, one row per example, listed in file order
    (batches must carry ``index``, as the task features do)."""
    out = predict(model, loader, lambda m, b: (b["index"].cpu(), value_fn(m, b).cpu()), bf16=bf16)
    if not out:
        return []
    return restore_order(torch.cat([i for i, _ in out]).tolist(), torch.cat([v for _, v in out]).tolist())


__all__ = ["predict", "predict_in_order"]
