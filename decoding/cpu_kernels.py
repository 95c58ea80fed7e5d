"""The project's own CPU kernel for decoding steps: weight-only int8 and bfloat16
matrix-vector products with float32 activations (``csrc/lowbit_matvec.cpp``), compiled
once per machine with ``torch.utils.cpp_extension`` (``setup.sh`` does it; otherwise the
first use compiles it and says so).

Why a kernel of our own: a batch-1 decoding step streams every weight once, so its speed is
the memory bandwidth it reaches, and the library kernels leave bandwidth unused on CPU:
``aten._weight_int8pack_mm`` also needs the activations rounded to bfloat16. This kernel
converts each 64-byte line of weights to float32 in registers (no dequantised copy goes
through memory) and accumulates in float32 with the activations kept in float32, each thread
on its own block of rows, so it streams the block matrices and the int8 head closer to the
bandwidth. ``benchmarks/decode_kernels.py`` measures it against PyTorch's and oneDNN's kernels;
docs/quantisation.md has the numbers.

It is used only where it fits: x86-64 Linux with AVX-512 or AVX2 + FMA
(``torch.backends.cpu``'s capability; the widest the CPU has is chosen at run time), float32
inputs of 1 to ``MAX_ROWS`` rows; ``unavailable()`` says why not otherwise, and the callers
(``decoding.quant``) fall back to PyTorch's kernels.
``GPT2_CPU_KERNELS=0`` turns it off (to compare, or if a build misbehaves).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
from functools import lru_cache
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "lowbit_matvec.cpp"
MAX_ROWS = 8  # kMaxRows in the source; a build whose max_rows differs is refused
_WEIGHT_DTYPES = (torch.int8, torch.bfloat16)
_FLAGS = ["-O3", "-fopenmp"]  # without -fopenmp, at::parallel_for in the header runs on one thread


def _name() -> str:
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(_FLAGS).encode()).hexdigest()[:10]
    return f"gpt2_lowbit_{digest}"  # a changed source or flag set builds anew


def platform_reason() -> str | None:
    """Why this machine cannot run the kernel at all (None when it can)."""
    if os.environ.get("GPT2_CPU_KERNELS", "1") == "0":
        return "turned off by GPT2_CPU_KERNELS=0"
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"the kernel is written for x86-64 Linux, not {sys.platform} {platform.machine()}"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"the kernel needs AVX2 or AVX-512; this CPU offers {torch.backends.cpu.get_cpu_capability()}"
    if not SOURCE.is_file():
        return f"its source {SOURCE} is missing (a copy of the project without decoding/csrc)"
    return None


@lru_cache(maxsize=1)
def _load():
    """(module, None) or (None, why not). Compiles on first use on this machine."""
    reason = platform_reason()
    if reason is not None:
        return None, reason
    from torch.utils import cpp_extension

    name = _name()
    venv_bin = Path(sys.executable).parent
    if shutil.which("ninja") is None and (venv_bin / "ninja").exists():  # requirements.txt's, venv not activated
        os.environ["PATH"] = f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"
    try:
        build_dir = Path(cpp_extension._get_build_directory(name, verbose=False))
        if not any(build_dir.glob(f"{name}*.so")):
            print(f"compiling the CPU decoding kernels ({SOURCE.name}, once per machine, about 30 s)...",
                  file=sys.stderr, flush=True)
        module = cpp_extension.load(name, [str(SOURCE)], extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"],
                                    build_directory=str(build_dir), verbose=False)
    except Exception as e:  # no compiler, no ninja, a failed build: PyTorch's kernels serve instead
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        reason = f"could not compile {SOURCE.name} ({first}); PyTorch's kernels serve instead"
        print(f"warning: {reason}", file=sys.stderr, flush=True)
        return None, reason
    if module.max_rows != MAX_ROWS:  # the two constants drifted apart: serves() would offer rows it refuses
        raise RuntimeError(f"{SOURCE.name} serves up to {module.max_rows} rows, cpu_kernels.MAX_ROWS says {MAX_ROWS}")
    return module, None


def unavailable() -> str | None:
    """Why the kernel cannot serve on this machine (None when it can); builds it if needed."""
    return _load()[1]


def serves(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``lowbit_linear(x, w, ...)`` runs here: CPU float32 x of 1 to MAX_ROWS rows,
    an int8 or bfloat16 CPU weight, no autograd, and the kernel built. (Called for every
    product of every decoding step: the cheap tests come first.)"""
    return (x.dtype == torch.float32 and w.dtype in _WEIGHT_DTYPES and x.is_cpu and w.is_cpu
            and 0 < x.numel() <= MAX_ROWS * x.size(-1) and not (x.requires_grad and torch.is_grad_enabled())
            and _load()[0] is not None)


def lowbit_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None, isa: str = "") -> torch.Tensor:
    """``F.linear(x, w.float() * scale[:, None], bias)`` for the inputs ``serves`` accepts,
    computed in float32 from the int8 / bfloat16 bytes; x's leading dims are kept. ``isa``:
    "" for the widest instructions this CPU has, or "avx2" / "avx512" (to test each)."""
    module = _load()[0]
    if module is None:
        raise RuntimeError(f"the CPU decoding kernel is unavailable: {unavailable()}")
    if bias is not None and bias.dtype != torch.float32:
        bias = bias.float()
    return module.lowbit_linear(x, w, scale, bias, isa)
