"""More than one process: torchrun's process group, ranks, and what the engine needs of them.

``torchrun --nproc_per_node N script.py ...`` starts N copies of a task script with ``RANK``,
``LOCAL_RANK`` and ``WORLD_SIZE`` set. ``setup`` (called by ``tasks.common.start``) joins the
process group -- NCCL on CUDA, Gloo on the CPU -- with a timeout (``GPT2_DIST_TIMEOUT`` seconds,
default 1800), so a rank that stops answering ends the job with an error instead of a hang;
a rank that raises exits non-zero and torchrun stops the others. Outside torchrun nothing
here does anything: every helper is the identity of one process, so a single-process run is
exactly what it was.

What the engine takes from here:

- ``rank``/``world_size``/``is_main``: only rank 0 writes files and prints (``setup`` sends
  the other ranks' stdout to /dev/null; their errors still reach stderr).
- ``on_main(fn)``: ``fn`` runs on rank 0 (claiming the run folder, checking a resume) and the
  others get its result -- or raise its error, so every rank stops with the same message.
- ``ShardedSampler``: each rank's share of every global batch, cut from the one shuffled order
  the single-process loader would draw (seeded shuffling, length grouping and mid-epoch resume
  keep working unchanged).
- ``wrap``: the model under ``DistributedDataParallel``, or FSDP2 (``fully_shard`` per
  transformer block) with ``fsdp=True``; ``sync_gradients`` is ``no_sync`` for both.
- ``full_state_dict`` / ``load_full_state_dict`` and the optimizer's: FSDP checkpoints are
  gathered into the usual single file, and read back from it.

Evaluation runs on rank 0 alone, over the whole dev set, while the others wait
(``on_main_unsharded``), rather than sharded over the ranks and gathered: a task's ``eval_fn``
is any function of the model (accuracy over a loader, chrF of generated sonnets, held-out
loss), so only running it as one process would gives the one-process metrics for every task
without each task learning to shard and gather; the price is that the other ranks idle for
the length of one evaluation (and the process-group timeout must exceed it).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import RandomSampler, Sampler

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 1800


def launched() -> bool:
    """Started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """A process group of more than one rank is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def setup(device: torch.device) -> torch.device:
    """Join torchrun's process group (once) and return this rank's device: ``cuda:LOCAL_RANK``
    on CUDA, the CPU otherwise. Without torchrun: ``device`` unchanged and no group."""
    if not launched():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = dt.timedelta(seconds=float(os.environ.get("GPT2_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
        atexit.register(teardown)
        if not is_main():  # one copy of every log line: rank 0's
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (kept open for the process's life)
    return device


def teardown() -> None:
    """Leave the process group (at the end of a task run; also harmless when there is none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` for one process)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def on_main(fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0 only; every rank returns its result, or raises the error it raised."""
    if not active():
        return fn()
    outcome: tuple[bool, Any] = (True, None)
    if is_main():
        try:
            outcome = (True, fn())
        except Exception as e:  # handed to the other ranks, then raised here too
            outcome = (False, e)
    ok, value = broadcast_object(outcome)
    if not ok:
        raise value
    return value


def sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """The sum of ``x`` over all ranks (``x`` itself for one process)."""
    if active():
        x = x.clone()
        dist.all_reduce(x)
    return x


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    return sum_over_ranks(x) / world_size() if active() else x


# ------------------------------------------------------------------ data


class ShardedSampler(Sampler[int]):
    """This rank's share of each global batch of ``base``'s order.

    ``base`` yields the order one process would train on (a ``RandomSampler`` drawing from the
    global torch RNG, or a ``LengthGroupedSampler`` built with the global batch size); it is cut
    into global batches of ``world * batch_size`` and rank ``r`` takes the ``r``-th of ``world``
    near-equal slices of each, so that N ranks of batch B step as one process of batch N x B.
    The shuffle seed is rank 0's draw, broadcast, so the ranks' orders agree even after their
    RNGs part (dropout draws differ per rank). A last global batch with fewer examples than
    ranks is padded from its start (as ``DistributedSampler`` pads); every rank gets the same
    number of batches, or the gradient all-reduce would wait forever.
    """

    def __init__(self, base: Sampler[int], batch_size: int, rank: int | None = None,
                 world: int | None = None) -> None:
        self.base, self.batch_size = base, batch_size
        self.rank = globals()["rank"]() if rank is None else rank
        self.world = world_size() if world is None else world

    @property
    def generator(self) -> torch.Generator | None:
        """The base's generator, which ``engine.rng`` saves and restores for exact resume."""
        return getattr(self.base, "generator", None)

    def _order(self) -> list[int]:
        if not isinstance(self.base, RandomSampler) or self.base.generator is not None:
            return list(self.base)
        # A RandomSampler on the global RNG: rank 0's seed, drawn exactly as RandomSampler draws it.
        seed = broadcast_object(int(torch.empty((), dtype=torch.int64).random_().item()))
        return torch.randperm(len(self.base), generator=torch.Generator().manual_seed(seed)).tolist()

    def __len__(self) -> int:
        full, rest = divmod(len(self.base), self.world * self.batch_size)
        last = max(rest, self.world) if rest else 0  # the padded last global batch
        return full * self.batch_size + (last * (self.rank + 1)) // self.world - (last * self.rank) // self.world

    def __iter__(self) -> Iterator[int]:
        order = self._order()
        g = self.world * self.batch_size
        for s in range(0, len(order), g):
            group = order[s : s + g]
            if len(group) < self.world:
                group = (group * self.world)[: self.world]
            lo, hi = (len(group) * self.rank) // self.world, (len(group) * (self.rank + 1)) // self.world
            yield from group[lo:hi]


# ------------------------------------------------------------------ model


class Call(nn.Module):
    """A module whose forward is ``fn(model, *args)``: DDP and FSDP hook a module's forward,
    and a task's loss may call any method of its model (``model.loss``, ``model.p_yes``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(self.model, *args)


def _blocks(model: nn.Module) -> list[nn.Module]:
    from modules.gpt2_layer import GPT2Layer

    return [m for m in model.modules() if isinstance(m, GPT2Layer)]


def wrap(model: nn.Module, device: torch.device, fsdp: bool = False) -> nn.Module | None:
    """``Call(model)`` under DDP, or sharded by FSDP2 (each transformer block, then the rest;
    bf16 parameters with fp32 gradient reduction on CUDA). None with one process.
    Build the optimizer after this: FSDP replaces the parameters by sharded ones."""
    if not active():
        return None
    root = Call(model)
    if not fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(root, device_ids=[device] if device.type == "cuda" else None, find_unused_parameters=True)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if device.type == "cuda" else MixedPrecisionPolicy()
    for block in _blocks(model):
        fully_shard(block, mp_policy=mp)
    fully_shard(root, mp_policy=mp)
    return root


def is_fsdp(wrapped: nn.Module | None) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(wrapped, FSDPModule)


@contextlib.contextmanager
def sync_gradients(wrapped: nn.Module | None, sync: bool) -> Iterator[None]:
    """Gradient all-reduce on (the last micro-batch of a group) or off (the others)."""
    if wrapped is None or sync:
        if is_fsdp(wrapped):
            wrapped.set_requires_gradient_sync(True)
        yield
    elif is_fsdp(wrapped):
        wrapped.set_requires_gradient_sync(False)
        yield
    else:
        with wrapped.no_sync():
            yield


def _fsdp_modules(wrapped: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in wrapped.modules() if isinstance(m, FSDPModule)]


def unshard(wrapped: nn.Module | None) -> None:
    """Gather an FSDP model's full weights on every rank and keep them, so that any rank alone
    can run it (evaluation on rank 0, the task's predictions after training). Collective."""
    if is_fsdp(wrapped):
        for m in _fsdp_modules(wrapped):
            m.set_reshard_after_forward(False)
            m.unshard()


def reshard(wrapped: nn.Module | None) -> None:
    """Back to training: shards only, freed after each block's forward. Local. Forgets the forward
    order FSDP recorded for its backward prefetching: rank 0's evaluation passes, which the
    other ranks did not run, would otherwise make its next backward gather other blocks than
    theirs (a deadlock)."""
    if is_fsdp(wrapped):
        wrapped.reset_iter_state()
        for m in _fsdp_modules(wrapped):
            m.reshard()
            m.set_reshard_after_forward(True)


def on_main_unsharded(wrapped: nn.Module | None, fn: Callable[[], T]) -> T:
    """``on_main(fn)`` with an FSDP model's full weights on every rank meanwhile (rank 0 alone
    runs it; the others wait), sharded again after."""
    unshard(wrapped)
    try:
        return on_main(fn)
    finally:
        reshard(wrapped)


def _options(**kw: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_state_dict(model: nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The whole (or only the trainable) weights of an FSDP-sharded ``model`` as plain CPU tensors
    on rank 0 (an empty dict elsewhere). Collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_options(cpu_offload=True))
    if trainable_only:
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k in names}
    return state


def load_full_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], partial: bool = False) -> None:
    """Put a full state dict (read by every rank) into an FSDP-sharded ``model``."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, dict(state), options=_options(strict=not partial))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=_options())


__all__ = [
    "Call", "ShardedSampler", "active", "barrier", "broadcast_object", "full_optimizer_state", "full_state_dict",
    "gather_objects", "is_fsdp", "is_main", "launched", "load_full_optimizer_state",
    "load_full_state_dict", "mean_over_ranks", "on_main", "on_main_unsharded", "rank", "reshard", "setup",
    "sum_over_ranks", "sync_gradients", "teardown", "unshard", "wrap", "world_size",
]
