"""Tables an experiment leaves: the same rows as CSV (for scripts) and markdown (for a README or a report)."""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def cell(value: Any, digits: int = 4) -> str:
    """A markdown cell: floats rounded (small ones to 3 significant digits), None and NaN as a dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):  # small values (learning rates) keep their significant digits
        return f"{value:.3g}" if 0 < abs(value) < 10 ** -(digits - 1) else f"{value:.{digits}f}"
    return str(value)


def write_tables(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], stem: str | Path,
                 title: str = "") -> tuple[Path, Path]:
    """``<stem>.csv`` and ``<stem>.md`` with ``columns`` of ``rows`` (missing values empty / a
    dash); returns both paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = stem.with_suffix(".csv"), stem.with_suffix(".md")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: "" if r.get(c) is None else r.get(c) for c in columns})
    lines = [f"## {title}", ""] if title else []
    lines += ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; NaN for a single value: one run says nothing of the spread)."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else float("nan")


def mean_std_table(groups: Mapping[str, Sequence[Mapping[str, float]]], columns: Sequence[tuple[str, str, str]],
                   heads: tuple[str, str] = ("name", "runs"), no_spread: Sequence[str] = ()) -> str:
    """A markdown table, one row per group of runs: its name, its number of runs, then for each
    ``(label, key, format)`` column the runs' mean ± sample standard deviation (the mean alone for a
    single run, or for a key in ``no_spread``)."""
    out = [f"| {heads[0]} | {heads[1]} | " + " | ".join(c[0] for c in columns) + " |",
           "|" + " --- |" * (len(columns) + 2)]
    for name, runs in groups.items():
        cells = []
        for _, key, fmt in columns:
            m, s = mean_std([r[key] for r in runs])
            cells.append(f"{m:{fmt}} ± {s:{fmt}}" if len(runs) > 1 and key not in no_spread else f"{m:{fmt}}")
        out.append(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(out)


__all__ = ["cell", "mean_std", "mean_std_table", "write_tables"]
