"""Quantisation-aware training (QAT): train with each weight replaced, in the forward pass, by
the int8 / int4 value that decoding will store (``decoding.quant``'s grids and groups), while the
gradient passes straight through the rounding to the float weight (the straight-through estimator,
Bengio et al. 2013; Jacob et al. 2018).

Why: round-to-nearest after training moves every weight by up to half a step, and the model
never learnt to tolerate that; under QAT the loss is the quantised model's loss, so training
steers the float weights towards values whose rounding costs little. The float weights stay the
trained state (the optimizer updates them by the straight-through gradient, which is why small
updates can move a weight across a rounding boundary at all).

Exactness: the fake-quantised weight is ``dequantize(quantize(w))`` with ``decoding.quant``'s own
functions, and ``remove_qat`` gives back the float weights whose round-to-nearest export
(``--quantize int8|int4``) is that same grid, so the exported model computes the forward that
trained (up to the kernels' summation order; the int4 kernel also rounds activations to bfloat16).
What is rounded is what ``--quantize`` rounds: every linear of the transformer blocks (int8 per
row, or int4 in groups of ``INT4_GROUP``), and the tied embedding in int8 in both cases (it is the
LM head and serves the input lookups from the same bytes). Biases, LayerNorms and the position
embedding stay float, as in decoding. The tied embedding is read twice per forward (lookup and
head): the loss that trains it runs under ``torch.nn.utils.parametrize.cached()``
(``tasks.lm.causal_lm_loss``), so it is rounded once.

    apply_qat(model, "int4")      # before the optimizer is built: parameters keep their identity
    ... train ...
    remove_qat(model)             # plain float weights again, before save_model / export
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from decoding.quant import (
    INT4_GROUP,
    QuantizationUnavailable,
    dequantize_int4,
    dequantize_int8,
    quantize_int4,
    quantize_int8,
)
from models.gpt2 import GPT2Model

QAT_CHOICES = ("none", "int8", "int4")


def fake_quantize(w: torch.Tensor, bits: int, group: int = INT4_GROUP) -> torch.Tensor:
    """The float values decoding multiplies by for weight ``w`` (out, in), without gradient."""
    with torch.no_grad():
        rounded = dequantize_int8(*quantize_int8(w)) if bits == 8 else dequantize_int4(*quantize_int4(w, group), group)
    return rounded.to(w.dtype)


class _StraightThrough(torch.autograd.Function):
    """The rounded weight forward (exactly: ``w + (round(w) - w).detach()`` can be off by an ulp),
    the identity backward."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
        return fake_quantize(w, bits, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None, None


class FakeQuantize(nn.Module):
    """A parametrization of a weight: forward value the rounded weight, gradient the identity."""

    def __init__(self, bits: int, group: int = INT4_GROUP) -> None:
        super().__init__()
        self.bits, self.group = bits, group

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return _StraightThrough.apply(w, self.bits, self.group)

    def extra_repr(self) -> str:
        return f"int{self.bits}" + (f", group={self.group}" if self.bits == 4 else "")


def _bits(choice: str) -> int:
    if choice not in QAT_CHOICES[1:]:
        raise ValueError(f"QAT choices are {QAT_CHOICES[1:]}, got {choice!r}")
    return int(choice[3])


def qat_targets(model: nn.Module, choice: str) -> list[tuple[nn.Module, int]]:
    """(module, bits) of every weight QAT ``choice`` rounds in ``model``'s GPT-2 bodies: what
    ``--quantize`` of the same name rounds (see the module docstring)."""
    bits = _bits(choice)
    out: list[tuple[nn.Module, int]] = []
    for body in (m for m in model.modules() if isinstance(m, GPT2Model)):
        for m in body.h.modules():
            if isinstance(m, nn.Linear):
                if bits == 4 and m.in_features % INT4_GROUP:
                    raise QuantizationUnavailable(f"--qat int4: groups of {INT4_GROUP} need in_features divisible "
                                                  f"by {INT4_GROUP}; this model has {m.in_features}")
                out.append((m, bits))
        out.append((body.wte, 8))  # the tied head: int8 under both --quantize int8 and int4
    if not out:
        raise TypeError(f"QAT needs a GPT2Model inside the model, found none in {type(model).__name__}")
    return out


def apply_qat(model: nn.Module, choice: str) -> nn.Module:
    """Fake-quantise ``model``'s weights as ``choice`` (``int8`` / ``int4``; ``none``: nothing) in
    every forward from now on. The parameters stay the same objects (moved under
    ``parametrizations.weight.original``), so call it before the optimizer is built, and
    ``remove_qat`` before saving a model for others to load."""
    if choice == "none":
        return model
    for module, bits in qat_targets(model, choice):
        if not parametrize.is_parametrized(module, "weight"):
            parametrize.register_parametrization(module, "weight", FakeQuantize(bits))
    return model


def remove_qat(model: nn.Module) -> nn.Module:
    """The float weights back as plain parameters (their rounding is what the forward used)."""
    for m in model.modules():
        if parametrize.is_parametrized(m, "weight") and any(
                isinstance(p, FakeQuantize) for p in m.parametrizations["weight"]):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)
            # weight first again (it came back after the bias): the state_dict's order of a plain model
            m._parameters = {"weight": m._parameters.pop("weight"), **m._parameters}
    return model


def has_qat(model: nn.Module) -> bool:
    return any(isinstance(m, FakeQuantize) for m in model.modules())


__all__ = ["QAT_CHOICES", "FakeQuantize", "apply_qat", "fake_quantize", "has_qat", "qat_targets", "remove_qat"]
