"""Weight-only quantisation for decoding: int8 (symmetric, one scale per output row) and
int4 (asymmetric, one scale and zero per group of 128 inputs), as ``WeightLayout``s that
replace the float weight (``decoding.decode_weights``), and the policies that choose them.

Why weight-only: a batch-1 decoding step reads every weight once per token, so its time is
the weights' bytes over the memory bandwidth; int8 halves bf16's bytes and int4 halves
int8's, while activations stay in floating point, so the error is the weights' rounding
alone (per-row int8: ~0.4% relative, well under the model's own noise).

Kernels: the project's own kernel (``decoding.cpu_kernels``: float32 activations, int8 or
bfloat16 weights converted to float32 in registers, float32 accumulation) comes closest to the
memory bandwidth at decoding row counts, ahead of PyTorch's ``aten._weight_int8pack_mm`` (which
also rounds the activations to bfloat16) and of oneDNN's packed bfloat16, and its only error is
the weights' rounding. It serves up to 8 rows in int8, where it stays ahead, and up to
``KERNEL_BF16_ROWS`` in bfloat16, beyond which oneDNN's bfloat16 dot products win (see below).
Where it cannot build or run (``cpu_kernels.unavailable()``), PyTorch's kernels serve:
``aten._weight_int8pack_mm`` with bfloat16 activations (with float32 activations it falls back
to a slow reference loop), and dequantise-then-``F.linear`` for prefill, where one dequantisation
is shared by many rows (at one row it costs more than the int8 op). ``aten._weight_int4pack_mm_for_cpu``
serves int4, again fed bfloat16 activations (its float32 path is a reference loop too).
``torchao`` wraps these same ops on CPU; it is not a dependency. On CUDA the int8 layout
dequantises then multiplies (simple, untested here); int4 has no CUDA path here and says so.
The measurements behind these choices are printed by ``benchmarks/decode_kernels.py`` (kernels
per row count) and ``benchmarks/bench.py --quantize ...`` (whole decoding), and tabulated in
docs/quantisation.md.

The tied embedding is quantised once as the LM head (int8 for both int8 and int4, as is usual:
the head is the most sensitive matrix) and serves the input embedding lookups from the same
bytes (``lookup``), so one copy of the vocabulary matrix exists.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import decoding.decode_weights as dw
from decoding import cpu_kernels
from decoding.decode_weights import (
    DECODE_ROWS,
    PackedLayout,
    PlainLayout,
    StandaloneTransposedLayout,
    WeightLayout,
    packing_available,
    rows_of,
)
from errors import InputError

INT4_GROUP = 128
QUANTIZE_CHOICES = ("none", "bf16", "int8", "int4")
_KERNEL_DTYPE = torch.bfloat16  # the activations' dtype inside PyTorch's CPU int8/int4 kernels (see the docstring)
# Rows up to which the project's kernel multiplies bfloat16 weights: at one or two rows the step is
# bound by reading the weights and the kernel wins; from 4 rows its float32 FMAs become the limit and
# oneDNN's bfloat16 dot products (which round the activations) overtake it
# (``benchmarks/decode_kernels.py`` prints both at 1 / 2 / 4 / 8 rows).
KERNEL_BF16_ROWS = 2


class QuantizationUnavailable(InputError, ValueError):
    """The requested quantisation has no kernel for this device or weight shape."""


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> (int8 values in [-127, 127], float32 scales (out,)), symmetric per row:
    ``w ~= q * scale[:, None]``."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)  # (out,)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.to(torch.float32) * scale[:, None]).to(dtype)


def quantize_int4(w: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> (int32 values in [0, 15] (out, in), scales and zeros (in/group, out, 2)),
    per group of ``group`` inputs, in the layout ``aten._weight_int4pack_mm_for_cpu`` reads:
    ``w ~= (q - 8) * scale + zero`` (asymmetric: min and max of each group are kept).

    The kernel stores scale and zero in bfloat16, so they are rounded to it first (held here in
    float32) and q is derived from the rounded values, as gpt-fast does: rounding with the exact
    ones would put a group with an offset up to a step and a half away from what the kernel
    reconstructs; this way every weight stays within half a stored step."""
    n, k = w.shape
    if k % group:
        raise QuantizationUnavailable(f"int4 groups of {group} need in_features divisible by {group}, got {k}")
    g = w.detach().float().reshape(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)  # (out, groups)
    scale = ((hi - lo) / 15).clamp(min=1e-12).to(_KERNEL_DTYPE).float()
    zero = (lo + 8 * scale).to(_KERNEL_DTYPE).float()
    low = zero - 8 * scale  # (out, groups): the value q = 0 stands for, as the kernel computes it
    q = torch.round((g - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).reshape(n, k)
    return q, torch.stack([scale, zero], -1).transpose(0, 1).contiguous()  # (groups, out, 2)


def dequantize_int4(q: torch.Tensor, scale_zero: torch.Tensor, group: int = INT4_GROUP) -> torch.Tensor:
    n, k = q.shape
    sz = scale_zero.transpose(0, 1)  # (out, groups, 2)
    g = (q.reshape(n, k // group, group).float() - 8) * sz[..., :1] + sz[..., 1:]
    return g.reshape(n, k)


def _kernel_call(x: torch.Tensor, op, *args) -> torch.Tensor:
    """``op(x2d_in_bf16, *args)`` reshaped back to x's leading dims and dtype."""
    y = op(x.reshape(-1, x.size(-1)).to(_KERNEL_DTYPE), *args)
    return y.to(x.dtype).reshape(*x.shape[:-1], y.size(-1))


class Int8Layout(WeightLayout):
    """int8 weight, float32 per-row scales; the original weight is not kept. On CPU, up to
    ``cpu_kernels.MAX_ROWS`` float32 rows go through the project's kernel (exact float32
    products), then up to DECODE_ROWS through ``aten._weight_int8pack_mm``; more rows (prefill)
    and other devices dequantise then multiply, where the product's cost dwarfs the conversion."""

    replaces_weight = True

    def __init__(self, weight: torch.Tensor, quantized: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """``quantized``: ``quantize_int8``'s (q, scale) chosen elsewhere (GPTQ), else rounded here."""
        super().__init__(weight)
        self.q, self.scale = quantized or quantize_int8(weight)  # (out, in) int8, (out,) float32
        self._kernel_scale = self.scale.to(_KERNEL_DTYPE)

    def accepts(self, x: torch.Tensor) -> bool:
        return x.is_floating_point()

    def float32_products(self, x: torch.Tensor) -> bool:
        return cpu_kernels.serves(x, self.q)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.float32_products(x):
            return cpu_kernels.lowbit_linear(x, self.q, self.scale, bias)
        if x.device.type == "cpu" and rows_of(x) <= DECODE_ROWS:
            y = _kernel_call(x, torch.ops.aten._weight_int8pack_mm, self.q, self._kernel_scale)
        else:
            y = F.linear(x, self.q.to(x.dtype)) * self.scale.to(x.dtype)
        return y if bias is None else y + bias.to(y.dtype)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of the dequantised weight: the input embedding from the head's bytes."""
        return (self.q[ids].to(torch.float32) * self.scale[ids, None]).to(self.dtype)

    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * self.scale.element_size()


def int4_unavailable(weight: torch.Tensor, group: int = INT4_GROUP) -> str | None:
    """Why int4 cannot hold ``weight`` here (None when it can)."""
    if weight.device.type != "cpu" or not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return (f"int4 weight-only decoding has a kernel here only on the CPU "
                f"(aten._weight_int4pack_mm_for_cpu), not on {weight.device.type}; use --quantize int8 or bf16")
    if weight.size(1) % group:
        return f"int4 groups of {group} need in_features divisible by {group}; this model has {weight.size(1)}"
    return None


class Int4Layout(WeightLayout):
    """int4 weight in groups of INT4_GROUP inputs, packed for ``aten._weight_int4pack_mm_for_cpu``
    (CPU only: ``int4_unavailable`` says why not elsewhere). Every product goes through it."""

    replaces_weight = True

    def __init__(self, weight: torch.Tensor, group: int = INT4_GROUP,
                 quantized: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """``quantized``: ``quantize_int4``'s (q, scale_zero) chosen elsewhere (GPTQ), else rounded here."""
        reason = int4_unavailable(weight, group)
        if reason:
            raise QuantizationUnavailable(reason)
        super().__init__(weight)
        self.group = group
        q, scale_zero = quantized or quantize_int4(weight, group)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)  # (out, in/2) uint8
        self.scale_zero = scale_zero.to(_KERNEL_DTYPE)

    def accepts(self, x: torch.Tensor) -> bool:
        return x.is_floating_point()

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = _kernel_call(x, torch.ops.aten._weight_int4pack_mm_for_cpu, self.packed, self.group, self.scale_zero)
        return y if bias is None else y + bias.to(y.dtype)

    def nbytes(self) -> int:
        return self.packed.numel() + self.scale_zero.numel() * self.scale_zero.element_size()


class Bf16Layout(WeightLayout):
    """A bfloat16 copy of the weight (half of float32's bytes) with everything around the product
    in float32, so the residual stream, LayerNorm, attention and softmax keep float32 precision
    (a whole-model bfloat16 cast rounds the residual stream at every layer, which flips far more
    greedy tokens).

    Up to ``KERNEL_BF16_ROWS`` rows on CPU, the project's kernel (``decoding.cpu_kernels``)
    multiplies float32 activations by the bfloat16 rows directly, accumulating in float32. Other
    products round the activations to bfloat16 for a oneDNN-packed copy where that pays
    (``PackedLayout``; its ``standalone`` keeps the (out, in) rows for the kernel when decoding
    uses few rows, else packs once for them), a plain copy otherwise; without the kernel the tied
    head is a transposed copy. As the head, the copy also serves the input lookups. The float
    weight is not kept."""

    replaces_weight = True

    def __init__(self, weight: torch.Tensor, role: str = "block", inner: WeightLayout | None = None) -> None:
        super().__init__(weight)
        if inner is None:
            w = weight.detach().to(torch.bfloat16)
            if role == "head":
                inner = PlainLayout(w) if _kernel_here(w) else StandaloneTransposedLayout(w)
            elif packing_available(w) and w.numel() >= dw.PACKED_MIN_NUMEL:
                inner = PackedLayout(w)
            else:
                inner = PlainLayout(w)
        self.inner = inner

    def _rows(self) -> torch.Tensor | None:
        """The (out, in) bfloat16 matrix the kernel reads, if the inner layout keeps one."""
        if isinstance(self.inner, PlainLayout):
            return self.inner.weight
        return self.inner.source if isinstance(self.inner, PackedLayout) else None

    def float32_products(self, x: torch.Tensor) -> bool:
        w = self._rows()
        return w is not None and rows_of(x) <= KERNEL_BF16_ROWS and cpu_kernels.serves(x, w)

    def accepts(self, x: torch.Tensor) -> bool:
        return x.is_floating_point()

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.float32_products(x):
            return cpu_kernels.lowbit_linear(x, self._rows(), None, bias)
        y = self.inner.matmul(x.to(self.inner.dtype), None).to(x.dtype)
        return y if bias is None else y + bias.to(y.dtype)

    def standalone(self, rows: int = 1) -> WeightLayout:
        if self.inner.replaces_weight:
            return self
        w = self._rows()
        if w is not None and rows <= KERNEL_BF16_ROWS and _kernel_here(w):
            return Bf16Layout(torch.empty(0, dtype=self.dtype), inner=PlainLayout(w))
        return Bf16Layout(torch.empty(0, dtype=self.dtype), inner=self.inner.standalone(rows))

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return self.inner.lookup(ids).to(self.dtype)


def _kernel_here(w: torch.Tensor) -> bool:
    return w.device.type == "cpu" and cpu_kernels.unavailable() is None


REFINED_LOGITS = 16  # top logits per row recomputed in float32 by a low-precision head


class RefinedHead(WeightLayout):
    """The logits of a low-precision tied head whose kernel returns bfloat16, with each row's
    top ``k`` recomputed in float32 from the layout's own weights (``lookup`` rows): a float32
    dot product of the float32 hidden state with the rounded weight row.

    Why: bfloat16 logits are spaced 1/16 apart around 10, so near the top of a flat distribution
    (a small model's) they tie or swap, and greedy decoding follows another token: on the
    Shakespeare-pretrained model, float32 logits merely rounded to bfloat16 agreed with float32's
    greedy tokens at 0.65 of 128 positions. The k refined logits restore the float32 order among
    the candidates that can win (the rest keep their bfloat16 values, which sampling barely
    notices); the cost is k rows of d per position."""

    replaces_weight = True

    def __init__(self, inner: WeightLayout, k: int = REFINED_LOGITS) -> None:
        self.inner, self.k, self.dtype = inner, k, inner.dtype

    def accepts(self, x: torch.Tensor) -> bool:
        return self.inner.accepts(x)

    def float32_products(self, x: torch.Tensor) -> bool:
        return self.inner.float32_products(x)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = self.inner.matmul(x, bias)
        if self.inner.float32_products(x):
            return y  # already float32 products of the rounded rows: nothing to refine
        idx = y.topk(min(self.k, y.size(-1)), dim=-1).indices  # (..., k)
        exact = (self.inner.lookup(idx).float() @ x.float().unsqueeze(-1)).squeeze(-1)  # (..., k)
        if bias is not None:
            exact = exact + bias.float()[idx]
        return y.scatter(-1, idx, exact.to(y.dtype))

    def standalone(self, rows: int = 1) -> WeightLayout:
        inner = self.inner.standalone(rows)
        return self if inner is self.inner else RefinedHead(inner, self.k)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return self.inner.lookup(ids)


def bf16_layouts(role: str, weight: torch.Tensor) -> WeightLayout:
    """Every block linear and the tied head as a bfloat16 copy, float32 around the products
    (the head's top logits refined in float32)."""
    layout = Bf16Layout(weight, role)
    return RefinedHead(layout) if role == "head" else layout


def int8_layouts(role: str, weight: torch.Tensor) -> WeightLayout:
    """Every block linear and the tied head in int8 (the head's top logits refined in float32)."""
    return RefinedHead(Int8Layout(weight)) if role == "head" else Int8Layout(weight)


def int4_layouts(role: str, weight: torch.Tensor) -> WeightLayout:
    """Block linears in int4 (raising ``QuantizationUnavailable`` where no kernel fits), the
    tied head in int8 (its top logits refined in float32)."""
    return RefinedHead(Int8Layout(weight)) if role == "head" else Int4Layout(weight)


def check_quantize(quantize: str, device: torch.device | str, hidden_size: int | None = None) -> None:
    """Raise ``QuantizationUnavailable`` (one line: what and what to do) before any work when
    ``quantize`` cannot run on ``device`` or a model of ``hidden_size``."""
    if quantize not in QUANTIZE_CHOICES:
        raise QuantizationUnavailable(f"unknown quantisation {quantize!r}; choose from {QUANTIZE_CHOICES}")
    if quantize == "int4":
        reason = int4_unavailable(torch.empty(1, hidden_size or INT4_GROUP, device=device))
        if reason:
            raise QuantizationUnavailable(reason)


class _DequantizedProduct(torch.autograd.Function):
    """``x @ dequantize(*stored)^T`` saving only the stored (quantised) tensors for the backward
    pass: the input's gradient dequantises again instead of keeping a float copy of every layer's
    weight alive between forward and backward (QLoRA's memory saving). The weight gets no gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dequantize, *stored: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(*stored)
        ctx.dequantize = dequantize
        return F.linear(x, dequantize(*stored).to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        stored = ctx.saved_tensors
        return grad @ ctx.dequantize(*stored).to(grad.dtype), None, *(None for _ in stored)


class QuantizedLinear(torch.nn.Module):
    """A frozen ``nn.Linear`` stored quantised (buffers, not parameters: it never trains); the base
    of a LoRA / DoRA adapter on a quantised model. A subclass registers its buffers, names them in
    ``stored`` and says in ``dequantize`` how they become the float32 weight; the product rebuilds
    it in the forward pass and again for the backward pass. ``weight`` is the dequantised weight,
    for DoRA's norms and for merging."""

    kind = ""  # the storage, as the module's repr names it

    def __init__(self, bias: torch.Tensor | None, dtype: torch.dtype, out_features: int, in_features: int) -> None:
        super().__init__()
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.dtype = dtype
        self.out_features, self.in_features = out_features, in_features

    def stored(self) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def dequantize(self, *stored: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantize(*self.stored()).to(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _DequantizedProduct.apply(x, self.dequantize, *self.stored())
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.kind}"


class Int8Linear(QuantizedLinear):
    """int8 with per-row scales (``quantize_int8``)."""

    kind = "int8"

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__(bias, dtype, *q.shape)
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> Int8Linear:
        q, scale = quantize_int8(linear.weight)
        return cls(q, scale.to(linear.weight.device), linear.bias, linear.weight.dtype)

    def stored(self) -> tuple[torch.Tensor, ...]:
        return self.q, self.scale

    def dequantize(self, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return dequantize_int8(q, scale)
