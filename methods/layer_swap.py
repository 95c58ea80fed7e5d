"""How a method changes a GPT-2 body's layers without a hook in the core: it gives them a
subclass of their own class that overrides one step, and the new layer holds the old
one's submodules.

So the parameters stay the same tensors (LoRA wrappers and all), their state-dict names
do not change, and putting the plain class back the same way undoes the method. Sparse
attention, prefix tuning, ReFT and gradient checkpointing plug in like this.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from models.gpt2 import GPT2Model
from modules.attention import CausalSelfAttention
from modules.gpt2_layer import GPT2Layer


def gpt2_body(model: nn.Module, method: str) -> GPT2Model:
    """The GPT2Model: ``model`` itself, or the ``.gpt`` of a task head (``method`` names who asks)."""
    body = model if isinstance(model, GPT2Model) else getattr(model, "gpt", None)
    if not isinstance(body, GPT2Model):
        raise TypeError(f"{method} needs a GPT2Model or a head with one as .gpt, got {type(model).__name__}")
    return body


def _take_over(make: Callable[[Any], nn.Module], old: nn.Module) -> nn.Module:
    """``make(old)`` built on the meta device (its own weights would be thrown away at once), then
    given ``old``'s submodules and training mode."""
    with torch.device("meta"):
        new = make(old)
    if set(dict(new.named_children())) != set(dict(old.named_children())):
        raise TypeError(f"{type(new).__name__} cannot take over the submodules of {type(old).__name__}")
    for name, child in old.named_children():
        setattr(new, name, child)
    return new.train(old.training)


def swap_attention(body: GPT2Model, make: Callable[[CausalSelfAttention], CausalSelfAttention]) -> None:
    """Replace each block's attention by ``make(old)``, which takes over the old layer's weights
    (and its dropout rate, which a caller may have changed: ``tasks.sonnet_dpo``)."""
    for block in body.h:
        old = block.attn
        new = _take_over(make, old)
        new.attn_dropout = old.attn_dropout
        block.attn = new


def swap_blocks(body: GPT2Model, make: Callable[[GPT2Layer], GPT2Layer], layers: Iterable[int] | None = None) -> None:
    """Replace each block (those of ``layers`` if given) by ``make(old)``, which takes over the old
    block's submodules."""
    for i in range(len(body.h)) if layers is None else layers:
        body.h[i] = _take_over(make, body.h[i])
