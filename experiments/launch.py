"""Running a task's script as one run of an experiment, and reading back what the run wrote.

A seed or a sweep trial is the task's own command line -- ``classifier.py``,
``paraphrase_detection.py`` or ``sonnet_generation.py`` with the user's flags passed through
unchanged -- plus the flags the runner owns: ``--seed`` (seeds), the sampled values (sweeps), ``--output_dir`` (one run
folder each), ``--resume``/``--overwrite`` (decided from what the folder holds) and where the
prediction files go (inside the run folder, so runs never overwrite each other's). The script
is executed as a program (``runpy``, as ``python classifier.py ...`` would run it, in this
process, so Trainer callbacks attached with ``engine.tracking.attach`` reach its Trainer);
nothing of it is imported as a library. Results are read from the run folder afterwards
(``run_results``): the best epoch of each ``metrics.jsonl``, by the metric the run selected on.
"""

from __future__ import annotations

import json
import runpy
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cli.failures import continuation, nesting
from engine.checkpoints import load_checkpoint
from engine.run_dir import RunDirError
from engine.tracking import read_history
from errors import CheckpointError
from tasks.sentiment import DATASETS

ROOT = Path(__file__).resolve().parents[1]
DONE = "experiment-run.json"  # written in a run folder by the runner once the run has finished
RUNNER_FLAGS = ("--seed", "--output_dir", "--resume", "--overwrite", "--resume_allow_changes")


@dataclass(frozen=True)
class TaskScript:
    """A task's script and the flags that put its prediction files in a run folder."""

    script: str
    output_flags: Callable[[Path], list[str]]


TASKS: dict[str, TaskScript] = {
    "classifier": TaskScript("classifier.py", lambda d: ["--predictions_dir", str(d / "predictions")]),
    "paraphrase": TaskScript("paraphrase_detection.py", lambda d: [
        "--para_dev_out", str(d / "predictions" / "para-dev-output.csv"),
        "--para_test_out", str(d / "predictions" / "para-test-output.csv")]),
    "sonnet": TaskScript("sonnet_generation.py", lambda d: [
        "--dev_sonnet_out", str(d / "predictions" / "generated_sonnets_dev.txt"),
        "--sonnet_out", str(d / "predictions" / "generated_sonnets.txt")]),
}
SELECTION_METRIC = {"classifier": "accuracy", "paraphrase": "accuracy", "sonnet": "chrf"}  # a sweep's default


def sonnet_run_flags(data: Path, folder: Path) -> list[str]:
    """``sonnet_generation.py`` flags that read the course's sonnet files from ``data`` and put
    the run (checkpoints, metrics, generated sonnets) in ``folder``."""
    return [
        "--sonnet_path", str(data / "sonnets.txt"), "--held_out_sonnet_path", str(data / "sonnets_held_out.txt"),
        "--dev_held_out_sonnet_path", str(data / "sonnets_held_out_dev.txt"),
        "--dev_true_sonnet_path", str(data / "TRUE_sonnets_held_out_dev.txt"),
        "--output_dir", str(folder), "--sonnet_out", str(folder / "generated_sonnets.txt"),
        "--dev_sonnet_out", str(folder / "generated_sonnets_dev.txt"),
    ]


class ExperimentError(Exception):
    """Bad experiment input (flags the runner owns, a folder of another experiment...):
    one ``error:`` line and exit status 2 (``experiments.__main__``)."""


def flag_names(argv: Sequence[str]) -> set[str]:
    """The ``--flags`` in a command line (``--x=1`` counts as ``--x``)."""
    return {a.split("=", 1)[0] for a in argv if a.startswith("--")}


def check_task_flags(task: str, argv: Sequence[str], owned: Sequence[str] = ()) -> None:
    """Refuse task flags the runner sets itself (each run needs its own value)."""
    if task not in TASKS:
        raise ExperimentError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    probe = TASKS[task].output_flags(Path("."))
    clash = sorted(flag_names(argv) & {*RUNNER_FLAGS, *owned, *(f for f in probe if f.startswith("--"))})
    if clash:
        raise ExperimentError(f"{', '.join(clash)}: set by the runner for each run; drop them from the task flags")


def dataset_flag(argv: Sequence[str]) -> str | None:
    """The value of ``--dataset`` in a command line (the last one, as argparse takes it)."""
    value = None
    for i, a in enumerate(argv):
        if a == "--dataset" and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith("--dataset="):
            value = a.partition("=")[2]
    return value


def one_run_each(task: str, argv: Sequence[str]) -> list[tuple[str, list[str]]]:
    """(subfolder, command line) of each run ``argv`` stands for: a classifier on both datasets
    becomes one run per dataset, each finished, resumed or restarted on its own (one process over
    both would have to resume a dataset that never reached its first checkpoint)."""
    if task == "classifier" and dataset_flag(argv) in (None, "both"):
        return [(ds, [*argv, "--dataset", ds]) for ds in DATASETS]
    return [("", list(argv))]


def continuation_flags(folder: Path, argv: Sequence[str]) -> list[str] | None:
    """How a run folder continues: None if its run finished with this command line, ``--resume``
    if it holds a checkpoint, ``--overwrite`` if it holds only the files of a run killed before
    its first checkpoint, nothing if it is new. A finished run of another command line is an error."""
    done = folder / DONE
    if done.exists():
        saved = json.loads(done.read_text()).get("argv")
        if saved != list(argv):
            raise ExperimentError(f"{folder}: holds a finished run of another configuration ({' '.join(saved)}); "
                                  "pick another --out, or delete it to rerun")
        return None
    return continuation(folder)


def run_task(task: str, argv: Sequence[str], folder: Path) -> bool:
    """Run the task's script with ``argv`` in ``folder`` (continued when it can be); True if it
    ran, False if the folder already held this finished run. A refused command line ends as the
    script ends it (``SystemExit`` 2)."""
    folder.mkdir(parents=True, exist_ok=True)
    more = continuation_flags(folder, argv)
    if more is None:
        return False
    spec = TASKS[task]
    full = [*argv, "--output_dir", str(folder), *spec.output_flags(folder), *more]
    print(f"$ python {spec.script} {' '.join(full)}", flush=True)
    saved_argv = sys.argv
    sys.argv = [str(ROOT / spec.script), *full]
    try:
        with nesting():  # Ctrl-C reaches the experiment, which says how to continue all of it
            runpy.run_path(str(ROOT / spec.script), run_name="__main__")
    finally:
        sys.argv = saved_argv
    (folder / DONE).write_text(json.dumps({"task": task, "argv": list(argv)}) + "\n")
    return True


def selection(folder: Path) -> tuple[str, str]:
    """(metric, mode) the run in ``folder`` picked its best epoch by (its ``last.pt``'s TrainConfig)."""
    last = folder / "last.pt"
    if last.exists():
        try:
            cfg = load_checkpoint(last, mmap=True).get("train_config") or {}
        except CheckpointError as e:
            raise RunDirError(str(e)) from None
        return cfg.get("metric", "accuracy"), cfg.get("mode", "max")
    return "accuracy", "max"


def best_epoch(metrics_jsonl: Path, metric: str, mode: str = "max") -> dict[str, Any]:
    """The dev metrics of the best epoch in a ``metrics.jsonl`` (the first on ties, as the Trainer
    keeps it), with ``epoch``; {} if no epoch was evaluated."""
    best: dict[str, Any] = {}
    for rec in read_history(metrics_jsonl):
        dev = rec.get("dev") or {}
        if metric not in dev:
            continue
        if not best or (dev[metric] > best[metric] if mode == "max" else dev[metric] < best[metric]):
            best = {**dev, "epoch": rec["epoch"]}
    return best


def efficiency(folder: Path) -> dict[str, float]:
    """The efficiency numbers a run folder holds, if any: ``efficiency.json`` (a flat object) or
    ``metrics.jsonl`` records of type ``efficiency`` (the last one wins)."""
    found: dict[str, Any] = {}
    if (folder / "efficiency.json").exists():
        found.update(json.loads((folder / "efficiency.json").read_text()))
    log = folder / "metrics.jsonl"
    if log.exists():
        for line in log.read_text().splitlines():
            rec = json.loads(line)
            if rec.get("type") == "efficiency":
                found.update({k: v for k, v in rec.items() if k != "type"})
    return {k: float(v) for k, v in found.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_results(folder: Path, metric: str | None = None) -> dict[str, float]:
    """Flat numbers of a finished run: ``dev/<metric>`` of its best epoch and ``efficiency/<name>``,
    each prefixed by the subfolder of runs in subfolders (``sst/dev/accuracy`` for a classifier
    run on both datasets)."""
    out: dict[str, float] = {}
    for log in sorted(folder.rglob("metrics.jsonl")):
        sub = log.parent.relative_to(folder).as_posix()
        prefix = "" if sub == "." else f"{sub}/"
        chosen, mode = selection(log.parent)
        best = best_epoch(log, metric or chosen, mode)
        out.update({f"{prefix}dev/{k}": float(v) for k, v in best.items()})
        out.update({f"{prefix}efficiency/{k}": v for k, v in efficiency(log.parent).items()})
    return out


def parse_list(text: str, kind: type = str) -> list[Any]:
    """``"11711,42,7"`` -> ``[11711, 42, 7]``; an empty item or a bad value is an ``ExperimentError``."""
    items = [t.strip() for t in text.split(",")]
    try:
        values = [kind(t) for t in items if t]
    except ValueError:
        raise ExperimentError(f"{text!r}: expected a comma-separated list of {kind.__name__}") from None
    if not values or len(values) != len(items):
        raise ExperimentError(f"{text!r}: expected a comma-separated list of {kind.__name__}")
    return values


def split_task_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(runner flags, task flags): the task's flags follow a lone ``--``."""
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def describe(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())


__all__ = ["DONE", "ExperimentError", "SELECTION_METRIC", "TASKS",
           "TaskScript", "best_epoch", "check_task_flags", "continuation_flags",
           "dataset_flag", "describe", "efficiency", "flag_names", "one_run_each", "parse_list", "run_results",
           "run_task", "selection", "split_task_argv"]
