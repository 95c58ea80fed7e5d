"""Where tensors run: the default device, batches moved to the model's device, and bf16
autocast on CUDA only.

Shared by the Trainer's loop and ``predict``, so training and evaluation place and cast
batches the same way; ``best_device`` is what every CLI's ``--device auto`` means.

``maybe_compile`` (``--compile``) makes ``torch.compile`` an option that never breaks a run: any
module, compiled where the compiler works and eager where it does not (the model itself knows
nothing of compilation).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

# Full fine-tuning of gpt2 (124M) on the CPU, measured: the SST classifier in training mode, batches
# of 8 real SST training sentences (43.7 tokens padded on average), forward + backward + the AdamW
# step, one thread, process CPU time over 24 examples after a warm-up batch: 8.4 s, 0.35 s each.
CPU_SECONDS_PER_EXAMPLE = 0.35
# What that measured is true of models of gpt2's size; tiny, head-only and LoRA runs train far fewer parameters.
GPT2_SIZE_PARAMETERS = 100_000_000


def best_device() -> torch.device:
    """CUDA, then Apple's MPS, then the CPU: the fastest device this machine has."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_hint(device: torch.device | str, *, trainable_parameters: int, train_examples: int) -> str | None:
    """One line for a sentiment run that fell back to the CPU while it fully fine-tunes a model of
    gpt2's size or larger (the case ``CPU_SECONDS_PER_EXAMPLE`` measured): what an epoch costs there,
    and the flags of a quick run. None wherever that note would not be true or would not help: on
    a GPU, for a tiny model, a head-only or LoRA run, or a run already short enough."""
    if torch.device(device).type != "cpu" or trainable_parameters < GPT2_SIZE_PARAMETERS:
        return None
    epoch_min = CPU_SECONDS_PER_EXAMPLE * train_examples / 60
    if epoch_min < 1:
        return None
    return (f"note: running on the CPU, where full fine-tuning of gpt2 takes about "
            f"{CPU_SECONDS_PER_EXAMPLE:.2f} s of one core per SST sentence (~{epoch_min:.0f} min per epoch for "
            f"{train_examples:,} sentences; more for CFIMDB's long reviews and larger models); "
            "for a quick run add --limit 64 --epochs 1")


def move_to_device(batch: Any, device: torch.device | str) -> Any:
    """Tensors inside dicts/lists/tuples moved to ``device``; other values (ids, strings) left as they are."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch


def autocast_context(device: torch.device | str, bf16: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA; nothing elsewhere (CPU bf16 is slow and changes numbers)."""
    if torch.device(device).type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def maybe_compile(model: nn.Module, enabled: bool = True, **compile_kwargs) -> nn.Module:
    """``torch.compile`` the model's forward in place, falling back to eager with a warning.

    Compilation is lazy, so it fails at the first call, not here (no C++ compiler for
    the CPU backend, an old GPU for Triton, an unsupported op): the first call that
    raises from the compiled path is re-run eagerly; if eager succeeds the error was
    the compiler's, a warning names it and the model stays eager from then on; if
    eager fails too, eager's error (the caller's problem) propagates. The module
    itself is returned, so parameters, ``state_dict`` and methods are unchanged.
    """
    if not enabled:
        return model
    eager: Callable = model.forward
    compiled = torch.compile(eager, **compile_kwargs)

    def forward(*args, **kwargs):
        if model.__dict__.get("forward") is not forward:  # fell back already
            return eager(*args, **kwargs)
        try:
            return compiled(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any compiler failure means: run eagerly
            out = eager(*args, **kwargs)
            warnings.warn(f"torch.compile failed, running eagerly instead ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})", RuntimeWarning, stacklevel=2)
            model.forward = eager
            return out

    model.forward = forward
    return model


__all__ = ["autocast_context", "best_device", "cpu_hint", "model_device", "move_to_device"]
