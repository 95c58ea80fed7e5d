"""More than one process: torchrun's process group, and the DDP and FSDP strategies of the loop.

``torchrun --nproc_per_node N script.py ...`` starts N copies of a task script with ``RANK``,
``LOCAL_RANK`` and ``WORLD_SIZE`` set. ``setup`` (through ``engine.launch.launch``, called by
``tasks.common.start``) joins the process group -- NCCL on CUDA, Gloo on the CPU -- with a
timeout (``GPT2_DIST_TIMEOUT`` seconds, default 1800), so a rank that stops answering ends the
job with an error instead of a hang; a rank that raises exits non-zero and torchrun stops the
others. This module is imported only then: "which rank am I" is ``engine.ranks``, and a
one-process run uses ``engine.strategy.SingleProcess``.

What the engine takes from here:

- ``ShardedSampler``: each rank's share of every global batch, cut from the one shuffled order
  the single-process loader would draw (seeded shuffling, length grouping and mid-epoch resume
  keep working unchanged).
- ``DataParallel`` (DDP) and ``FullySharded`` (FSDP2, ``fully_shard`` per transformer block):
  the strategies the Trainer calls at its fixed points. The model goes under DDP or FSDP, the
  gradient all-reduce is held back for all but the last micro-batch of an accumulation group,
  numbers are summed (and a loss's rows gathered) over the ranks on the device the process
  group serves -- every tensor collective goes through ``DataParallel.on_group`` --, and FSDP
  checkpoints are gathered into the usual single file and read back from it.

Evaluation runs on rank 0 alone, over the whole dev set, while the others wait, rather than
sharded over the ranks and gathered: a task's ``eval_fn`` is any function of the model
(accuracy over a loader, chrF of generated sonnets, held-out loss), so only running it as one
process would gives the one-process metrics for every task without each task learning to shard
and gather; the price is that the other ranks idle for the length of one evaluation (and the
process-group timeout must exceed it).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import RandomSampler, Sampler

from engine import ranks
from engine.strategy import SingleProcess

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 1800


def setup(device: torch.device) -> torch.device:
    """Join torchrun's process group (once) and return this rank's device: ``cuda:LOCAL_RANK``
    on CUDA, the CPU otherwise. Without torchrun: ``device`` unchanged and no group."""
    if not ranks.launched():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = dt.timedelta(seconds=float(os.environ.get("GPT2_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
        atexit.register(ranks.teardown)
        if not ranks.is_main():  # one copy of every log line: rank 0's
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (kept open for the process's life)
    return device


def group_device(device: torch.device) -> torch.device:
    """Where the process group takes the tensors of its collectives: NCCL serves CUDA tensors
    only (this rank's GPU, ``device``), Gloo serves the CPU's."""
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


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
        self.rank = ranks.rank() if rank is None else rank
        self.world = ranks.world_size() if world is None else world

    @property
    def generator(self) -> torch.Generator | None:
        """The base's generator, which ``engine.rng`` saves and restores for exact resume."""
        return getattr(self.base, "generator", None)

    def _order(self) -> list[int]:
        if not isinstance(self.base, RandomSampler) or self.base.generator is not None:
            return list(self.base)
        # A RandomSampler on the global RNG: rank 0's seed, drawn exactly as RandomSampler draws it.
        seed = ranks.broadcast_object(int(torch.empty((), dtype=torch.int64).random_().item()))
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


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """What FSDP shards one unit at a time: the repeated blocks of the model, the members of its
    ``nn.ModuleList``s (GPT-2's ``h``), found without the engine knowing the model's classes."""
    return [block for m in model.modules() if isinstance(m, nn.ModuleList) for block in m]


class DataParallel(SingleProcess):
    """DDP: every rank holds the whole model and a slice of each global batch; gradients are
    averaged over the ranks once per optimizer step."""

    def __init__(self, device: torch.device) -> None:
        super().__init__(device)
        self.collective_device = group_device(device)
        self.wrapped: nn.Module | None = None

    @property
    def world_size(self) -> int:
        return ranks.world_size()

    @property
    def rank(self) -> int:
        return ranks.rank()

    @property
    def is_main(self) -> bool:
        return ranks.is_main()

    def wrap(self, model: nn.Module) -> nn.Module:
        """``Call(model)`` under DDP. Build the optimizer after this (FSDP replaces parameters)."""
        cuda = self.device.type == "cuda"
        self.wrapped = DistributedDataParallel(Call(model), device_ids=[self.device] if cuda else None,
                                               find_unused_parameters=True)
        return self.wrapped

    def sync_gradients(self, sync: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if sync else self.wrapped.no_sync()

    def on_group(self, x: torch.Tensor) -> torch.Tensor:
        """The one way into this strategy's tensor collectives (``sum``, ``all_gather``): a copy of
        ``x``, detached, on the process group's device. A count made on the host would otherwise
        reach NCCL as a CPU tensor, which it refuses, and stop a GPU run at its first step; the
        copy also keeps in-place collectives off the caller's tensor."""
        return x.detach().to(self.collective_device, copy=True)

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        x = self.on_group(x)
        dist.all_reduce(x)
        return x

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        return self.sum(x) / self.world_size

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """The ranks' batches may differ in rows (a short last batch split unevenly): each pads to
        the longest for the collective, which needs one shape, and the padding is cut off again."""
        rows = self.gather_objects(x.size(0))
        local = self.on_group(x)
        if local.size(0) < max(rows):
            local = torch.cat([local, local.new_zeros(max(rows) - local.size(0), *local.shape[1:])])
        parts = [torch.empty_like(local) for _ in rows]
        dist.all_gather(parts, local)
        pieces = [x if r == self.rank else part[:n].to(x.device) for r, (part, n) in enumerate(zip(parts, rows))]
        return torch.cat(pieces)

    def on_main(self, fn: Callable[[], T]) -> T:
        return ranks.on_main(fn)

    def evaluate(self, fn: Callable[[], T]) -> T:
        """Rank 0 evaluates while the others wait for its metrics, so every rank makes the same
        best-checkpoint and early-stopping decisions."""
        return ranks.on_main(fn)

    def gather_objects(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def _options(**kw: Any) -> StateDictOptions:
    return StateDictOptions(full_state_dict=True, **kw)


class FullySharded(DataParallel):
    """FSDP2: each rank holds a shard of every parameter (each transformer block, then the rest;
    bf16 parameters with fp32 gradient reduction on CUDA); full weights are gathered to evaluate,
    to predict and to write a checkpoint."""

    sharded = True

    def wrap(self, model: nn.Module) -> nn.Module:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if self.device.type == "cuda" else MixedPrecisionPolicy()
        for block in transformer_blocks(model):
            fully_shard(block, mp_policy=mp)
        root = Call(model)
        fully_shard(root, mp_policy=mp)
        self.wrapped = root
        return root

    def sync_gradients(self, sync: bool) -> contextlib.AbstractContextManager:
        self.wrapped.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def _units(self) -> list[nn.Module]:
        return [m for m in self.wrapped.modules() if isinstance(m, FSDPModule)]

    def unshard(self) -> None:
        """Gather the full weights on every rank and keep them, so that any rank alone can run
        the model (evaluation on rank 0, the task's predictions after training). Collective."""
        for m in self._units():
            m.set_reshard_after_forward(False)
            m.unshard()

    def reshard(self) -> None:
        """Back to training: shards only, freed after each block's forward. Local. Forgets the
        forward order FSDP recorded for its backward prefetching: rank 0's evaluation passes,
        which the other ranks did not run, would otherwise make its next backward gather other
        blocks than theirs (a deadlock)."""
        self.wrapped.reset_iter_state()
        for m in self._units():
            m.reshard()
            m.set_reshard_after_forward(True)

    def evaluate(self, fn: Callable[[], T]) -> T:
        self.unshard()
        try:
            return ranks.on_main(fn)
        finally:
            self.reshard()

    def model_state(self, model: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
        """The whole (or only the trainable) weights as plain CPU tensors on rank 0 (an empty dict
        elsewhere). Collective: every rank calls it."""
        state = get_model_state_dict(model, options=_options(cpu_offload=True))
        if trainable_only:
            names = {n for n, p in model.named_parameters() if p.requires_grad}
            state = {k: v for k, v in state.items() if k in names}
        return state

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))

    def load_model_state(self, model: nn.Module, ckpt: Mapping[str, Any], path: str | Path) -> None:
        """A full state dict (read by every rank) into the shards."""
        if "model" not in ckpt:
            super().load_model_state(model, ckpt, path)  # its error names what is missing
            return
        set_model_state_dict(model, dict(ckpt["model"]), options=_options(strict=not ckpt.get("trainable_only")))

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                             state: dict[str, Any]) -> None:
        set_optimizer_state_dict(model, optimizer, state, options=_options())


def strategy(device: torch.device, fsdp: bool = False) -> DataParallel:
    """The strategy of a rank of a process group that is up: DDP, or FSDP2 with ``fsdp``."""
    return (FullySharded if fsdp else DataParallel)(device)


__all__ = ["Call", "DataParallel", "FullySharded", "ShardedSampler", "group_device", "setup", "strategy",
           "transformer_blocks"]
