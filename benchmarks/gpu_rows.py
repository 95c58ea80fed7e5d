"""The bookkeeping of ``benchmarks/gpu_check.py``: rows (a name, pass / fail / skipped with its
reason, numbers, seconds, peak memory), the fake hub cache the rows load from, task scripts run as
subprocesses that report their own peak memory, and the JSON and markdown written at the end.

Kept apart from ``gpu_check.py`` so that the file listing what is checked reads as that list.
Run as a script, this module is the wrapper every subprocess row goes through:
``python benchmarks/gpu_rows.py SCRIPT ARGS...`` runs SCRIPT as ``__main__`` (as ``python SCRIPT``
would, torchrun's ranks included) and writes its peak memory to ``$GPU_CHECK_PEAK``: a parent
cannot read a child's CUDA peak, and a child's peak resident set is not reset between children.
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.measure import rss_mib  # noqa: E402
from tests.conftest import write_hub_cache  # noqa: E402
from tests.test_hub_cache import run  # noqa: E402

PEAK_ENV = "GPU_CHECK_PEAK"  # the file a wrapped subprocess writes {"peak_mib": ...} to


class Skip(Exception):  # noqa: N818 (a row's outcome, not an error)
    """Raised inside a row: the row is skipped, and the message is its reason."""


@dataclass
class Row:
    name: str
    status: str = "pass"  # pass, fail or skipped
    reason: str = ""  # why skipped or failed
    numbers: dict[str, object] = field(default_factory=dict)
    seconds: float = 0.0
    peak_mib: float | None = None  # GPU memory on CUDA, else the process's resident set


def reset_peak(device: torch.device) -> None:
    """Start a fresh peak: CUDA's allocator counter, or on Linux the resident-set high-water mark."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := current RSS


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return rss_mib("VmHWM")


class Report:
    """The rows in the order they ran. A row that raises is a failure and the next row runs; a
    row started after ``budget_s`` is skipped, so the command ends inside its time limit. With
    ``out``, the JSON and the table are rewritten after every row: a run killed at its limit
    still leaves the rows it finished."""

    def __init__(self, device: torch.device, budget_s: float, out: Path | None = None,
                 header: dict[str, object] | None = None) -> None:
        self.device, self.rows, self.start, self.budget_s = device, [], time.monotonic(), budget_s
        self.out, self.header = out, header or {}

    def remaining(self, until: float | None = None) -> float:
        """Seconds left before ``until`` (seconds after the start; default: the whole budget)."""
        return (self.budget_s if until is None else until) - (time.monotonic() - self.start)

    def check(self, name: str, fn: Callable[..., None], *args: object) -> Row:
        """Run ``fn(row, *args)``, which fills ``row.numbers`` and raises ``Skip`` or fails by raising."""
        r = Row(name)
        t0 = time.monotonic()
        try:
            if self.remaining() <= 0:
                raise Skip(self.spent())
            reset_peak(self.device)
            fn(r, *args)
            if r.peak_mib is None:
                r.peak_mib = round(peak_mib(self.device), 1)
        except Skip as e:
            r.status, r.reason = "skipped", str(e)
        except Exception as e:  # noqa: BLE001 (a failing row must not stop the others)
            r.status, r.reason = "fail", f"{type(e).__name__}: {e}"
            traceback.print_exc()
        r.seconds = round(time.monotonic() - t0, 2)
        self.add(r)
        return r

    def spent(self) -> str:
        return f"the time budget of {self.budget_s:.0f} s (--budget_s) was spent"

    def skip(self, name: str, reason: str) -> None:
        self.add(Row(name, status="skipped", reason=reason))

    def add(self, r: Row) -> None:
        self.rows.append(r)
        self.show(r)
        if self.out is not None:
            self.write(self.out, self.header)

    @staticmethod
    def show(r: Row) -> None:
        why = f" ({r.reason})" if r.reason else ""
        print(f"[{r.status:>7}] {r.name}{why} {json.dumps(r.numbers)}", flush=True)

    def failed(self) -> list[Row]:
        return [r for r in self.rows if r.status == "fail"]

    def write(self, out: Path, header: dict[str, object]) -> None:
        out.mkdir(parents=True, exist_ok=True)
        data = {**header, "failed": len(self.failed()), "rows": [asdict(r) for r in self.rows]}
        (out / "gpu_check.json").write_text(json.dumps(data, indent=1) + "\n")
        lines = [f"{', '.join(f'{k}: {v}' for k, v in header.items())}", "",
                 "| row | status | numbers | peak MiB | s |", "| --- | --- | --- | --- | --- |"]
        for r in self.rows:
            nums = ", ".join(f"{k} {v}" for k, v in r.numbers.items())
            status = r.status + (f": {r.reason}" if r.reason else "")
            lines.append(f"| {r.name} | {status.replace('|', '/')} | {nums} | {r.peak_mib or ''} | {r.seconds} |")
        (out / "gpu_check.md").write_text("\n".join(lines) + "\n")


def write_fake_hub(home: Path, configs: dict[str, dict]) -> None:
    """``home`` as HF_HOME after downloading each hub id in ``configs`` (random weights saved by
    ``transformers``, the real tokenizer files), through the tests' own cache writer."""
    for name, cfg in configs.items():
        if name == "gpt2":
            write_hub_cache(home, **cfg)
            continue
        scratch = home / f".scratch-{name}"  # the writer lays out models--gpt2: move it under the name
        write_hub_cache(scratch, **cfg)
        shutil.move(scratch / "hub" / "models--gpt2", home / "hub" / f"models--{name}")
        shutil.rmtree(scratch)


def run_wrapped(name: str, args: list[str], home: Path, scratch: Path, report: Report, until: float,
                torchrun: bool = False) -> Row:
    """One command as a row: ``python [-m torch.distributed.run ...] gpu_rows.py SCRIPT ARGS``,
    offline on the fake hub; passes when it exits with 0 before ``until`` (seconds after the
    report's start): the subprocess rows get a share of the budget, the timed rows the rest."""
    if report.remaining(until) <= 0:
        return Row(name, status="skipped", reason=f"their share of --budget_s, {until:.0f} s, was spent")
    timeout = report.remaining(until)
    peak_file = scratch / f"{name.replace(' ', '_')}.peak.json"
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"] if torchrun else []
    t0 = time.monotonic()
    r = Row(name)
    try:
        path = os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))  # carried wheels too
        proc = run([*launcher, str(Path(__file__).resolve()), *args], home, timeout=timeout,
                   **{PEAK_ENV: str(peak_file), "PYTHONPATH": path})
        if proc.returncode:
            print(f"--- {name}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}", flush=True)
            r.status, r.reason = "fail", f"exit {proc.returncode}: " + " / ".join(proc.stderr.strip().splitlines()[-3:])
    except Exception as e:  # noqa: BLE001 (a timeout is this row's failure)
        r.status, r.reason = "fail", f"{type(e).__name__}: {e}"
    if peak_file.exists():
        r.peak_mib = json.loads(peak_file.read_text())["peak_mib"]
    r.seconds = round(time.monotonic() - t0, 2)
    return r


def run_rows_parallel(report: Report, jobs: list[Callable[[], Row]], workers: int) -> None:
    """Subprocess rows side by side (correctness, not timing: nothing else runs meanwhile)."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for r in pool.map(lambda job: job(), jobs):
            report.add(r)


def _wrapped_main() -> None:
    script, *args = sys.argv[1:]
    sys.argv = [script, *args]
    here = (str(ROOT), str(Path(__file__).resolve().parent))
    sys.path[:] = [str(Path(script).resolve().parent), *(p for p in sys.path if p not in here)]  # as `python SCRIPT`
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else rss_mib("VmHWM")
        if os.environ.get(PEAK_ENV):
            Path(os.environ[PEAK_ENV]).write_text(json.dumps({"peak_mib": round(peak, 1)}))


if __name__ == "__main__":
    _wrapped_main()
