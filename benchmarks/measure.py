"""How ``benchmarks/bench.py`` measures: the clock, interleaved medians, this process's memory
counters, GPUs' peak FLOPS, and the matrix-vector bandwidth that bounds a batch-1 decoding step.

Kept apart from ``bench.py`` (which builds the two models and prints the comparison) so that
what is timed and how it is timed can be read separately. ``CLOCK`` is a one-element list,
shared by reference: ``bench.py`` sets ``CLOCK[0]`` from ``--clock`` and every timer here reads it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from decoding import cpu_kernels
from decoding.quant import Int4Layout, Int8Layout, dequantize_int8

# Dense bf16 tensor-core peak (TFLOPS, no sparsity) by a substring of the device name; first match wins.
PEAK_BF16_TFLOPS = [
    ("H100 SXM", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0),
    ("GH200", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0),
    ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0), ("A6000", 155.0),
]


# Wall-clock by default; --clock cpu uses this process's CPU time, which other processes
# on a shared machine barely disturb (meaningful with --threads 1, where it equals
# wall-clock time on an idle machine; with more threads it also counts spin-waiting).
CLOCK = [time.perf_counter]


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    return next((v for k, v in PEAK_BF16_TFLOPS if k.lower() in name.lower()), None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def rss_mib(field: str = "VmRSS") -> float:
    """This process's resident set size (VmRSS) or its peak (VmHWM), Linux only. Unlike
    ``ru_maxrss``, VmHWM is not inherited from the parent across fork/exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def time_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int, reps: int):
    """Median seconds per call of each function, calls interleaved rep by rep."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            sync(device)
            t0 = CLOCK[0]()
            fn()
            sync(device)
            times[k].append(CLOCK[0]() - t0)
    return {k: statistics.median(v) for k, v in times.items()}, times


def matvec_bandwidth(device: torch.device, kind: str, reps: int = 20) -> dict[str, float]:
    """Weight bytes per second of a large matrix-vector product with each kernel available for
    ``kind`` (float32, bf16, int8, int4), the ceiling of batch-1 decoding. Floats: the (out, in)
    layout F.linear uses, the (in, out) layout, and on CPU oneDNN's weight prepacked for one row
    (much the fastest: F.linear does not reach the machine's bandwidth). int8 / int4: the
    layouts' kernels (``decoding.quant``: the project's own kernel where it builds), PyTorch's
    int8 kernel, and dequantise-then-F.linear; bf16 adds the project's kernel."""
    W = torch.randn(16384, 4096, device=device)  # 256 MB in float32, far beyond the caches
    x = torch.randn(1, 4096, device=device)
    if kind in ("int8", "int4"):
        layout = Int8Layout(W) if kind == "int8" else Int4Layout(W)
        nbytes = layout.nbytes()
        kernels = {f"{kind} layout": lambda: layout.matmul(x, None)}
        if kind == "int8":
            kernels["dequantise + F.linear"] = lambda: torch.nn.functional.linear(
                x, dequantize_int8(layout.q, layout.scale))
            if device.type == "cpu":
                xb, sb = x.to(torch.bfloat16), layout.scale.to(torch.bfloat16)
                kernels["aten int8pack"] = lambda: torch.ops.aten._weight_int8pack_mm(xb, layout.q, sb)
    else:
        dtype = torch.bfloat16 if kind == "bf16" else torch.float32
        x0 = x  # float32 activations: what the project kernel takes
        W, x = W.to(dtype), x.to(dtype)
        Wt = W.t().contiguous()
        nbytes = W.numel() * W.element_size()
        kernels = {"F.linear": lambda: torch.nn.functional.linear(x, W), "x @ W^T": lambda: x @ Wt}
        if device.type == "cpu" and torch.backends.mkldnn.is_available():
            packed = torch.ops.mkldnn._reorder_linear_weight(W, 1)
            kernels["oneDNN packed"] = lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        if kind == "bf16" and cpu_kernels.serves(x0, W):
            kernels["project kernel"] = lambda: cpu_kernels.lowbit_linear(x0, W)
    out = {}
    for name, fn in kernels.items():
        for _ in range(3):
            fn()
        sync(device)
        ts = []
        for _ in range(reps):
            t0 = CLOCK[0]()
            fn()
            sync(device)
            ts.append(CLOCK[0]() - t0)
        out[name] = nbytes / statistics.median(ts)
    return out
