"""How this process was launched: alone, or as one rank of torchrun's process group; and what
follows from it for the engine (the loop's strategy, the loader's share of each batch).

The answers for torchrun come from ``engine.distributed`` (DDP, FSDP, distributed checkpoints),
which is imported here only when torchrun started the process: a student's one-process run
never loads it.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch.utils.data import Sampler

from engine import ranks
from engine.strategy import SingleProcess


def _distributed() -> ModuleType:
    """``engine.distributed``, imported on first use."""
    # A function-level import: the torch.distributed machinery loads only under torchrun.
    from engine import distributed

    return distributed


def launch(device: torch.device) -> torch.device:
    """Under torchrun: join the process group (once) and return this rank's device. Otherwise
    ``device`` unchanged."""
    return _distributed().setup(device) if ranks.launched() else device


def strategy_for(device: torch.device, fsdp: bool = False) -> SingleProcess:
    """The strategy of this process: one process, or (a process group is up) DDP, or FSDP2."""
    if not ranks.active():
        return SingleProcess(device)
    return _distributed().strategy(device, fsdp)


def sharded_sampler(base: Sampler[int], batch_size: int) -> Sampler[int]:
    """Under torchrun: this rank's share of every global batch of ``base``'s order
    (``engine.distributed.ShardedSampler``)."""
    return _distributed().ShardedSampler(base, batch_size)


__all__ = ["launch", "sharded_sampler", "strategy_for"]
