"""The course's AdamW (``optimizer.AdamW``) on lists of tensors at once: what the Trainer trains with.

The readable loop launches several small operations per parameter; ``torch._foreach_*`` runs
each operation of the update over a whole list of tensors, which on CUDA is a handful of kernel
launches for all parameters of a group. On the CPU the lists are cut into cache-sized blocks
(``FOREACH_BLOCK``), so the update's eight passes find their tensors still in cache after the
first, and the ``sqrt(v) + eps`` temporary is a small buffer the allocator reuses rather than a
fresh parameter-sized allocation on every step. Each element goes through the same float
operations in the same order as in the loop, so the parameters and moments are the loop's bit
for bit (``tests/test_optimizer.py``): the Trainer can use this one without changing a result.

Parameters sharded by FSDP (``DTensor``) are updated through their local shards: the update is
elementwise, so each rank updating its own slice is the whole update, with no communication
(and no reshaping of unevenly sharded tensors, which DTensor refuses).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from optimizer import AdamW

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed support
    DTensor = None

# Elements per slice list of the multi-tensor update on the CPU: 5 float32 arrays of 256K elements
# (5 MB) stay in the last-level cache, and each slice is large enough for all threads of an op.
FOREACH_BLOCK = 1 << 18


class FastAdamW(AdamW):
    """``AdamW`` with the multi-tensor update (``foreach=False`` in a group: the loop)."""

    def update_group(self, group: dict[str, Any]) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if group["foreach"] is False or not params:
            super().update_group(group)
            return
        by_step: dict[int, list[torch.Tensor]] = {}
        for p in params:  # parameters added later have their own step counts
            by_step.setdefault(self.count_step(p)["step"], []).append(p)
        for t, ps in by_step.items():
            self._update(group, ps, t)

    def _update(self, group: dict[str, Any], params: list[torch.Tensor], t: int) -> None:
        beta1, beta2 = group["betas"]
        step_size = self.step_size(group, t)
        block = FOREACH_BLOCK if params[0].device.type == "cpu" else None  # CUDA: one launch per op
        tensors = ([_local(x) for x in xs] for xs in (
            params, [p.grad for p in params], [self.state[p]["exp_avg"] for p in params],
            [self.state[p]["exp_avg_sq"] for p in params]))
        for ps, gs, ms, vs in _blocks(*tensors, size=block):
            torch._foreach_mul_(ms, beta1)
            torch._foreach_add_(ms, gs, alpha=1.0 - beta1)
            torch._foreach_mul_(vs, beta2)
            torch._foreach_addcmul_(vs, gs, gs, value=1.0 - beta2)
            denom = torch._foreach_sqrt(vs)
            torch._foreach_add_(denom, group["eps"])
            torch._foreach_addcdiv_(ps, ms, denom, value=-step_size)
            if group["weight_decay"] > 0.0:
                torch._foreach_add_(ps, ps, alpha=-group["lr"] * group["weight_decay"])


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP parameter, gradient or moment (a view: updates land in it)."""
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


def _blocks(*lists: list[torch.Tensor], size: int | None) -> Iterator[tuple[list[torch.Tensor], ...]]:
    """Parallel lists of tensors cut into aligned 1-D slices, grouped into lists of about ``size``
    elements (small tensors share a list, large ones are split). A tensor whose partners do not
    all share its layout (not contiguous) goes whole into a list of its own. ``size=None``: the
    lists as they are."""
    if size is None:
        yield lists
        return
    out: list[list[torch.Tensor]] = [[] for _ in lists]
    n = 0
    for ts in zip(*lists):
        numel = ts[0].numel()
        if not all(x.is_contiguous() for x in ts):
            yield tuple([x] for x in ts)
            continue
        flat = [x.view(-1) for x in ts]
        for s in range(0, numel, size):
            e = min(s + size, numel)
            for o, f in zip(out, flat):
                o.append(f[s:e])
            n += e - s
            if n >= size:
                yield tuple(out)
                out, n = [[] for _ in lists], 0
    if n:
        yield tuple(out)


__all__ = ["FOREACH_BLOCK", "FastAdamW"]
