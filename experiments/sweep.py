"""Sweeps: an Optuna hyperparameter search over a task's flags, stored in SQLite.

    python -m experiments sweep --task classifier --out runs/sweeps/sst-lora --n_trials 20 \\
        --space lr=loguniform:1e-5:1e-3 --space batch_size=choice:8,16 \\
        -- --dataset sst --fine-tune-mode lora --epochs 5

Each trial is one run of the task's script with the flags after ``--`` and the sampled values
(``--lr ...``), in its own run folder ``<out>/trial-N``. The study lives in ``--storage``
(default ``sqlite:///<out>/study.db``) under ``--study``: rerunning the same command after an
interruption continues until ``--n_trials`` trials have finished (completed or pruned); the
trial that was interrupted is run again with the same values and resumes from its run folder's
``last.pt``. Several processes may run the same command at once and share the study (a killed
process's trial is noticed by its missing heartbeat and retried). Trials are pruned on the
dev metric each epoch reports (``--pruner``). At the end: ``<out>/trials.{csv,md}`` (every
trial, its state, value and values) and ``optimization_history.png`` / ``param_importances.png``.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cli.validation import positive_int
from engine import tracking
from experiments.launch import (
    SELECTION_METRIC,
    TASKS,
    ExperimentError,
    check_task_flags,
    dataset_flag,
    run_results,
    run_task,
)
from experiments.space import Param, SpaceError, combine, read_space_file, space_arg
from experiments.tables import write_tables

FINISHED = ("COMPLETE", "PRUNED")


class PruneOnDev:
    """A Trainer callback: report the dev metric of each epoch to the trial, and end the trial
    (``optuna.TrialPruned``, recorded as a pruned trial) when the pruner says so."""

    def __init__(self, trial: Any, metric: str) -> None:
        self.trial, self.metric = trial, metric

    def on_train_begin(self, trainer: Any) -> None: ...

    def on_step_end(self, trainer: Any, step: int, loss: float | None) -> None: ...

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict[str, Any]) -> None:
        import optuna

        if self.metric not in metrics:
            raise ExperimentError(f"the run reports {sorted(metrics)}, not --metric {self.metric}")
        self.trial.report(metrics[self.metric], epoch)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"epoch {epoch}: dev {self.metric} {metrics[self.metric]:.4f}")

    def on_train_end(self, trainer: Any, best: dict[str, Any]) -> None: ...


def pruner_arg(text: str) -> str:
    """``--pruner``: ``median`` (below the median of earlier trials at the same epoch, after 2
    trials and 1 epoch), ``none``, or ``threshold:X`` (a metric worse than X ends the trial)."""
    kind, _, value = text.partition(":")
    if text in ("median", "none"):
        return text
    try:
        float(value)
    except ValueError:
        kind = ""
    if kind != "threshold":
        raise argparse.ArgumentTypeError(f"expected median, none or threshold:X, got {text!r}")
    return text


def build_pruner(text: str, direction: str) -> Any:
    import optuna

    if text == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    if text == "none":
        return optuna.pruners.NopPruner()
    bound = float(text.partition(":")[2])
    return optuna.pruners.ThresholdPruner(**({"lower": bound} if direction == "maximize" else {"upper": bound}))


class TaskExit(Exception):
    """The task's script ended (its flags refused: it printed why); carried out of Optuna, which
    records the trial as failed, and turned back into the same exit status."""

    def __init__(self, code: Any) -> None:
        super().__init__(f"the task exited with status {code}")
        self.code = code


def requeue(study: Any, trial: Any) -> None:
    """Run a failed (interrupted) trial again with its values, in its run folder (``origin``),
    unless a later trial already does."""
    origin = trial.user_attrs.get("origin", trial.number)
    if any(t.number > trial.number and t.user_attrs.get("origin", t.number) == origin
           for t in study.get_trials(deepcopy=False)):
        return
    study.enqueue_trial(trial.params, user_attrs={"origin": origin})
    print(f"trial {trial.number} was interrupted: queued again with the same values, resuming trial-{origin}")


def open_study(args: argparse.Namespace, space: Sequence[Param], task_argv: Sequence[str]) -> Any:
    """Create or load the study; a study of another task, flags or space is refused."""
    import optuna

    Path(args.out).mkdir(parents=True, exist_ok=True)
    url = args.storage or f"sqlite:///{Path(args.out) / 'study.db'}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: stable since 2.9
        storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}},
                                             heartbeat_interval=30, grace_period=120,
                                             heartbeat_stale_trial_callback=requeue)
    pruner = build_pruner(args.pruner, args.direction)
    study = optuna.create_study(study_name=args.study or Path(args.out).name, storage=storage, load_if_exists=True,
                                direction=args.direction, pruner=pruner,
                                sampler=optuna.samplers.TPESampler(seed=args.sampler_seed))
    setup = {"task": args.task, "task_argv": list(task_argv), "space": [p.spec() for p in space],
             "metric": args.metric}
    saved = {k: study.user_attrs[k] for k in setup if k in study.user_attrs}
    if saved and saved != setup:
        diff = "; ".join(f"{k}: {saved.get(k)} -> {v}" for k, v in setup.items() if saved.get(k) != v)
        raise ExperimentError(f"study {study.study_name} in {url} was run with other settings ({diff}); "
                              "rerun with its settings or pick another --study")
    for k, v in setup.items():
        study.set_user_attr(k, v)
    return study


def objective(args: argparse.Namespace, space: Sequence[Param], task_argv: Sequence[str]):
    def run(trial: Any) -> float:
        origin = trial.user_attrs.get("origin", trial.number)
        trial.set_user_attr("origin", origin)
        values = {p.name: p.suggest(trial) for p in space}
        folder = Path(args.out) / f"trial-{origin}"
        trial.set_user_attr("run_dir", str(folder))
        argv = [*task_argv, *(x for k, v in values.items() for x in (f"--{k}", str(v)))]
        print(f"trial {trial.number}: {', '.join(f'{k}={v}' for k, v in values.items())}", flush=True)
        with tracking.attach(PruneOnDev(trial, args.metric)):
            try:
                run_task(args.task, argv, folder)
            except SystemExit as e:
                raise TaskExit(e.code) from None
        results = run_results(folder, args.metric)
        if f"dev/{args.metric}" not in results:
            raise ExperimentError(f"{folder}: no dev {args.metric} was logged (--epochs 0?)")
        return results[f"dev/{args.metric}"]

    return run


def count_finished(study: Any) -> int:
    return sum(t.state.name in FINISHED for t in study.get_trials(deepcopy=False))


def run_sweep(args: argparse.Namespace, task_argv: Sequence[str]) -> Any:
    """Run (or continue) the sweep until ``args.n_trials`` trials have finished; write the report."""
    import optuna

    space = combine([*args.space, *(read_space_file(args.space_file) if args.space_file else [])])
    check_task_flags(args.task, task_argv, owned=[f"--{p.name}" for p in space])
    study = open_study(args, space, task_argv)
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)):
        requeue(study, t)
    done = count_finished(study)
    if done:
        print(f"study {study.study_name}: {done} of {args.n_trials} trials finished earlier")
    if done < args.n_trials:
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        study.optimize(objective(args, space, task_argv), gc_after_trial=True,
                       callbacks=[optuna.study.MaxTrialsCallback(args.n_trials, states=states)])
    report(study, Path(args.out))
    return study


def report(study: Any, out: Path) -> None:
    """``trials.{csv,md}`` and the plots of the study."""
    names = sorted({k for t in study.trials for k in t.params})
    rows = [{"trial": t.number, "state": t.state.name, "value": t.value,
             "epochs": len(t.intermediate_values), **t.params,
             "seconds": t.duration.total_seconds() if t.duration else None,
             "run folder": t.user_attrs.get("run_dir")} for t in study.trials]
    csv_path, md_path = write_tables(rows, ["trial", "state", "value", "epochs", *names, "seconds", "run folder"],
                                     out / "trials", f"study {study.study_name}")
    print(md_path.read_text())
    try:
        best = study.best_trial
        print(f"best: trial {best.number}, value {best.value:.4f}, {best.params}")
    except ValueError:
        print("no trial completed yet")
    for path in plot(study, out):
        print(f"wrote {path}")
    print(f"wrote {csv_path} and {md_path}")


def plot(study: Any, out: Path) -> list[Path]:
    """Optimisation history and parameter importances as PNGs (Optuna's matplotlib plots), where
    there are enough completed trials to draw them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as vis

    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    plots = {"optimization_history": (vis.plot_optimization_history, 1),
             "param_importances": (vis.plot_param_importances, 2)}
    written = []
    for name, (fn, need) in plots.items():
        if len(complete) < need:
            print(f"note: {name}.png needs {need} completed trials, the study has {len(complete)}")
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the matplotlib backend is marked experimental
            try:
                ax = fn(study)
            except (ValueError, RuntimeError) as e:  # e.g. importances when no value varies
                print(f"note: no {name}.png ({e})")
                continue
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=100)
        plt.close(fig)
        written.append(out / f"{name}.png")
    return written


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, choices=tuple(TASKS),
                   help="the task script each trial runs (classifier.py, paraphrase_detection.py or "
                        "sonnet_generation.py)")
    p.add_argument("--out", required=True, help="sweep folder: trial-<N>/ run folders, trials.{csv,md}, plots")
    p.add_argument("--space", type=space_arg, action="append", default=[], metavar="NAME=KIND:ARGS",
                   help="one dimension, e.g. lr=loguniform:1e-5:1e-3, batch_size=choice:8,16, lora_r=int:4:32:4, "
                        "warmup_ratio=uniform:0:0.2 (repeatable)")
    p.add_argument("--space_file", default=None, help="YAML or JSON mapping of name to spec (or to a list of choices)")
    p.add_argument("--n_trials", type=positive_int, default=20,
                   help="finished (completed or pruned) trials in the study")
    p.add_argument("--metric", default=None,
                   help="dev metric to optimise, as the run's eval reports it (default: accuracy; sonnet: chrf; "
                        "a sonnet run also reports loss, perplexity and form_*: use --direction minimize for loss)")
    p.add_argument("--direction", choices=("maximize", "minimize"), default="maximize")
    p.add_argument("--pruner", type=pruner_arg, default="median",
                   help="median (default), none, or threshold:X (end trials whose metric is below X)")
    p.add_argument("--study", default=None, help="study name (default: the name of --out)")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default sqlite:///<out>/study.db)")
    p.add_argument("--sampler_seed", type=int, default=None, help="seed of the TPE sampler")


def main(args: argparse.Namespace, task_argv: list[str]) -> Any:
    args.metric = args.metric or SELECTION_METRIC[args.task]
    if args.task == "classifier" and dataset_flag(task_argv) in (None, "both"):
        raise ExperimentError("a sweep optimises one dataset: add --dataset sst (or cfimdb, cola) after --")
    try:
        return run_sweep(args, task_argv)
    except SpaceError as e:
        raise ExperimentError(str(e)) from None
    except TaskExit as e:
        raise SystemExit(e.code) from None
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to continue the sweep", file=sys.stderr)
        raise SystemExit(130) from None


__all__ = ["PruneOnDev", "TaskExit", "add_args", "build_pruner", "main", "objective", "open_study",
           "plot", "pruner_arg", "report", "requeue", "run_sweep"]
