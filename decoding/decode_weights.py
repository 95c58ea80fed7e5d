"""Faster weight layouts for CPU decoding steps, and the linear layer that uses them.

A batch-1 decoding step only streams weights through matrix-vector products, and
``F.linear`` reads the (out, in) layout well below the machine's memory bandwidth; oneDNN's
prepacked layout arranges the weight for the product's access pattern and streams it at
about the speed of one large product. A one-row product with the tall (V, d) embedding is
fastest through a plain transposed copy on one thread or at small width. docs/performance.md
and ``benchmarks/bench.py`` give the measured decoding speed.

Nothing here touches a model: ``decoding.inference.prepare_for_inference`` builds a
separate inference copy whose linears are ``DecodeLinear``, so the model, training and
checkpoints see only plain ``nn.Linear``. A prepared copy is a snapshot: the faster
layouts are derived from the weights once (lazily, for the row counts actually
decoded) and never follow later changes; prepare again after changing the weights.

Extension points:
- a new layout (int8 / int4 weight-only quantisation) subclasses ``WeightLayout``:
  it converts the weight once and multiplies by its own representation;
- a layout with ``replaces_weight = True`` serves every product (prefill too), so the
  ``DecodeLinear`` holding it keeps no reference to the original weight: the
  inference-only mode in which the fast layout replaces the weights instead of sitting
  beside them. ``standalone()`` gives each float layout's replacing form (one packed or
  transposed copy, built at once); the int8 / int4 layouts (``decoding.quant``) always replace.
  A replacing head layout with ``lookup`` also serves the input embedding
  (``LayoutEmbedding``), so the tied vocabulary matrix exists once.

The private oneDNN ops (``torch.ops.mkldnn._reorder_linear_weight`` and
``_linear_pointwise``) are used only by ``PackedLayout``, behind ``packing_available``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# Up to this many rows, products without autograd on CPU use the decoding layouts.
DECODE_ROWS = 64
# Smaller block weights stay on F.linear: a matrix that fits in cache gains nothing from packing, and
# the packed call's fixed cost then makes small models (d=256) decode slower, not faster.
PACKED_MIN_NUMEL = 1 << 18
# Below this width, one-row logits multiply by a transposed embedding copy even on several threads.
ONE_ROW_PACKED_MIN_D = 512

_HAS_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
_PACKED_DTYPES = {torch.float32} | (
    {torch.bfloat16} if _HAS_ONEDNN and torch.ops.mkldnn._is_mkldnn_bf16_supported() else set())


def packing_available(w: torch.Tensor) -> bool:
    """Whether oneDNN can prepack ``w`` here (a CPU build with oneDNN, a dtype it packs)."""
    return _HAS_ONEDNN and w.device.type == "cpu" and w.dtype in _PACKED_DTYPES


def one_row_transposed(w: torch.Tensor) -> bool:
    """Whether a one-row product with the embedding should use a transposed copy rather than
    the packed one. Measured on 2 cores (ms for one row, V = 50257): on one thread the
    transposed copy wins at every width (d=768: 5.9 against 8.9 packed); on two, packing wins
    from d=768 on (5.1 against 5.9) but loses at small d (d=128: 0.82 against 0.67)."""
    return w.dtype == torch.float32 and (torch.get_num_threads() == 1 or w.size(1) < ONE_ROW_PACKED_MIN_D)


def rows_of(x: torch.Tensor) -> int:
    return x.numel() // x.size(-1)


class WeightLayout(ABC):
    """One (out, in) weight stored for products with few rows. ``matmul(x, bias)`` equals
    ``F.linear(x, weight, bias)`` for the inputs ``accepts``.

    ``replaces_weight = True`` promises that ``matmul`` serves every input (prefill too) and
    that the layout keeps no reference to ``weight`` (it converts it in ``__init__``), so the
    original can be freed. The layouts here keep one, to build their copies lazily."""

    replaces_weight = False

    def __init__(self, weight: torch.Tensor) -> None:
        self.dtype = weight.dtype

    def accepts(self, x: torch.Tensor) -> bool:
        return x.dtype == self.dtype

    @abstractmethod
    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``F.linear(x, weight, bias)`` through this layout."""

    def float32_products(self, x: torch.Tensor) -> bool:
        """Whether ``matmul(x, ...)`` is already a float32 product of float32 ``x`` with this
        layout's own (possibly rounded) weights, so a ``decoding.quant.RefinedHead`` around it
        has nothing to refine."""
        return False

    def standalone(self, rows: int = 1) -> WeightLayout:
        """This weight in a layout that replaces it (``replaces_weight``): what an inference-only
        model keeps instead of the original, suited to decoding steps of ``rows`` rows (batch
        times beams). Layouts that already replace it return themselves."""
        if self.replaces_weight:
            return self
        raise NotImplementedError(f"{type(self).__name__} has no layout that replaces the weight")

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``weight[ids]`` (the input embedding of a tied head), for layouts that replace the
        embedding matrix."""
        raise NotImplementedError(f"{type(self).__name__} cannot serve embedding lookups")


class TransposedLayout(WeightLayout):
    """A contiguous (in, out) copy: for one row, ``x @ W^T`` becomes a plain vector-matrix
    product, the fastest way through a tall, narrow matrix (see ``one_row_transposed``)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__(weight)
        self.source = weight.detach()  # the weight itself, not a copy: built from at first use
        self._t: torch.Tensor | None = None

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self._t is None:
            self._t = self.source.t().contiguous()  # (in, out)
        y = x @ self._t
        return y if bias is None else y + bias

    def standalone(self, rows: int = 1) -> WeightLayout:
        return StandaloneTransposedLayout(self.source)


class StandaloneTransposedLayout(TransposedLayout):
    """The transposed copy built at once and the original dropped: it serves every product and,
    as a tied head, the embedding lookups (a column gather), so the vocabulary matrix exists once."""

    replaces_weight = True

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__(weight)
        self._t = weight.detach().t().contiguous()  # (in, out): a copy, even of a transposed view
        del self.source

    standalone = WeightLayout.standalone  # already replaces the weight

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return self._t.index_select(1, ids.reshape(-1)).t().reshape(*ids.shape, self._t.size(0))  # (..., d)


def packing_hint(rows: int) -> int:
    """The row count oneDNN packs a weight for: 1 for one-row products, 8 for more."""
    return 1 if rows == 1 else 8


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``F.linear`` through a oneDNN-packed weight of ``dtype`` (the bias cast to it)."""
    if bias is not None and bias.dtype != dtype:
        bias = bias.to(dtype)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLayout(WeightLayout):
    """oneDNN-prepacked copies, one per row regime: one row gets the layout packed for a
    matrix-vector product, which streams a large matrix (such as the (V, d) embedding) faster
    than the one packed for several rows; 2 to DECODE_ROWS rows get the one packed for 8 rows,
    since the matrix-vector layout falls well behind once several rows share each weight read.
    Each is built the first time its regime is used."""

    def __init__(self, weight: torch.Tensor) -> None:
        if not packing_available(weight):
            raise ValueError(f"oneDNN cannot pack a {weight.dtype} weight on {weight.device}")
        super().__init__(weight)
        self.source = weight.detach()  # the weight itself, not a copy: packed at first use per regime
        self._packed: dict[int, torch.Tensor] = {}

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        hint = packing_hint(rows_of(x))
        if hint not in self._packed:
            self._packed[hint] = torch.ops.mkldnn._reorder_linear_weight(self.source, hint)
        return packed_linear(x, self._packed[hint], bias, self.dtype)

    def standalone(self, rows: int = 1) -> WeightLayout:
        return StandalonePackedLayout(self.source, hint=packing_hint(rows))


class StandalonePackedLayout(WeightLayout):
    """One oneDNN copy, built at once, packed for the row count decoding will use (``hint`` 1
    for batch-1 steps, 8 for batches); it serves every row count, so that an inference-only
    model holds each weight once (the trade-off: at several rows the one-row packing is
    slower than the 8-row one, at prefill about as fast)."""

    replaces_weight = True

    def __init__(self, weight: torch.Tensor, hint: int = 1) -> None:
        super().__init__(weight)
        self.hint = hint
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), hint)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return packed_linear(x, self.packed, bias, self.dtype)


class PlainLayout(WeightLayout):
    """The weight as it is given (e.g. a bfloat16 copy), through ``F.linear``: for weights too
    small to gain from packing, and devices without oneDNN. Serves lookups as an embedding."""

    replaces_weight = True

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__(weight)
        self.weight = weight.detach()

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, self.weight, bias)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class TiedHeadLayout(WeightLayout):
    """The logits through the (V, d) embedding: a transposed copy for one row where that is
    faster (``one_row_transposed``), the packed layout otherwise."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__(weight)
        self.transposed = TransposedLayout(weight) if weight.dtype == torch.float32 else None
        self.packed = PackedLayout(weight)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.transposed is not None and rows_of(x) == 1 and one_row_transposed(self.packed.source):
            return self.transposed.matmul(x, bias)
        return self.packed.matmul(x, bias)

    def standalone(self, rows: int = 1) -> WeightLayout:
        return StandaloneTransposedLayout(self.packed.source)  # lookups need plain rows, not oneDNN's blocks


# (role, weight) -> the layout for it, or None to keep F.linear. Roles: "block" (a linear of a
# transformer block, LoRA bases included) and "head" (the tied embedding as the LM head).
LayoutPolicy = Callable[[str, torch.Tensor], "WeightLayout | None"]


def default_layouts(role: str, weight: torch.Tensor) -> WeightLayout | None:
    """oneDNN-packed block weights from PACKED_MIN_NUMEL on, and the tied head (transposed or
    packed by row count), where oneDNN can pack; nothing elsewhere (GPU, no oneDNN)."""
    if not packing_available(weight):
        return None
    if role == "head":
        return TiedHeadLayout(weight)
    return PackedLayout(weight) if weight.numel() >= PACKED_MIN_NUMEL else None


def is_decode_step(x: torch.Tensor, weight: torch.Tensor | None) -> bool:
    """A decoding step: one new position per row (prefill keeps ``F.linear``), at most
    DECODE_ROWS rows, and nothing to differentiate (the layouts have no autograd formula)."""
    return ((x.dim() < 3 or x.size(-2) == 1) and 0 < x.numel() <= DECODE_ROWS * x.size(-1)
            and not (torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad))))


class DecodeLinear(nn.Module):
    """``F.linear(x, weight, bias)`` whose decoding steps go through ``layout``; prefill and
    anything needing gradients use the original weight. ``weight`` and ``bias`` are the
    original parameters, shared, not copied (``LoRALinear`` reads them through its base)."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, layout: WeightLayout) -> None:
        super().__init__()
        self.layout = layout
        self.weight = None if layout.replaces_weight else weight
        self.bias = bias
        self.in_features, self.out_features = weight.size(1), weight.size(0)

    @classmethod
    def from_linear(cls, linear: nn.Linear, layout: WeightLayout) -> DecodeLinear:
        return cls(linear.weight, linear.bias, layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None or (self.layout.accepts(x) and is_decode_step(x, self.weight)):
            return self.layout.matmul(x, self.bias)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, layout={type(self.layout).__name__}"


class LayoutEmbedding(nn.Module):
    """The input embedding of an inference-only model whose tied head layout replaced the
    vocabulary matrix: lookups read the layout's own representation (``WeightLayout.lookup``)."""

    def __init__(self, layout: WeightLayout) -> None:
        super().__init__()
        self.layout = layout

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.layout.lookup(ids)  # (..., d)
