"""Files the pipeline steps hand to each other: JSON lines (appendable, so a
step can resume), Quora-format pair files, and the JSON summary every step
writes next to its output."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from engine.checkpoints import atomic_write
from engine.data import DataFormatError

QUORA_HEADER = ["", "id", "sentence1", "sentence2", "is_duplicate"]


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Records of a JSON-lines file. A truncated last line (a run killed mid-write)
    is skipped; a bad line elsewhere is one ``error: file:line: ...`` (``DataFormatError``)."""
    path = Path(path)
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").split("\n")
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines):  # no newline after it: interrupted write
                return
            raise DataFormatError(path, i, f"invalid JSON ({e.msg}: column {e.colno})") from None
        if not isinstance(record, dict):
            raise DataFormatError(path, i, "not a JSON object ({...}); every line must be one")
        yield record


def append_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Append and flush, one line per record, so finished work survives a crash."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _drop_partial_line(path)
    with path.open("a", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _drop_partial_line(path: Path) -> None:
    """Cut a half-written last line (no trailing newline) left by an interrupted run."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Replace ``path`` atomically with ``records``."""
    _atomic_write(Path(path), "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def summary_path(output: str | Path) -> Path:
    """``out/pairs.jsonl`` -> ``out/pairs.summary.json``."""
    output = Path(output)
    return output.with_name(output.name.split(".")[0] + ".summary.json")


def write_summary(output: str | Path, step: str, **fields: Any) -> Path:
    """The step's counts, settings and seed, next to its output."""
    path = summary_path(output)
    _atomic_write(path, json.dumps({"step": step, "output": str(output), **fields}, indent=2, default=str) + "\n")
    return path


def pair_id(s1: str, s2: str) -> str:
    """A stable 25-hex-digit id, the shape of the Quora ids."""
    return hashlib.sha1(f"{s1}\t{s2}".encode()).hexdigest()[:25]


def _clean(s: str) -> str:
    return " ".join(s.split())  # no tabs or newlines inside a TSV field


def write_quora_tsv(
    path: str | Path,
    positives: Sequence[tuple[str, str]],
    negatives: Sequence[tuple[str, str]] = (),
    seed: int = 0,
) -> int:
    """Write pairs in the Quora file format (header ``\\tid\\tsentence1\\tsentence2\\tis_duplicate``,
    labels ``1.0``/``0.0``, csv quoting as pandas writes it), shuffled with ``seed``,
    so ``paraphrase_detection.py --para_train`` reads it unchanged. Returns the row count."""
    rows = [(a, b, "1.0") for a, b in positives] + [(a, b, "0.0") for a, b in negatives]
    random.Random(seed).shuffle(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(QUORA_HEADER)
        for i, (a, b, label) in enumerate(rows):
            a, b = _clean(a), _clean(b)
            w.writerow([i, pair_id(a, b), a, b, label])
    os.replace(tmp, path)
    return len(rows)


def _atomic_write(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
