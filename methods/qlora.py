"""QLoRA's idea from the command line (``--quantize_base int8|int4``): LoRA or DoRA adapters that
train in float over a frozen base stored quantised.

Dettmers et al. (2023) store the pretrained weights in 4-bit NF4 and train float adapters over
them. Here the base of each adapted linear (a ``decoding.quant.QuantizedLinear``) is stored on the
grids this project's decoding kernels already use, not NF4: int8 with a symmetric scale per output
row (``decoding.quant.Int8Linear``), or int4 with an asymmetric scale and zero per group of 64
inputs, QLoRA's block size (32 for a layer whose width 64 does not divide), rounded as
``decoding.quant.quantize_int4`` rounds.
The float weight is rebuilt from the stored one in the forward pass and again for the backward
pass, and never kept between them, so the frozen base costs a quarter (int8) or an eighth (int4)
of its float32 memory. The weight gets no gradient; the input does. Biases, LayerNorms, the
embeddings, the task head and the layers LoRA does not target stay float32.

For decoding, ``methods.lora.LoRALinear.folded`` merges the adapter into the dequantised base,
as PEFT's ``merge_and_unload`` does for a QLoRA model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from decoding.quant import Int8Linear, QuantizationUnavailable, QuantizedLinear, dequantize_int4, quantize_int4

QUANTIZE_BASE = ("none", "int8", "int4")  # --quantize_base choices
GROUPS = (64, 32)  # int4 group sizes, the first that divides a layer's input width is used


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(out, in) values 0..15 -> (out, in / 2) bytes, two values each (even column in the low nibble)."""
    q = q.to(torch.uint8)
    return q[:, ::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.size(0), -1)


class Int4Linear(QuantizedLinear):
    """int4 values, two per byte, with a bfloat16-rounded scale and zero per group of ``group`` inputs."""

    kind = "int4"

    def __init__(self, q: torch.Tensor, scale_zero: torch.Tensor, bias: torch.Tensor | None,
                 dtype: torch.dtype, group: int) -> None:
        super().__init__(bias, dtype, *q.shape)
        self.group = group
        self.register_buffer("q", pack_int4(q))
        self.register_buffer("scale_zero", scale_zero)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int4Linear:
        group = next((g for g in GROUPS if linear.in_features % g == 0), None)
        if group is None:
            raise QuantizationUnavailable(f"--quantize_base int4 needs layer widths divisible by {GROUPS[-1]}, got "
                                          f"{linear.in_features}; use --quantize_base int8")
        q, scale_zero = quantize_int4(linear.weight, group)
        return cls(q, scale_zero.to(linear.weight.device), linear.bias, linear.weight.dtype, group)

    def stored(self) -> tuple[torch.Tensor, ...]:
        return self.q, self.scale_zero

    def dequantize(self, q: torch.Tensor, scale_zero: torch.Tensor) -> torch.Tensor:
        return dequantize_int4(unpack_int4(q), scale_zero, self.group)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group={self.group}"


def base_layer_for(quantize_base: str) -> Callable[[nn.Linear], nn.Module] | None:
    """What ``methods.lora.apply_lora`` turns each adapted base linear into (None: it stays float)."""
    if quantize_base not in QUANTIZE_BASE:
        raise ValueError(f"quantize_base must be one of {QUANTIZE_BASE}, got {quantize_base!r}")
    return {"none": None, "int8": Int8Linear.from_linear, "int4": Int4Linear.from_linear}[quantize_base]


def float_linear(base: nn.Module) -> nn.Linear:
    """A float ``nn.Linear`` holding a quantised base's dequantised weight and its bias."""
    linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                       device=base.weight.device, dtype=base.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(base.weight)
        if base.bias is not None:
            linear.bias.copy_(base.bias)
    return linear.requires_grad_(False)
