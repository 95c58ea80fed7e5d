"""Decode-time copies of weights: during a decoding step (a few rows, no autograd, CPU)
a linear multiplies by a cached copy of its weight in a faster layout instead of calling
``F.linear``. A batch-1 decoding step only streams weights through matrix-vector products,
and ``F.linear`` reads the (out, in) layout at about half the machine's bandwidth; oneDNN's
prepacked layout reads it at about the speed of one large product (gpt2, 2 threads: 48 block
products 24 ms -> 14 ms). Copies are rebuilt whenever a weight changes and are never saved.
Used by the block's linears (``with_decode_weights``) and the tied-embedding logits
(``models.gpt2.GPT2Model.hidden_state_to_token``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# Up to this many rows, products without autograd on CPU use cached decode-time weight copies.
DECODE_ROWS = 64
# Smaller block weights stay on F.linear: a matrix that fits in cache gains nothing from packing, and
# the packed call's fixed cost made a d=256 model's float32 decoding ~7% slower.
PACKED_MIN_NUMEL = 1 << 18
# Below this width, one-row logits multiply by a transposed embedding copy even on several threads.
ONE_ROW_PACKED_MIN_D = 512
HAS_PACKED_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
_PACKED_DTYPES = {torch.float32} | (
    {torch.bfloat16} if HAS_PACKED_LINEAR and torch.ops.mkldnn._is_mkldnn_bf16_supported() else set())


class DecodeWeights(dict):
    """Derived copies of weights for decoding; copies and pickles of a module start empty
    (an oneDNN-packed tensor can be neither deep-copied nor pickled)."""

    def __deepcopy__(self, memo: dict) -> DecodeWeights:
        return DecodeWeights()

    def __reduce__(self):
        return (DecodeWeights, ())


def decode_path(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``x @ w.T`` is a decoding step that may use a cached packed copy of ``w``: one new
    position per row (prefill keeps ``F.linear``), at most DECODE_ROWS rows, CPU, a dtype oneDNN
    packs, and nothing to differentiate (the packed product has no autograd formula)."""
    return (HAS_PACKED_LINEAR and w.device.type == "cpu" and x.dtype == w.dtype and w.dtype in _PACKED_DTYPES
            and (x.dim() < 3 or x.size(-2) == 1) and 0 < x.numel() <= DECODE_ROWS * x.size(-1)
            and not (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad)))


def decode_weight(owner: nn.Module, w: torch.Tensor, rows: int) -> torch.Tensor:
    """``w`` prepacked for oneDNN for products with ``rows`` rows, cached on ``owner`` (not in its
    state_dict) and rebuilt whenever ``w`` changes: new storage, dtype or device, or any in-place
    update, which bumps the tensor's version counter (optimizer steps, load_state_dict, LoRA
    merges). One row gets the layout packed for a matrix-vector product, which streams a large
    matrix far faster (gpt2's (V, d) embedding: 35 GB/s against 26 GB/s); 2 to DECODE_ROWS rows
    the one packed for 8 rows. A weight used both ways keeps both copies."""
    hint = 1 if rows == 1 else 8
    return _cached(owner, w, hint, lambda wd: torch.ops.mkldnn._reorder_linear_weight(wd, hint))


def transposed_weight(owner: nn.Module, w: torch.Tensor) -> torch.Tensor:
    """``w`` transposed to a contiguous (in, out) copy, cached like ``decode_weight``: for one
    row, ``x @ w.T`` is then a plain vector-matrix product, the fastest way through a tall,
    narrow matrix (the (V, d) embedding) on one thread or at small d (see ``one_row_transposed``)."""
    return _cached(owner, w, "t", lambda wd: wd.t().contiguous())


def one_row_transposed(w: torch.Tensor) -> bool:
    """Whether a one-row product with the embedding should use ``transposed_weight`` rather than
    the packed copy. Measured on 2 cores (ms for one row, V = 50257): on one thread the
    transposed copy wins at every width (d=768: 5.9 against 8.9 packed); on two, packing wins
    from d=768 on (5.1 against 5.9) but loses at small d (d=128: 0.82 against 0.67)."""
    return w.dtype == torch.float32 and (torch.get_num_threads() == 1 or w.size(1) < ONE_ROW_PACKED_MIN_D)


def _cached(owner: nn.Module, w: torch.Tensor, kind: int | str, build: Callable[[torch.Tensor], torch.Tensor]):
    key = (w.data_ptr(), w._version, w.dtype, w.device)
    cache = owner.__dict__.setdefault("_decode_weights", DecodeWeights())
    if cache.get(kind, (None,))[0] != key:
        cache.pop(kind, None)  # free the stale copy before building the new one
        cache[kind] = (key, build(w.detach()))
    return cache[kind][1]


def packed_linear(owner: nn.Module, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, w, b)`` through the cached packed copy of ``w`` (when ``decode_path`` holds)."""
    if b is not None and b.dtype != w.dtype:
        b = b.to(w.dtype)
    return torch.ops.mkldnn._linear_pointwise(x, decode_weight(owner, w, x.numel() // x.size(-1)), b, "none", [], "")


def decode_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``nn.Linear.forward`` whose decoding steps (see ``decode_path``) use a cached
    oneDNN-prepacked weight; prefill, training, or off CPU it is ``F.linear``."""
    if self.weight.numel() >= PACKED_MIN_NUMEL and decode_path(x, self.weight):
        return packed_linear(self, x, self.weight, self.bias)
    return F.linear(x, self.weight, self.bias)


def with_decode_weights(linear: nn.Linear) -> nn.Linear:
    """Give one ``nn.Linear`` the decoding fast path, in place: its type, parameters, init and
    state_dict stay those of a plain ``nn.Linear`` (LoRA wraps and unwraps it as usual)."""
    linear.forward = functools.partial(decode_linear_forward, linear)  # picklable, unlike a bound method
    return linear
