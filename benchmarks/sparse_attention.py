"""Time and peak memory of one attention forward + backward: dense vs each sparse
pattern, through the full-mask path and through the blockwise kernels.

Shapes are GPT-2 small's attention (12 heads of 64) at batch ``--batch``, float32
on the CPU, for T in ``--lengths``; q, k, v are (B, 12, T, 64) views of one
(B, T, 3, 12, 64) tensor, the layout ``CausalSelfAttention`` hands over. Rows:

- ``dense sdpa``: causal SDPA (``is_causal``; PyTorch's fused CPU kernel), what
  dense attention runs;
- ``dense eager``: softmax(QK^T)V written out, the O(T^2) matrix materialised;
- ``<pattern> mask``: SDPA with the pattern's boolean (T, T) mask
  (``SparseAttention(impl="mask")``): same cost as dense, only a mask changes;
- ``<pattern> blockwise``: the kernels of ``methods.sparse_kernels`` (the default), O(T * w).

Time: median over ``--repeats`` runs after warm-up, the variants taking turns
(other processes share the cores: medians, round-robin). Memory: the increase of this process's peak
resident set (VmHWM, reset through /proc/self/clear_refs) during one forward +
backward, beyond the inputs; glibc is told to return every freed block of 64 KiB
or more to the OS at once (``MALLOC_MMAP_THRESHOLD_``) so that resident memory
follows live tensors. It counts all memory the step touches (scores,
probabilities, masks, gradients), Linux only.

    python benchmarks/sparse_attention.py
    python benchmarks/sparse_attention.py --lengths 256 512 1024 --window 128 --repeats 7
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from methods.sparse_attention import SparseAttention, build_sparse_mask, sparse_blockwise_attention  # noqa: E402
from modules.attention import eager_attention  # noqa: E402

Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def patterns(args: argparse.Namespace) -> dict[str, SparseAttention]:
    base = SparseAttention(window=args.window, block=args.block, num_global=args.num_global)
    return {
        f"window w={args.window}": dataclasses.replace(base, pattern="window"),
        f"strided (LogSparse) w={args.window}": dataclasses.replace(base, pattern="strided"),
        f"block_global b={args.block} g={args.num_global}": dataclasses.replace(base, pattern="block_global"),
    }


def variants(args: argparse.Namespace, T: int) -> dict[str, Step]:
    out: dict[str, Step] = {
        "dense sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "dense eager": lambda q, k, v: eager_attention(q, k, v, None, True),
    }
    for name, cfg in patterns(args).items():
        # The mask the model builds once per forward (shared by all layers), not timed here.
        mask = build_sparse_mask(dataclasses.replace(cfg, impl="mask"), T, 0, None, torch.device("cpu"))
        out[f"{name} mask"] = lambda q, k, v, m=mask: F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        out[f"{name} blockwise"] = lambda q, k, v, c=cfg: sparse_blockwise_attention(q, k, v, c)
    return out


def measure(steps: dict[str, Step], B: int, T: int, repeats: int) -> dict[str, tuple[float, float]]:
    """{variant: (median ms, peak extra MiB)} of forward + backward. Repeats go round-robin
    over the variants, so that load from other processes hits them all alike."""
    torch.manual_seed(0)
    qkv = torch.randn(B, T, 3, 12, 64, requires_grad=True)  # as the layer makes them: views of c_attn's output
    grad = torch.randn(B, 12, T, 64)

    def run(step: Step) -> None:
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, 12, T, 64) each
        step(q, k, v).backward(grad)
        qkv.grad = None

    peak = {}
    for name, step in steps.items():
        run(step)  # warm-up
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        base = rss_kib("VmRSS")
        run(step)
        peak[name] = (rss_kib("VmHWM") - base) / 1024
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            t0 = time.perf_counter()
            run(step)
            times[name].append(time.perf_counter() - t0)
    return {name: (1000 * statistics.median(times[name]), peak[name]) for name in steps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--window", type=int, default=128, help="window (window, strided)")
    p.add_argument("--block", type=int, default=128, help="block size (block_global)")
    p.add_argument("--num_global", type=int, default=4, help="global tokens (block_global)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":  # freed tensors back to the OS: RSS tracks live memory
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"attention forward+backward, B={args.batch}, 12 heads x 64, float32, CPU, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}; torch {torch.__version__}\n")
    rows: dict[str, dict[int, tuple[float, float]]] = {}
    for T in args.lengths:
        for name, (ms, mib) in measure(variants(args, T), args.batch, T, args.repeats).items():
            rows.setdefault(name, {})[T] = (ms, mib)
            print(f"  T={T:5d} {name:40s} {ms:9.1f} ms {mib:8.1f} MiB", file=sys.stderr)
    head = " | ".join(f"T={T} ms | T={T} MiB" for T in args.lengths)
    print(f"| variant | {head} |")
    print("|---|" + "---:|" * (2 * len(args.lengths)))
    for name, by_t in rows.items():
        cells = " | ".join(f"{by_t[T][0]:.1f} | {by_t[T][1]:.0f}" for T in args.lengths)
        print(f"| {name} | {cells} |")


if __name__ == "__main__":
    main()
