"""A compiled decoding step (``--compile_decode``): ``torch.compile`` of the one-token step of
``decoding.static_cache.StaticDecoder``, whose shapes depend only on the rows and the maximum
length, so it compiles once per (rows, maximum length) and never per layer or per position.

Why: at batch 1 a GPT-2 step is a few dozen small kernels, and eager Python and dispatch
between them cost as much as the kernels (on a GPU, far more): the compiled step fuses the
elementwise work (inductor on the CPU) and on CUDA replays the whole step as one CUDA graph
(``mode="reduce-overhead"``; the cache's tensors are marked as static addresses, so the graph
writes into them in place). The prompt is run eagerly (its length varies).

The step is captured whole (``fullgraph=True``): a graph break (a weight layout calling a C++
kernel dynamo cannot trace, as the int8 / bf16 decoding layouts of ``decoding.quant`` do) would
otherwise split the step at every layer and recompile it per layer index. Compilation is lazy
and may fail (no C++ compiler, an unsupported op, such a graph break): the step then falls
back to eager (still on the static cache) with one warning line, and decodes the same tokens.

    fast = compile_decoding(prepare_for_decoding(model))
    out = generate(fast, ids, mask, max_new_tokens=64)
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch
from torch import nn

from decoding.static_cache import StaticDecoder, StaticKVCache, static_forward


def cuda_graphs(device: torch.device) -> bool:
    """Whether the step on ``device`` replays as a CUDA graph (``mode="reduce-overhead"``)."""
    return device.type == "cuda"


class CompiledStep:
    """``static_forward`` compiled once per shape, or eager for good after the first failure."""

    def __init__(self, **compile_kwargs: Any) -> None:
        self.compile_kwargs = compile_kwargs
        self.compiled = None  # the torch.compile wrapper, built at the first step (its device picks the mode)
        self.failed = False
        self.marked: list[weakref.ref] = []  # the cache tensors last marked static (weakly: no storage kept alive)

    def __call__(self, body: nn.Module, ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor,
                 cache: StaticKVCache) -> torch.Tensor:
        if self.failed:
            return static_forward(body, ids, position_ids, mask, cache)
        cuda = cuda_graphs(ids.device)
        if self.compiled is None:
            kwargs = {"mode": "reduce-overhead" if cuda else None, "dynamic": False, "fullgraph": True,
                      **self.compile_kwargs}
            self.compiled = torch.compile(static_forward, **kwargs)
        if cuda:  # CUDA graphs write the cache in place instead of copying it in and out
            self._mark_static(cache.step_tensors())
        try:
            hidden = self.compiled(body, ids, position_ids, mask, cache)
        except Exception as e:  # noqa: BLE001 - any compiler failure means: decode eagerly
            self.failed = True
            reason = (str(e).strip().splitlines() or [""])[0][:200]
            warnings.warn(f"compiling the decoding step failed, decoding eagerly instead "
                          f"({type(e).__name__}: {reason})", stacklevel=2)
            return static_forward(body, ids, position_ids, mask, cache)
        return hidden.clone() if cuda else hidden  # a CUDA graph's output is overwritten by the next replay

    def _mark_static(self, tensors: tuple[torch.Tensor, ...]) -> None:
        """Mark the cache's tensors as static addresses once, not at every step: again only when the
        cache changes (a new cache, or new storage when beam search changes the row count)."""
        if len(tensors) == len(self.marked) and all(r() is t for r, t in zip(self.marked, tensors)):
            return
        for t in tensors:
            torch._dynamo.mark_static_address(t)
        self.marked = [weakref.ref(t) for t in tensors]


def compile_decoding(model: nn.Module, **compile_kwargs: Any) -> StaticDecoder:
    """``model`` (a ``GPT2Model`` or an ``InferenceModel``) as a ``DecoderLM`` with a static cache
    and a compiled step; ``compile_kwargs`` go to ``torch.compile`` (default: inductor, the whole
    step as one graph, ``mode="reduce-overhead"`` on CUDA)."""
    return StaticDecoder(model, CompiledStep(**compile_kwargs))
