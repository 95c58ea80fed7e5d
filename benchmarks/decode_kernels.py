"""Decoding-step kernels side by side: one pass over a model's block matrices (gpt2: 48
distinct matrices, so each is read from DRAM as in a real step) at 1, 2, 4 and 8 rows, in
int8 (the project's kernel, PyTorch's ``aten._weight_int8pack_mm``) and bfloat16 (the
project's kernel, oneDNN packed for 1 and for 8 rows). Medians in ms per pass; what the
row limits in ``decoding.quant`` (int8 up to 8 rows, ``KERNEL_BF16_ROWS`` for bf16) rest on.

    python benchmarks/decode_kernels.py                # gpt2 shapes, 2 threads
    python benchmarks/decode_kernels.py --n_embd 1024 --n_layer 24
    python benchmarks/decode_kernels.py --isa avx2    # the kernel's AVX2 path on an AVX-512 CPU
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from decoding import cpu_kernels  # noqa: E402
from decoding.quant import quantize_int8  # noqa: E402


def median_ms(fn, reps: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n_embd", type=int, default=768)
    p.add_argument("--n_layer", type=int, default=12)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--isa", default="", choices=["", "avx2", "avx512"],
                   help="the project kernel's instruction set (default: the widest this CPU has)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    reason = cpu_kernels.unavailable()
    if reason is not None:
        sys.exit(f"error: the project's kernel cannot run here: {reason}")
    d = args.n_embd
    shapes = [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)] * args.n_layer
    torch.manual_seed(0)
    weights = [torch.randn(n, k) * 0.02 for n, k in shapes]
    int8 = [quantize_int8(w) for w in weights]
    int8_bf16_scales = [s.to(torch.bfloat16) for _, s in int8]
    bf16 = [w.to(torch.bfloat16) for w in weights]
    del weights
    packed = {hint: [torch.ops.mkldnn._reorder_linear_weight(w, hint) for w in bf16] for hint in (1, 8)}
    mib = {"int8": sum(q.numel() for q, _ in int8) / 2**20, "bf16": sum(w.numel() * 2 for w in bf16) / 2**20}
    print(f"{len(shapes)} matrices, width {d}: int8 {mib['int8']:.0f} MiB, bf16 {mib['bf16']:.0f} MiB per pass; "
          f"{args.threads} threads; project kernel: {args.isa or cpu_kernels._load()[0].best_isa()}; "
          "ms per pass (GB/s)")
    print("| rows | int8: project kernel | int8: aten int8pack | bf16: project kernel | bf16: oneDNN packed 1-row "
          "| bf16: oneDNN packed 8-row |\n|---|---|---|---|---|---|")
    for rows in args.rows:
        x = {k: torch.randn(rows, k) for k in (d, 4 * d)}
        xb = {k: v.to(torch.bfloat16) for k, v in x.items()}
        runs = {
            "int8 ours": lambda x=x: [cpu_kernels.lowbit_linear(x[q.size(1)], q, s, isa=args.isa) for q, s in int8],
            "int8 aten": lambda xb=xb: [torch.ops.aten._weight_int8pack_mm(xb[q.size(1)], q, sb)
                                        for (q, _), sb in zip(int8, int8_bf16_scales)],
            "bf16 ours": lambda x=x: [cpu_kernels.lowbit_linear(x[w.size(1)], w, isa=args.isa) for w in bf16],
            "bf16 packed 1": lambda xb=xb: [torch.ops.mkldnn._linear_pointwise(xb[w.size(1)], pw, None, "none", [], "")
                                            for w, pw in zip(bf16, packed[1])],
            "bf16 packed 8": lambda xb=xb: [torch.ops.mkldnn._linear_pointwise(xb[w.size(1)], pw, None, "none", [], "")
                                            for w, pw in zip(bf16, packed[8])],
        }
        if rows > cpu_kernels.MAX_ROWS:
            runs = {k: v for k, v in runs.items() if "ours" not in k}
        cells = []
        for name in ("int8 ours", "int8 aten", "bf16 ours", "bf16 packed 1", "bf16 packed 8"):
            if name not in runs:
                cells.append("-")
                continue
            ms = median_ms(runs[name], args.reps)
            cells.append(f"{ms:.2f} ({mib[name[:4]] * 2**20 / ms / 1e6:.1f})")
        print(f"| {rows} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
