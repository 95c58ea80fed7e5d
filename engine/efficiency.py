"""The efficiency table of a run, as the published reports compared full fine-tuning, LoRA,
DoRA and the last layer: trainable parameters and their share of the total, seconds per epoch,
and peak memory.

``EfficiencyRecorder`` is a Trainer callback (``tasks.common.fit_task`` adds it to every run):
at the end of training it prints the table and writes ``efficiency.json`` in the run folder,
where experiment summaries collect it (``read_efficiency`` + ``efficiency_table`` over runs).

What is measured, and why so:
- ``seconds_per_epoch``: wall time of the optimizer steps of an epoch (the dev evaluation is
  timed apart, as ``eval_seconds_per_epoch``, since its cost depends on the dev set, not on the
  method). An epoch's time counts from the end of the previous one, so it includes saving that
  epoch's checkpoint; a resumed run times only the part of an epoch it ran.
- ``peak_memory_bytes``: on CUDA, ``torch.cuda.max_memory_allocated`` since training began (the
  tensors the method needs); on the CPU, the process's peak resident set size (``ru_maxrss``),
  which also counts the Python runtime and whatever the process held before this run.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from engine import ranks
from engine.trainer import Callback, Trainer

EFFICIENCY_FILE = "efficiency.json"


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts: the table's columns, and the log line every CLI prints."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what was measured): CUDA's peak allocation on ``device``, else the peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda max_memory_allocated"
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return int(rss if sys.platform == "darwin" else rss * 1024), "cpu peak RSS"


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


class EfficiencyRecorder(Callback):
    """Times each epoch's steps and evaluation, and at the end of training writes
    ``<output_dir>/efficiency.json`` and prints the one-row table (``record`` holds it)."""

    def __init__(self, print_table: bool = True) -> None:
        self.print_table = print_table
        self.record: dict[str, Any] = {}

    def on_train_begin(self, trainer: Trainer) -> None:
        if trainer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.device)
        self.train_seconds: list[float] = []
        self.eval_seconds: list[float] = []
        self._epoch_start = self._steps_end = time.perf_counter()

    def on_step_end(self, trainer: Trainer, step: int, loss: float | None) -> None:
        if trainer.step_in_epoch == trainer.steps_per_epoch:  # the epoch's last optimizer step
            self._steps_end = time.perf_counter()
            self.train_seconds.append(self._steps_end - self._epoch_start)

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, Any]) -> None:
        now = time.perf_counter()
        self.eval_seconds.append(now - self._steps_end)
        self._epoch_start = now

    def on_train_end(self, trainer: Trainer, best: dict[str, Any]) -> None:
        n_train, n_total = count_parameters(trainer.model)
        memory, kind = peak_memory(trainer.device)
        args = trainer.extra.get("args") or {}
        self.record = {
            "run": str(trainer.output_dir),
            "mode": (trainer.extra.get("fine_tune") or {}).get("mode") or args.get("fine_tune_mode"),
            "trainable_parameters": n_train,
            "parameters": n_total,
            "trainable_share": n_train / n_total if n_total else 0.0,
            "epochs": len(self.train_seconds),
            "seconds_per_epoch": _mean(self.train_seconds),
            "eval_seconds_per_epoch": _mean(self.eval_seconds),
            "peak_memory_bytes": memory,
            "peak_memory_kind": kind,
            "device": str(trainer.device),
        }
        path = trainer.output_dir / EFFICIENCY_FILE
        if ranks.is_main():  # under torchrun: one writer
            path.write_text(json.dumps(self.record, indent=2) + "\n")
        if self.print_table:
            print(f"efficiency ({path}):\n{efficiency_table([self.record])}")


def read_efficiency(run_dir: str | Path) -> dict[str, Any]:
    """The record a run wrote in its folder."""
    return json.loads((Path(run_dir) / EFFICIENCY_FILE).read_text())


def _seconds(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def efficiency_table(records: Sequence[Mapping[str, Any]]) -> str:
    """A markdown table with one row per run record (``EfficiencyRecorder.record``)."""
    rows = ["| run | mode | trainable parameters | share | s / epoch | peak memory |",
            "|---|---|---:|---:|---:|---:|"]
    for r in records:
        memory = f"{r['peak_memory_bytes'] / 2**20:,.0f} MiB ({r['peak_memory_kind']})"
        rows.append(f"| {r['run']} | {r.get('mode') or '-'} | {r['trainable_parameters']:,} of {r['parameters']:,} "
                    f"| {100 * r['trainable_share']:.2f}% | {_seconds(r['seconds_per_epoch'])} | {memory} |")
    return "\n".join(rows)


__all__ = ["EFFICIENCY_FILE", "EfficiencyRecorder", "count_parameters", "efficiency_table", "peak_memory",
           "read_efficiency"]
