"""What a run leaves to be read while and after it trains: ``metrics.jsonl`` (one JSON record per
logging step and per epoch, ``append_record``; ``trim_metrics`` drops what a resumed run will
write again; ``read_history`` reads its epochs back), ``curves.png`` (redrawn after each epoch,
``plot_curves``; kept here so that the loop carries no plotting code; ``draw_panels`` also draws
``python -m experiments plot``'s overlays), and experiment tracking in the formats users already read.

``--report_to none|tensorboard|wandb`` (``TrainConfig.report_to``) adds one Trainer callback:

- ``tensorboard``: event files in the run folder (``tensorboard --logdir runs/``), through
  ``torch.utils.tensorboard`` (the ``tensorboard`` package, pinned in requirements.txt).
- ``wandb``: a Weights & Biases run whose files go to ``<run folder>/wandb``; offline (synced
  later with ``wandb sync``) when ``WANDB_MODE`` is unset and the W&B server cannot be reached.
  ``wandb`` is optional: ``--report_to wandb`` without it installed is a parse error saying
  how to install it (``cli.validation.report_to``, from ``REPORT_TO`` and ``INSTALL_HINT``).

Both mirror ``metrics.jsonl`` rather than recompute anything: after each logging step and each
epoch the callback reads the records the engine has just appended and sends them on (step
records as ``train/<key>``, epoch records as ``train/loss_epoch``, ``dev/<metric>`` and, for the
classifiers, which also score a sample of their training set, ``train/<metric>``; all at the global
optimizer step), so what TensorBoard or W&B show is exactly what the log holds,
on a resumed run too.

``attach(*callbacks)`` is the other way in: callbacks added to every Trainer built inside a
``with`` block, so a runner (a sweep's pruning callback) reaches the Trainer that a task's
``run`` builds without the task passing callbacks along.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import socket
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine import ranks

REPORT_TO = ("none", "tensorboard", "wandb")
INSTALL_HINT = {"tensorboard": "pip install -r requirements.txt (it pins tensorboard)",
                "wandb": "pip install wandb (optional, not in requirements.txt)"}
_ATTACHED: contextvars.ContextVar[tuple[Any, ...]] = contextvars.ContextVar("attached_callbacks", default=())


@contextlib.contextmanager
def attach(*callbacks: Any) -> Iterator[None]:
    """Add ``callbacks`` to every Trainer created inside the block (nested blocks add up)."""
    token = _ATTACHED.set(_ATTACHED.get() + callbacks)
    try:
        yield
    finally:
        _ATTACHED.reset(token)


def callbacks_for(config: Any) -> list[Any]:
    """The callbacks the engine adds to a Trainer: ``config.report_to``'s, then the attached ones."""
    kind = getattr(config, "report_to", "none")
    own = {"none": [], "tensorboard": [TensorBoardCallback()], "wandb": [WandbCallback()]}
    if kind not in own:
        raise ValueError(f"report_to must be one of {REPORT_TO}, got {kind!r}")
    return [*(own[kind] if ranks.is_main() else []), *_ATTACHED.get()]  # under torchrun: rank 0 reports


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of one ``metrics.jsonl`` record under the names the trackers show."""
    if record.get("type") == "step":
        return {f"train/{k}": float(v) for k, v in record.items()
                if k not in ("type", "epoch", "step") and isinstance(v, (int, float))}
    if record.get("type") == "epoch":
        out = {"train/loss_epoch": record["train_loss"]} if record.get("train_loss") is not None else {}
        out["train/epoch"] = record["epoch"]
        out.update({f"dev/{k}": v for k, v in (record.get("dev") or {}).items()})
        out.update({f"train/{k}": v for k, v in (record.get("train") or {}).items()})  # training-set metrics
        return {k: float(v) for k, v in out.items()}
    return {}


class LogMirror:
    """A Trainer callback that forwards each new ``metrics.jsonl`` record to ``write(name_to_value,
    step)``; subclasses open and close the tracker."""

    def __init__(self) -> None:
        self._path: Path | None = None
        self._offset = 0

    def on_train_begin(self, trainer: Any) -> None:
        self._path = Path(trainer.output_dir) / "metrics.jsonl"
        self._offset = self._path.stat().st_size if self._path.exists() else 0  # a resume: past records were sent
        self.open(trainer)

    def on_step_end(self, trainer: Any, step: int, loss: float | None) -> None:
        if loss is not None:  # a logging step: the engine has just appended its record
            self._forward()

    def on_epoch_end(self, trainer: Any, epoch: int, metrics: dict[str, Any]) -> None:
        self._forward()

    def on_train_end(self, trainer: Any, best: dict[str, Any]) -> None:
        self._forward()
        self.close()

    def _forward(self) -> None:
        if self._path is None or not self._path.exists():
            return
        with open(self._path) as f:
            f.seek(self._offset)
            text = f.read()
        complete = text[: text.rfind("\n") + 1]  # a line still being written waits for the next call
        self._offset += len(complete.encode())
        for line in complete.splitlines():
            record = json.loads(line)
            values = scalars(record)
            if values:
                self.write(values, int(record.get("step", 0)))
        self.flush()

    def open(self, trainer: Any) -> None: ...

    def write(self, values: Mapping[str, float], step: int) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class TensorBoardCallback(LogMirror):
    """Event files in the run folder, beside ``metrics.jsonl``."""

    writer: Any = None

    def open(self, trainer: Any) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(trainer.output_dir))

    def write(self, values: Mapping[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def wandb_reachable(timeout: float = 2.0) -> bool:
    """Whether the W&B server answers a TCP connection (no network: log offline)."""
    try:
        socket.create_connection(("api.wandb.ai", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


class WandbCallback(LogMirror):
    """A W&B run per training run (its config: the TrainConfig and the run's ``extra``), offline
    without network; a resumed run continues the same W&B run (its id is kept in the run folder)."""

    run: Any = None

    def open(self, trainer: Any) -> None:
        import wandb

        folder = Path(trainer.output_dir)
        id_file = folder / "wandb-run-id"
        run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
        id_file.write_text(run_id + "\n")
        mode = os.environ.get("WANDB_MODE") or ("online" if wandb_reachable() else "offline")
        if mode == "offline":
            print(f"W&B offline: the run is logged under {folder / 'wandb'}; upload it later with wandb sync")
        config = {**trainer._config_dict(), **{k: v for k, v in trainer.extra.items() if k != "args"},
                  **(trainer.extra.get("args") or {})}
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "gpt2-course"), dir=str(folder), id=run_id,
                              resume="allow", mode=mode, name=folder.name, config=config)

    def write(self, values: Mapping[str, float], step: int) -> None:
        self.run.log(dict(values), step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def append_record(path: str | Path, record: Mapping[str, Any]) -> None:
    """Append ``record`` as one JSON line to ``path`` (``metrics.jsonl``)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def trim_metrics(path: str | Path, epoch: int, step: int) -> int:
    """Drop the ``metrics.jsonl`` records written after the checkpoint being resumed (epoch
    records past ``epoch``, step records past ``step``): a kill between an epoch's evaluation
    and its checkpoint would otherwise leave that epoch logged twice. Returns the number dropped."""
    path = Path(path)
    if not path.exists():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:  # a line cut short by the kill
            continue
        late = rec.get("epoch", 0) > epoch if rec.get("type") == "epoch" else rec.get("step", 0) > step
        if not late:
            keep.append(line if line.endswith("\n") else line + "\n")
    if len(keep) != len(lines):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, path)
    return len(lines) - len(keep)


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """The epoch records of a ``metrics.jsonl`` (``epoch``, ``train_loss``, ``dev``, and ``train`` where
    the task scores the training set), in order; a line cut short by a kill is skipped."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("type") == "epoch":
            out.append(rec)
    return out


def shown_metric(history: Sequence[Mapping[str, Any]], metric: str) -> str:
    """The metric a curves panel shows: ``metric``, or when that is the dev loss (drawn beside the
    training loss already), the first other dev metric (e.g. chrF)."""
    names = [k for h in history for k in h.get("dev") or {}]
    return metric if metric != "loss" or "loss" not in names else next(
        (k for k in names if k not in ("loss", "perplexity")), metric)


def epoch_values(history: Sequence[Mapping[str, Any]], split: str, name: str) -> list[float]:
    """``name`` in each epoch record's ``split`` (``dev`` or ``train``; ``train_loss`` for the training
    loss); NaN where a record lacks it (matplotlib leaves a gap)."""
    if name == "train_loss":
        return [float("nan") if h.get("train_loss") is None else h["train_loss"] for h in history]
    return [float((h.get(split) or {}).get(name, float("nan"))) for h in history]


@dataclass
class Line:
    """One curve of a panel: a value per epoch, with a band of +- ``spread`` where given (seeds).
    Dev curves are drawn solid and training curves dashed, in every plot the project makes."""

    label: str | None
    epochs: Sequence[float]
    values: Sequence[float]
    spread: Sequence[float] | None = None
    color: str | None = None
    dashed: bool = False


def draw_panels(panels: Sequence[tuple[str, str, Sequence[Line]]], path: str | Path, title: str = "",
                panel_width: float = 4.5, legend_below: bool = False) -> None:
    """Panels side by side, each (title, y label, lines) over integer epochs, saved as a PNG at ``path``;
    ``legend_below``: one legend of every labelled line under the panels (long labels hide no curve)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(panel_width * len(panels), 3.5), squeeze=False)
    for ax, (name, ylabel, lines) in zip(axes[0], panels):
        for line in lines:
            drawn = ax.plot(line.epochs, line.values, marker="o", markersize=3, label=line.label, color=line.color,
                            linestyle="--" if line.dashed else "-")
            if line.spread is not None:
                low = [v - s for v, s in zip(line.values, line.spread)]
                high = [v + s for v, s in zip(line.values, line.spread)]
                ax.fill_between(line.epochs, low, high, color=drawn[0].get_color(), alpha=0.2, linewidth=0)
        if any(line.label for line in lines) and not legend_below:
            ax.legend(fontsize="small")
        ax.set(xlabel="epoch", ylabel=ylabel, title=name)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    if title:
        fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    if legend_below:
        handles = [h for ax in axes[0] for h in ax.get_legend_handles_labels()[0]]
        fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), fontsize="small")
    fig.savefig(path, dpi=100, bbox_inches="tight" if legend_below else None)
    plt.close(fig)


def plot_curves(history: Sequence[Mapping[str, Any]], metric: str, path: str | Path) -> None:
    """Losses and a metric per epoch, side by side, saved as a PNG at ``path``. ``history`` holds the
    Trainer's epoch records (``epoch``, ``train_loss``, ``dev``, ``train``). A dev ``loss`` (held-out
    cross-entropy) is drawn beside the training loss; the right panel shows ``shown_metric`` on dev,
    and on the training set where the task scores it (classifiers), for the train-dev gap."""
    epochs = [h["epoch"] for h in history]
    loss = [Line("training", epochs, epoch_values(history, "", "train_loss"), color="tab:blue", dashed=True)]
    if any("loss" in (h.get("dev") or {}) for h in history):
        loss.append(Line("dev", epochs, epoch_values(history, "dev", "loss"), color="tab:orange"))
    shown = shown_metric(history, metric)
    scores = [Line("dev", epochs, epoch_values(history, "dev", shown), color="tab:orange")]
    if any(shown in (h.get("train") or {}) for h in history):
        scores.append(Line("training set (eval mode)", epochs, epoch_values(history, "train", shown), color="tab:blue",
                           dashed=True))
    else:
        scores[0].label = None
    draw_panels([("loss", "loss", loss), (f"dev {shown}" if len(scores) == 1 else shown, shown, scores)], path)


__all__ = [
    "INSTALL_HINT", "Line", "LogMirror", "REPORT_TO", "TensorBoardCallback", "WandbCallback", "append_record",
    "attach", "callbacks_for", "draw_panels", "epoch_values", "plot_curves", "read_history", "scalars", "shown_metric",
    "wandb_reachable",
]
