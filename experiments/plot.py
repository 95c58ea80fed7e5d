"""Plot: several runs' curves overlaid in one PNG, each labelled by what differs between their settings.

    python -m experiments plot runs/classifier/full-model-sst/latest runs/classifier/lora-sst/latest \\
        --out compare.png
    python -m experiments plot runs/seeds/sst-lora runs/seeds/sst-full --metric macro_f1

Each path is a run folder (it holds ``metrics.jsonl``); a seeds experiment (``python -m experiments
seeds``'s ``--out``), whose ``seed-S`` runs are drawn as one line, their mean per epoch, in a band of
± one sample standard deviation (one line per dataset of a classifier run on both); or any other
folder holding run folders (a sweep's ``--out``, a task's ``runs/<task>/<mode>`` with its timestamped
runs), whose runs are drawn each. Left panel: the training loss (dashed) and the dev loss where a run
logs one (solid); right panel: the dev ``--metric`` (solid; default: the metric the runs selected
their best epoch on) and the same metric on a sample of the training set (dashed) where the task
logs one (the classifiers), so the train-dev gap of each run shows.

A line's label is the settings, saved in each run's checkpoint (``engine.resume.run_settings``: the
flags, the training and model settings that change the result), whose values differ between the
lines; a seeds experiment's line has the settings its runs share. Where nothing differs, a line is
named by its folder.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.checkpoints import load_checkpoint
from engine.resume import run_settings
from engine.run_paths import resolve_latest
from engine.tracking import Line, draw_panels, epoch_values, read_history, shown_metric
from errors import CheckpointError
from experiments.launch import ExperimentError
from experiments.tables import mean_std

MOST_SETTINGS = 4  # settings named in a label at most; the rest are counted
DERIVED = frozenset({"save_trainable_only"})  # follows from the fine-tune mode, which a label names already
DEFAULT_OUT = "compare.png"


@dataclass
class Curve:
    """One line of the plot: a run, or the runs of a seeds experiment (drawn as their mean ± std)."""

    name: str
    runs: list[Path]
    settings: dict[str, Any]  # the settings its runs share


def saved_settings(run: Path) -> dict[str, Any]:
    """The settings of the run in ``run``, from its ``last.pt`` (else a ``best*.pt``); {} if it
    holds no readable checkpoint (a run killed before its first one). The checkpoint is
    memory-mapped: its tensors are not read."""
    for ckpt in [run / "last.pt", *sorted(run.glob("best*.pt"))]:
        if not ckpt.is_file():
            continue
        try:
            saved = load_checkpoint(ckpt, mmap=True)
        except CheckpointError:  # a checkpoint cut short: try the next one
            continue
        return run_settings(saved.get("train_config") or {}, saved.get("model_config"), saved.get("extra"))
    return {}


def find_runs(folder: Path) -> list[Path]:
    """The run folders at or below ``folder`` (those holding ``metrics.jsonl``), each once (a
    ``latest`` link and the run it names are one run), in path order."""
    found: dict[Path, Path] = {}
    for log in sorted(folder.rglob("metrics.jsonl")):
        found.setdefault(log.parent.resolve(), log.parent)
    return list(found.values())


def curves_of(path: str | Path) -> list[Curve]:
    """The lines one command-line path stands for (see the module's docstring); a path that is no
    run folder and holds none is an ``ExperimentError``."""
    path = resolve_latest(path)  # ``latest`` as a pointer file (no symlinks here)
    if path.is_file() and path.name == "metrics.jsonl":
        path = path.parent
    if not path.is_dir():
        raise ExperimentError(f"{path}: {'not a folder' if path.exists() else 'no such folder'}; "
                              "give run folders or experiment folders")
    runs = find_runs(path)
    if not runs:
        raise ExperimentError(f"{path}: no metrics.jsonl in it or below: not a run folder or an experiment folder")
    if (path / "metrics.jsonl").is_file():
        return [Curve(str(path), [path], saved_settings(path))]
    groups: dict[str, list[Path]] = {}
    for run in runs:
        parts = run.relative_to(path).parts
        if parts[0].startswith("seed-"):  # a seeds experiment: one line per dataset, over the seeds
            groups.setdefault("/".join((path.as_posix(), *parts[1:])), []).append(run)
        else:
            groups[run.as_posix()] = [run]
    return [Curve(name, members, shared([saved_settings(r) for r in members])) for name, members in groups.items()]


def shared(settings: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The settings every one of ``settings`` has with the same value."""
    first, *rest = settings
    return {k: v for k, v in first.items() if all(k in s and s[k] == v for s in rest)}


def value_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(map(value_text, value))
    return str(value)


def labels(settings: Sequence[Mapping[str, Any]], names: Sequence[str], most: int = MOST_SETTINGS) -> list[str]:
    """Each line's label: ``name=value`` of the settings whose values differ between the lines (a
    setting only some lines have differs too), at most ``most`` of them and a count of the rest. The
    architecture's ``model.*`` fields count only when nothing else differs (another ``--model_size``
    changes them all, and says so itself); ``DERIVED`` settings never do. A line is called by its name
    where no setting differs or two labels would be the same."""
    missing = "(not set)"
    keys = list(dict.fromkeys(k for s in settings for k in s if k not in DERIVED))
    differ = [k for k in keys if len({repr(s.get(k, missing)) for s in settings}) > 1]
    differ = [k for k in differ if not k.startswith("model.")] or differ
    if not differ:
        return list(names)
    out = []
    for s in settings:
        shown = [f"{k}={value_text(s.get(k, missing))}" for k in differ[:most]]
        out.append(", ".join(shown) + (f" (+{len(differ) - most} more)" if len(differ) > most else ""))
    return out if len(set(out)) == len(out) else [f"{n}: {label}" for n, label in zip(names, out)]


def mean_curve(histories: Sequence[Sequence[Mapping[str, Any]]], split: str, name: str
               ) -> tuple[list[int], list[float], list[float]]:
    """(epochs, mean, sample std) of ``name`` over runs, per epoch any run reached (NaN std where
    only one did)."""
    per_epoch: dict[int, list[float]] = {}
    for history in histories:
        for h, v in zip(history, epoch_values(history, split, name)):
            if v == v:  # not NaN
                per_epoch.setdefault(h["epoch"], []).append(v)
    epochs = sorted(per_epoch)
    stats = [mean_std(per_epoch[e]) for e in epochs]
    return epochs, [m for m, _ in stats], [s for _, s in stats]


def curve_line(curve: Curve, histories: Sequence[Sequence[Mapping[str, Any]]], split: str, name: str,
               label: str | None, color: str) -> Line | None:
    """The line of ``curve`` for ``name`` in ``split`` (a band for several runs); None if no run logged it."""
    epochs, mean, std = mean_curve(histories, split, name)
    if not epochs:
        return None
    return Line(label, epochs, mean, std if len(curve.runs) > 1 else None, color=color, dashed=split != "dev")


def plot(paths: Sequence[str | Path], out: str | Path = DEFAULT_OUT, metric: str | None = None) -> Path:
    """Draw the lines of ``paths`` into the PNG ``out``; returns its path."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ExperimentError(f"--out {out}: give a .png file name")
    curves = [c for p in paths for c in curves_of(p)]
    histories = {c.name: [read_history(r / "metrics.jsonl") for r in c.runs] for c in curves}
    for c in [c for c in curves if not any(histories[c.name])]:
        print(f"note: {c.name}: no epoch was logged yet; left out")
        curves.remove(c)
    if not curves:
        raise ExperimentError("no run in these paths has finished an epoch: nothing to plot")
    everything = [h for c in curves for hs in histories[c.name] for h in hs]
    chosen = metric or Counter(c.settings.get("metric", "accuracy") for c in curves).most_common(1)[0][0]
    logged = sorted({k for h in everything for k in h.get("dev") or {}})
    if chosen not in logged:
        raise ExperimentError(f"--metric {chosen}: no run logged it on dev; they logged {', '.join(logged) or 'none'}")
    shown = shown_metric(everything, chosen)
    names = labels([c.settings for c in curves], [c.name for c in curves])
    loss: list[Line | None] = []
    scores: list[Line | None] = []
    for i, (c, label) in enumerate(zip(curves, names)):
        runs, color = histories[c.name], f"C{i % 10}"
        label = f"{label} ({len(c.runs)} seeds)" if len(c.runs) > 1 else label
        loss += [curve_line(c, runs, "", "train_loss", None, color), curve_line(c, runs, "dev", "loss", None, color)]
        scores += [curve_line(c, runs, "dev", shown, label, color), curve_line(c, runs, "train", shown, None, color)]
    out.parent.mkdir(parents=True, exist_ok=True)
    draw_panels([("loss", "loss", [x for x in loss if x]), (shown, shown, [x for x in scores if x])], out,
                title="solid: dev, dashed: training" + ("; bands: ± 1 std over seeds" if any(
                    len(c.runs) > 1 for c in curves) else ""), panel_width=5, legend_below=True)
    print(f"wrote {out}: " + "; ".join(names))
    return out


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="RUN_OR_EXPERIMENT",
                   help="run folders (holding metrics.jsonl), seeds experiments, or folders holding runs")
    p.add_argument("--out", default=DEFAULT_OUT, help="the PNG to write")
    p.add_argument("--metric", default=None,
                   help="the dev metric of the right panel (default: the one the runs selected their best epoch on)")


def main(args: argparse.Namespace, task_argv: list[str]) -> Path:
    return plot(args.paths, args.out, args.metric)


__all__ = ["Curve", "add_args", "curves_of", "find_runs", "labels", "main", "mean_curve", "plot", "saved_settings",
           "shared"]
