"""Sparse attention, time against quality: fine-tune the same starting model on the sonnets
under each attention pattern and report time per epoch beside dev perplexity and dev chrF
(the handout's "time-vs-quality" study; ``benchmarks/sparse_attention.py`` measures the
kernels alone).

Each pattern is one run of the sonnet task (``sonnet_generation.main``, the flags printed)
from the same weights (patterns change only which keys a query sees, never the weights),
with the same seed, so the same batches in the same order; no early stopping and no
best-epoch reload (``--patience 0 --save_top_k 0``), so every run trains exactly
``--epochs`` epochs and is judged on its last weights (linear warm-up and decay, clipping at
norm 1, given explicitly: the task's defaults are the starter's). The row: the training seconds per
epoch from the run's ``efficiency.json``, the dev perplexity of the true dev sonnets and the
dev chrF of the completed dev prompts (``--decoding greedy`` unless flags after ``--`` say
otherwise). Times are wall clock on this machine, so compare rows of one run, not runs of
different days. Each run's folder is ``<out>/<pattern>``.

    python benchmarks/sparse_quality.py --model runs/pretrain/shakespeare/model.pt --epochs 3
    python benchmarks/sparse_quality.py --random_init tiny --epochs 1 --limit 8 --window 32   # smoke run
    python benchmarks/sparse_quality.py --model MODEL --patterns dense,window --window 64 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sonnet_generation  # noqa: E402
from engine.efficiency import read_efficiency  # noqa: E402
from experiments.launch import sonnet_run_flags  # noqa: E402
from methods.sparse_attention import ATTENTION_PATTERNS  # noqa: E402

DATA = Path(__file__).resolve().parent.parent / "data"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="starting model: a saved model file, a Hugging Face folder or a hub id")
    src.add_argument("--random_init", metavar="SIZE", help="a named size with random weights (smoke runs)")
    p.add_argument("--patterns", default=",".join(ATTENTION_PATTERNS), help="comma-separated attention patterns")
    p.add_argument("--window", type=int, default=64, help="attn_window (window, strided)")
    p.add_argument("--block", type=int, default=64, help="attn_block (block_global)")
    p.add_argument("--num_global", type=int, default=4, help="attn_num_global (block_global)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--limit", type=int, default=0, help="first N sonnets of each split (0: all)")
    p.add_argument("--max_length", type=int, default=256, help="training tokens per sonnet")
    p.add_argument("--max_new_tokens", type=int, default=160)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data_dir", default=str(DATA))
    p.add_argument("--out", default="runs/benchmarks/sparse_quality", help="one run folder per pattern here")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.extra = extra
    args.patterns = [x.strip() for x in args.patterns.split(",") if x.strip()]
    bad = [x for x in args.patterns if x not in ATTENTION_PATTERNS]
    if bad or not args.patterns:
        p.error(f"--patterns: unknown {bad}; choose from {', '.join(ATTENTION_PATTERNS)}")
    if min(args.window, args.block, args.epochs, args.batch_size, args.max_length, args.max_new_tokens) < 1:
        p.error("--window, --block, --epochs, --batch_size, --max_length and --max_new_tokens must be >= 1")
    return args


def run_flags(args: argparse.Namespace, pattern: str) -> list[str]:
    """``sonnet_generation.py`` flags of one pattern's run."""
    data, folder = Path(args.data_dir), Path(args.out) / pattern
    start = ["--model_size", args.model] if args.model else ["--model_size", args.random_init, "--random_init"]
    return [
        *start, "--attn_pattern", pattern, "--attn_window", str(args.window), "--attn_block", str(args.block),
        "--attn_num_global", str(args.num_global),
        "--seed", str(args.seed), "--epochs", str(args.epochs), "--lr", str(args.lr),
        "--batch_size", str(args.batch_size), "--limit", str(args.limit), "--max_length", str(args.max_length),
        "--max_new_tokens", str(args.max_new_tokens), "--decoding", "greedy",
        "--scheduler", "linear", "--warmup_ratio", "0.1", "--max_grad_norm", "1",
        "--patience", "0", "--save_top_k", "0", "--no_progress", "--overwrite",
        *sonnet_run_flags(data, folder), *args.extra,
    ]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    rows = []
    for pattern in args.patterns:
        flags = run_flags(args, pattern)
        print("python sonnet_generation.py " + " ".join(flags), flush=True)
        result = sonnet_generation.main(flags)
        efficiency = read_efficiency(Path(args.out) / pattern)
        rows.append({"pattern": pattern, "sec_per_epoch": efficiency["seconds_per_epoch"],
                     "dev_ppl": result["dev_perplexity"], "dev_chrf": result["dev_chrf"]})
    print(f"\n{'pattern':<14}{'s/epoch':>9}{'dev ppl':>10}{'dev chrF':>10}")
    for r in rows:
        print(f"{r['pattern']:<14}{r['sec_per_epoch']:>9.2f}{r['dev_ppl']:>10.2f}{r['dev_chrf']:>10.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
