"""Seeds: the same configuration trained under several seeds, summarised as mean ± standard deviation.

    python -m experiments seeds --task classifier --seeds 11711,42,7 --out runs/seeds/sst-lora \\
        -- --dataset sst --fine-tune-mode lora --epochs 3

Each seed is one run of the task's script with the flags after ``--`` unchanged and ``--seed S``,
in its own run folder ``<out>/seed-S`` (predictions in ``<out>/seed-S/predictions``; a classifier
on both datasets runs each in ``<out>/seed-S/<dataset>``). Then
``<out>/summary.csv`` and ``summary.md`` list every dev metric of the runs' best epochs (and the
efficiency numbers a run folder holds) with mean, sample standard deviation and each seed's value:
a gain smaller than the spread across seeds is noise. A sonnet run (``--task sonnet``) reports its
best epoch's dev chrF, held-out loss and perplexity and the form of its dev sonnets (``form_*``).
Rerunning the same command after an interruption skips the finished seeds and resumes the
interrupted one from its ``last.pt``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments.launch import (
    TASKS,
    ExperimentError,
    check_task_flags,
    one_run_each,
    parse_list,
    run_results,
    run_task,
)
from experiments.tables import mean_std, write_tables


def seed_folder(out: str | Path, seed: int) -> Path:
    return Path(out) / f"seed-{seed}"


def summarise(results: dict[int, dict[str, float]]) -> list[dict[str, Any]]:
    """One row per number the runs report: mean, std, n and each seed's value."""
    names = sorted({k for r in results.values() for k in r}, key=lambda k: ("efficiency/" in k, k))
    rows = []
    for name in names:
        values = [r[name] for r in results.values() if name in r]
        mean, std = mean_std(values)
        rows.append({"metric": name, "mean": mean, "std": std, "n": len(values),
                     "mean ± std": f"{mean:.4f} ± {std:.4f}" if len(values) > 1 else f"{mean:.4f}",
                     **{f"seed {s}": r.get(name) for s, r in results.items()}})
    return rows


def run_seeds(task: str, seeds: Sequence[int], out: str | Path, task_argv: Sequence[str]) -> list[dict[str, Any]]:
    """Train ``task`` with ``task_argv`` under each seed (finished seeds skipped, an interrupted one
    resumed), write ``<out>/summary.{csv,md}``; returns the summary rows."""
    check_task_flags(task, task_argv)
    if len(set(seeds)) != len(seeds):
        raise ExperimentError(f"--seeds repeats a seed: {list(seeds)}")
    results = {}
    for seed in seeds:
        folder = seed_folder(out, seed)
        for sub, argv in one_run_each(task, task_argv):
            if not run_task(task, [*argv, "--seed", str(seed)], folder / sub):
                print(f"seed {seed}: finished earlier in {folder / sub}")
        results[seed] = run_results(folder)
    rows = summarise(results)
    columns = ["metric", "mean ± std", "mean", "std", "n", *(f"seed {s}" for s in seeds)]
    title = f"{task} over seeds {', '.join(map(str, seeds))}: {' '.join(task_argv)}"
    csv_path, md_path = write_tables(rows, columns, Path(out) / "summary", title)
    print(md_path.read_text())
    print(f"wrote {csv_path} and {md_path}")
    return rows


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, choices=tuple(TASKS),
                   help="the task script each seed runs (classifier.py, paraphrase_detection.py or "
                        "sonnet_generation.py)")
    p.add_argument("--seeds", required=True, help="comma-separated seeds, e.g. 11711,42,7")
    p.add_argument("--out", required=True, help="experiment folder: seed-<S>/ run folders and summary.{csv,md}")


def main(args: argparse.Namespace, task_argv: list[str]) -> list[dict[str, Any]]:
    try:
        return run_seeds(args.task, parse_list(args.seeds, int), args.out, task_argv)
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume (finished seeds are kept)", file=sys.stderr)
        raise SystemExit(130) from None


__all__ = ["add_args", "main", "run_seeds", "seed_folder", "summarise"]
