"""Prediction files belong to the run that made them; ``predictions/`` gets a copy only of a complete run's.

``predictions/`` is what ``prepare_submit.py`` zips for Gradescope, so a smoke run (``--limit``),
a run on Quora splits carved offline, or a worse run must not silently replace a good run's file
there. Every run therefore writes its prediction files into its own run folder
(``<run>/predictions/<the file names>``; a run that only predicts, which claims no run folder,
into a new ``predict-<timestamp>/`` beside the task's runs), and then publishes them:

- a destination the user named (a flag away from its default: ``--predictions_dir``,
  ``--para_dev_out``, ``--sonnet_out``...) always gets the file, complete run or not;
- a default destination (``predictions/...``) only from a complete run; a partial one leaves it
  alone and says, in one line, why and where its files are.

Each destination folder keeps ``provenance.json`` (file -> run, complete or not, dev metric,
time, content hash; written atomically under a lock on the folder), which ``prepare_submit.py``
reads to name each file's run and to refuse a partial run's file. When a file is replaced, the
old one stays recoverable: it lives in the run folder that made it, or, when that copy is gone
or differs (a file from before these records), it is moved to ``replaced/<timestamp>/`` first;
one line compares the two runs' dev metrics.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from engine.checkpoints import atomic_write
from engine.run_dir import unique_folder
from errors import InputError
from tasks.settings import RunSettings

try:  # POSIX: the destination folder is locked while its record is read, changed and written
    import fcntl
except ImportError:  # pragma: no cover - Windows: records are still written atomically
    fcntl = None  # type: ignore[assignment]

PROVENANCE = "provenance.json"  # beside the published files; never packed into the zip
REPLACED = "replaced"  # <destination folder>/replaced/<timestamp>/<file>: replaced files no run folder holds


@dataclass(frozen=True)
class Expected:
    """One prediction file the autograder reads, and how to check it."""

    name: str  # under predictions/
    column: str | None  # the header column of an id file; None for sonnets
    values: tuple[int, ...] = ()  # allowed values (id files)
    reference: str = ""  # the data file (under data/) holding the examples predicted


def expected_predictions() -> list[Expected]:
    """Every file of the starter's three tasks (see ../shared/data/README.md)."""
    out = []
    for mode in ("last-linear-layer", "full-model"):
        for ds, labels in (("sst", tuple(range(5))), ("cfimdb", (0, 1))):
            for split, ref in (("dev", "dev"), ("test", "test-student")):
                out.append(Expected(f"{mode}-{ds}-{split}-out.csv", "Predicted_Sentiment", labels,
                                    f"ids-{ds}-{ref}.csv"))
    for split, ref in (("dev", "dev"), ("test", "test-student")):
        out.append(Expected(f"para-{split}-output.csv", "Predicted_Is_Paraphrase", (8505, 3919), f"quora-{ref}.csv"))
    out.append(Expected("generated_sonnets.txt", None, reference="sonnets_held_out.txt"))
    out.append(Expected("generated_sonnets_dev.txt", None, reference="sonnets_held_out_dev.txt"))
    return out


def graded_names() -> list[str]:
    """The file names under ``predictions/`` that the autograder reads."""
    return [exp.name for exp in expected_predictions()]


def graded_instead(name: str) -> list[str]:
    """The graded files for the predictions a file named ``name`` holds: another fine-tune mode's
    ``<mode>-<sst|cfimdb>-<split>-out.csv`` stands for the starter modes' files of that dataset and split."""
    m = re.fullmatch(r".+-(sst|cfimdb)-(dev|test)-out\.csv", name)
    return [n for n in graded_names() if m and n.endswith(f"-{m[1]}-{m[2]}-out.csv")]


def never_read(name: str) -> str | None:
    """Why the autograder will not grade a prediction file named ``name``, and which file it reads
    instead (None: it reads this one). Runs and ``prepare_submit.py`` say it in these words."""
    if name in graded_names():
        return None
    instead = " or ".join(graded_instead(name))
    return f"the autograder never reads {name}; " + (
        f"it reads {instead} (rename it to have it graded)" if instead else "no graded file holds these predictions")


@dataclass(frozen=True)
class Target:
    """Where a prediction file is published, and whether the user named it (``explicit``)."""

    dest: Path
    explicit: bool = False


def is_explicit(settings: Any, name: str) -> bool:
    """Whether the destination field ``name`` of a settings dataclass differs from its default
    (the same folder spelled differently, ``./predictions``, is the default)."""
    default = next(f.default for f in fields(settings) if f.name == name)
    return os.path.abspath(getattr(settings, name)) != os.path.abspath(default)


def partial_reason(*, limit: int = 0, carved: tuple[str, ...] = (), max_steps: int = 0) -> str | None:
    """Why a run's predictions are not a submission (None: a complete run): fewer examples than
    the course's files (``--limit``), splits carved offline instead of the course's files, or
    training that ``--max_steps`` may cut short."""
    reasons = ([f"--limit {limit}"] if limit else []) + \
              ([f"{', '.join(carved)} missing: splits carved offline"] if carved else []) + \
              ([f"--max_steps {max_steps}"] if max_steps else [])
    return "; ".join(reasons) or None


def now() -> str:
    """UTC time of a record, to the second."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def shown(path: str | Path) -> str:
    """``path`` relative to the working folder when under it (the way a user typed it), else absolute."""
    path = Path(path).absolute()
    with contextlib.suppress(ValueError):
        return str(path.relative_to(Path.cwd()))
    return str(path)


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def score_text(record: Mapping[str, Any]) -> str:
    """``dev accuracy 0.519`` from a record (or ``no dev metric``)."""
    value = record.get("value")
    return f"dev {record.get('metric')} {value:.3f}" if isinstance(value, (int, float)) else "no dev metric"


# ----------------------------------------------------------------- provenance records


def read_records(folder: str | Path) -> dict[str, dict[str, Any]]:
    """The provenance records of a destination folder: file name -> record (empty if none)."""
    try:
        data = json.loads((Path(folder) / PROVENANCE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    files = data.get("files") if isinstance(data, dict) else None  # a damaged record: every file's origin unknown
    return {k: v for k, v in files.items() if isinstance(v, dict)} if isinstance(files, dict) else {}


def write_records(folder: Path, records: Mapping[str, Any]) -> None:
    """``folder/provenance.json``, replaced atomically (never half written)."""
    text = json.dumps({"files": dict(sorted(records.items()))}, indent=1) + "\n"
    atomic_write(folder / PROVENANCE, lambda f: f.write(text.encode("utf-8")))


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """The destination folder locked against another run publishing into it at the same time."""
    if fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def recoverable(record: Mapping[str, Any] | None, path: Path) -> bool:
    """Whether the file at ``path`` also lives, unchanged, in the run folder its record names."""
    if not record:
        return False
    source = Path(record.get("source", ""))
    return source.is_file() and source.resolve() != path.resolve() and sha256(source) == sha256(path)


def gone(record: Mapping[str, Any]) -> str:
    """Why a published file is not recoverable from the run its record names."""
    return "changed since it was copied" if Path(record.get("source", "")).is_file() else "no longer in that run"


def copy_atomically(src: Path, dest: Path) -> None:
    """``src`` to ``dest`` through a temporary file beside it: a reader never sees half a file."""
    with open(src, "rb") as f_src:
        atomic_write(dest, lambda f: shutil.copyfileobj(f_src, f))


def set_aside(path: Path) -> Path:
    """Move ``path`` to ``<its folder>/replaced/<timestamp>[-n]/``, never over an earlier one; returns where."""
    kept = unique_folder(path.parent / REPLACED, what=f"folder to set {path.name} aside in") / path.name
    os.replace(path, kept)
    return kept


def publish_file(src: Path, dest: Path, record: dict[str, Any]) -> str | None:
    """Copy a run's file ``src`` to ``dest`` and record where it came from; returns the line to
    print (None when ``src`` is ``dest``: the run wrote there itself)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with locked(dest.parent):
        records = read_records(dest.parent)
        old = records.get(dest.name)
        line = None
        if src.resolve() != dest.resolve():
            new = f"this run's ({score_text(record)})"
            if dest.exists():
                if recoverable(old, dest):
                    what = f"the file of {shown(old['run'])} ({score_text(old)})"
                else:
                    kept = set_aside(dest)
                    origin = f"the file of {shown(old['run'])} ({score_text(old)}, {gone(old)})" if old \
                        else "a file of unknown origin"
                    what = f"{origin}, kept as {shown(kept)},"
                line = f"{shown(dest)}: replaced {what} with {new}"
            else:
                line = f"{shown(dest)}: copied from {shown(src)} ({score_text(record)})"
            copy_atomically(src, dest)
        records[dest.name] = {**record, "source": str(src.resolve()), "sha256": sha256(dest)}
        write_records(dest.parent, records)
    if line and not record["complete"]:
        line += f" (a partial run: {record['partial']}; prepare_submit.py refuses it)"
    return line


# ----------------------------------------------------------------- one run's files


class RunPredictions:
    """The prediction files of one run: ``targets`` (key -> ``Target``, e.g. ``dev``/``test``),
    written into the run's own folder (``open``, then ``path``) and published (``publish``).
    ``partial``: why the run is not complete (``partial_reason``), None when it is."""

    def __init__(self, targets: Mapping[str, Target], partial: str | None = None) -> None:
        names = [t.dest.name for t in targets.values()]
        if len(set(names)) < len(names):
            shared = ", ".join(str(t.dest) for t in targets.values())
            raise InputError(f"two prediction files of this run share a file name ({shared}); the run folder keeps "
                             "them by name: give them different names")
        self.targets, self.partial = dict(targets), partial
        self.folder: Path | None = None

    def published(self) -> list[Path]:
        """The destinations this run will write (for the writability check before any work)."""
        return [t.dest for t in self.targets.values() if t.explicit or self.partial is None]

    def open(self, out_dir: Path | None, run: RunSettings, default_parent: str | Path,
             subdir: str | None = None) -> Path:
        """Make and return the run's own ``predictions/`` folder: ``<out_dir>/predictions``, or for a
        run without a run folder (it only predicts) a new ``predict-<timestamp>/predictions`` in the
        folder its runs would go to (``--output_dir[/subdir]``, else ``default_parent``)."""
        if out_dir is None:
            parent = Path(run.output_dir, subdir or "") if run.output_dir else Path(default_parent)
            out_dir = unique_folder(parent, prefix="predict-", what="folder for this run's predictions")
        self.folder = Path(out_dir) / "predictions"
        self.folder.mkdir(parents=True, exist_ok=True)
        return self.folder

    def path(self, key: str) -> Path:
        """Where the run writes the file of ``key`` (in its own folder; ``open`` first)."""
        assert self.folder is not None, "open() the run's folder first"
        return self.folder / self.targets[key].dest.name

    def publish(self, metric: str, value: float | None) -> None:
        """Copy the written files to their destinations where this run may (see the module's
        docstring), with their records, printing one line per file (old -> new) or one line on
        why the default destinations were left alone."""
        record = {"run": str(self.folder.parent.resolve()), "complete": self.partial is None,
                  "partial": self.partial, "metric": metric, "value": value, "time": now()}
        skipped = []
        for key, target in self.targets.items():
            if target.explicit or self.partial is None:
                line = publish_file(self.path(key), target.dest, record)
                if line:
                    print(line)
            else:
                skipped.append(target.dest)
        if skipped:
            where = ", ".join(sorted({shown(p.parent) + "/" for p in skipped}))
            print(f"{where} left alone: this run is partial ({self.partial}); its prediction files are in "
                  f"{shown(self.folder)}/")


__all__ = ["PROVENANCE", "REPLACED", "RunPredictions", "Target", "is_explicit", "partial_reason", "read_records",
           "score_text", "set_aside", "sha256", "shown"]
