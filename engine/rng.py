"""Seeding, and capture/restore of every random number generator a run draws from.

Exact resume needs the python, numpy, torch and CUDA generators, and the generator on a
DataLoader's sampler (``engine.data``), put back as they were; ``get_rng_state``
returns them in types that ``torch.load(weights_only=True)`` accepts, so they can live
in a checkpoint. Kept apart from the loop so that CLIs can seed without the Trainer.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices); cuDNN deterministic, as the course starter does."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def get_rng_state() -> dict[str, Any]:
    """All global RNG states in types that ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Put back the global RNG states that ``get_rng_state`` captured."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state({
        "bit_generator": "MT19937",
        "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
        "has_gauss": n["has_gauss"],
        "gauss": n["gauss"],
    })
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def sampler_rng_state(loader: Any) -> torch.Tensor | None:
    """State of the generator on ``loader.sampler`` (None if it has none: it shuffles from the global RNG)."""
    gen = getattr(getattr(loader, "sampler", None), "generator", None)
    return gen.get_state() if gen is not None else None


def set_sampler_rng_state(loader: Any, state: Mapping[str, Any] | None) -> None:
    """Put back the sampler generator state saved under ``state["sampler"]``, if both exist."""
    gen = getattr(getattr(loader, "sampler", None), "generator", None)
    if gen is not None and state is not None and state.get("sampler") is not None:
        gen.set_state(state["sampler"])


__all__ = ["get_rng_state", "sampler_rng_state", "seed_everything", "set_rng_state", "set_sampler_rng_state"]
