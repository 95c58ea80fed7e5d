"""Which process this is: the one question most of the engine asks of torchrun, "am I rank 0?".

A one-process run asks it too (only rank 0 writes files and prints), so it is answered here, from
``torch.distributed``'s own state and torchrun's environment, without the distributed training
machinery: ``engine.distributed`` (DDP, FSDP, sharded checkpoints) loads only when torchrun
started the process. With one process every answer is that of rank 0 of 1 and every helper is
the identity, so a plain run is exactly what it would be without torchrun support.

``on_main(fn)``: ``fn`` runs on rank 0 (claiming a run folder, checking a resume, writing a best
checkpoint) and the other ranks get its result, or raise its error, so every rank stops with
the same message.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch.distributed as dist

T = TypeVar("T")


def launched() -> bool:
    """Started by torchrun with more than one process (the process group may not be up yet)."""
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


def barrier() -> None:
    if active():
        dist.barrier()


def teardown() -> None:
    """Leave the process group (at the end of a task run; also harmless when there is none)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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


__all__ = ["active", "barrier", "broadcast_object", "is_main", "launched", "on_main", "rank", "teardown",
           "world_size"]
