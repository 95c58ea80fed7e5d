"""The Gradescope submission: what goes in the zip, and checks that it will be graded.

The course's ``prepare_submit.py`` zips every root ``.py`` file and the folders
``predictions/``, ``models/`` and ``modules/``. This keeps that layout (paths ``./<file>``) and
adds the local packages those files import (``cli/``, ``tasks/``, ``engine/``... for the task
scripts), found by reading their imports, so the zip runs as it is. It never packs the virtual environment,
data, run folders, caches or weights (``*.pt``, ``*.bin``, ``*.safetensors``): those are
what make a zip too large to upload.

Checks, before the zip is written:
- the prediction files the autograder reads exist and are in the starter's exact format
  (header, ``<id>, <value> `` lines, values in range, each id once and without ``, ``; sonnets
  readable by the starter's split), and hold one prediction per example of the data file beside
  them when that is there;
- the graders' imports (``models.gpt2.GPT2Model``, ``utils.model_size_to_params``,
  ``optimizer.AdamW``) succeed from the unpacked zip alone;
- each prediction file came from a complete run: ``predictions/provenance.json``
  (``tasks.publish``) names the run of each file; a partial run's file (``--limit``, splits
  carved offline) is an error, a file without a record (or changed since) a warning. Files the
  autograder never reads (``lora-sst-dev-out.csv``) get a warning naming the file it reads.
  The record and the ``replaced/`` files kept beside it stay out of the zip.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from engine.data import DataFormatError
from tasks.course_data import SONNETS_HEADER, check_ids, read_sentiment, read_sonnets
from tasks.publish import (
    PROVENANCE,
    REPLACED,
    Expected,
    expected_predictions,
    graded_names,
    never_read,
    read_records,
    score_text,
    sha256,
    shown,
)
from tasks.quora_data import read_quora

ZIP_NAME = "cs224n_default_final_project_submission.zip"
STARTER_FOLDERS = ("predictions", "models", "modules")
SKIP_DIRS = {"__pycache__", ".venv", "venv", "data", "runs", "checkpoints", ".git", ".pytest_cache", ".ruff_cache"}
SKIP_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".pyc", ".zip", ".part")
GRADER_IMPORTS = (("models.gpt2", "GPT2Model"), ("utils", "model_size_to_params"), ("optimizer", "AdamW"))
SIZE_WARNING_MB = 100.0  # Gradescope rejects large uploads; a zip this size almost surely holds weights


def origin(folder: Path, name: str, records: dict) -> tuple[str, str]:
    """(kind, line) of the run a published prediction file came from: kind ``complete``,
    ``partial`` (a refused file) or ``unknown`` (no record, or the file changed since)."""
    path, record = folder / name, records.get(name)
    if record is None:
        return "unknown", f"{shown(path)}: origin unknown (no record in {shown(folder / PROVENANCE)})"
    if record.get("sha256") != sha256(path):
        return "unknown", f"{shown(path)}: origin unknown (changed since {shown(record.get('run', '?'))} wrote it)"
    run = f"{shown(record.get('run', '?'))} ({score_text(record)}, {record.get('time', '?')})"
    if not record.get("complete"):
        return "partial", (f"{shown(path)}: from {run}, a partial run ({record.get('partial')}); the autograder "
                           "would grade it as your submission: rerun without that, or pass --force")
    return "complete", f"{shown(path)}: from {run}"


def read_id_predictions(path: str | Path, column: str) -> list[tuple[str, int]]:
    """(id, value) pairs of a file in the starter's format: the header ``id \\t <column> `` and
    lines ``<id>, <value> `` (what ``tasks.course_data.write_id_predictions`` writes), each id once."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    header = f"id \t {column} "
    if not lines or lines[0] != header:
        got = repr(lines[0]) if lines else "an empty file"
        raise DataFormatError(path, 1, f"header should be {header!r}, found {got}")
    out = []
    for lineno, text in enumerate(lines[1:], start=2):
        ident, sep, value = text.rpartition(", ")
        if not sep or not ident or not value.endswith(" ") or not value[:-1].lstrip("-").isdigit():
            raise DataFormatError(path, lineno, f"expected '<id>, <integer> ' (a space at the end), found {text!r}")
        out.append((ident, int(value[:-1])))
    check_ids(path, [(ident, lineno) for lineno, (ident, _) in enumerate(out, start=2)])
    return out


def check_prediction(folder: Path, exp: Expected, data_dir: Path) -> list[str]:
    """Problems of one present prediction file (empty list: it will be graded)."""
    path = folder / exp.name
    ref = data_dir / exp.reference
    try:
        if exp.column is None:
            if not path.read_text(encoding="utf-8").startswith(SONNETS_HEADER):
                return [f"{path}:1: the first line should be {SONNETS_HEADER!r}"]
            got, want = len(read_sonnets(path)), (len(read_sonnets(ref)) if ref.exists() else None)
        else:
            rows = read_id_predictions(path, exp.column)
            bad = [(i, v) for i, v in rows if v not in exp.values]
            if bad:
                return [f"{path}: value {bad[0][1]} (id {bad[0][0]}) is not one of {list(exp.values)}"]
            got, want = len(rows), None
            if ref.exists():
                ids = [r.id for r in (read_quora(ref, verbose=False) if exp.name.startswith("para")
                                      else read_sentiment(ref))]
                want = len(ids)
                missing = set(ids) - {i for i, _ in rows}
                if missing and got == want:
                    return [f"{path}: ids differ from {ref} (e.g. {sorted(missing)[0]!r} has no prediction)"]
    except (DataFormatError, OSError, UnicodeDecodeError) as e:
        return [str(e)]
    if want is not None and got != want:
        return [f"{path}: {got} predictions for the {want} examples of {ref}"]
    return []


def local_imports(py_file: Path, root: Path) -> set[str]:
    """Top-level names imported by a file that are packages or modules inside ``root``."""
    try:
        tree = ast.parse(py_file.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError):
        return set()
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return {n for n in names if (root / n).is_dir() or (root / f"{n}.py").is_file()}


def _skipped(rel: Path) -> bool:
    if rel.parts[:1] == ("predictions",) and rel.parts[1:2] in ((PROVENANCE,), (REPLACED,)):
        return True  # the publication record and replaced files: not for the autograder
    return any(p in SKIP_DIRS or p.startswith(".") for p in rel.parts) or rel.name.endswith(SKIP_SUFFIXES)


def _files_under(root: Path, folder: str) -> list[Path]:
    base = root / folder
    if not base.is_dir():
        return []
    return sorted(p.relative_to(root) for p in base.rglob("*") if p.is_file() and not _skipped(p.relative_to(root)))


def collect_files(root: str | Path) -> list[Path]:
    """Paths (relative to ``root``) to pack: the starter's set plus the local packages the packed
    Python files import, transitively; never what ``_skipped`` rejects."""
    root = Path(root)
    files = {p.relative_to(root) for p in root.glob("*.py") if not _skipped(p.relative_to(root))}
    for folder in STARTER_FOLDERS:
        files.update(_files_under(root, folder))
    seen: set[str] = set()
    while True:
        wanted = set().union(*(local_imports(root / f, root) for f in files if f.suffix == ".py")) - seen
        if not wanted:
            return sorted(files)
        seen |= wanted
        for name in wanted:
            files.update(p for p in _files_under(root, name) if p.suffix == ".py")


def check_imports(zip_path: Path, imports: Iterable[tuple[str, str]] = GRADER_IMPORTS) -> str | None:
    """None if the graders' imports work from the unpacked zip alone, else the error's last line."""
    code = "\n".join(f"from {m} import {n}" for m, n in imports)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(zip_path) as z:
            z.extractall(tmp)
        r = subprocess.run([sys.executable, "-c", code], cwd=tmp, env=env, capture_output=True, text=True)
    if r.returncode == 0:
        return None
    lines = r.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit status {r.returncode}"


@dataclass
class Report:
    packed: list[tuple[Path, int]] = field(default_factory=list)  # (path, bytes)
    missing: list[str] = field(default_factory=list)  # expected prediction files not there
    errors: list[str] = field(default_factory=list)  # what would fail grading
    origins: list[str] = field(default_factory=list)  # the run each packed prediction file came from
    warnings: list[str] = field(default_factory=list)
    written: bool = False


def prepare(root: str | Path, output: str | Path, overwrite: bool = False, force: bool = False,
            data_dir: str | Path | None = None, import_check: bool = True) -> Report:
    """Check and pack ``root`` into ``output``. The zip is written only without errors (or with
    ``force``), never over an existing file unless ``overwrite``."""
    root, output = Path(root), Path(output)
    if not (root / "models").is_dir():
        raise FileNotFoundError(f"{root}: not the project folder (it has no models/); run from the project root "
                                "or pass --root")
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; pass --overwrite to replace it, or --output another name")
    data_dir = Path(data_dir) if data_dir else root / "data"
    report = Report()
    folder = root / "predictions"
    records = read_records(folder)
    for exp in expected_predictions():
        if (folder / exp.name).exists():
            report.errors += check_prediction(folder, exp, data_dir)
            kind, line = origin(folder, exp.name, records)
            {"complete": report.origins, "partial": report.errors, "unknown": report.warnings}[kind].append(line)
        else:
            report.missing.append(f"predictions/{exp.name}")
    for path in sorted(folder.glob("*")) if folder.is_dir() else ():
        if path.is_file() and path.name not in graded_names() and not _skipped(path.relative_to(root)):
            report.warnings.append(f"{shown(path)}: {never_read(path.name)}")
    files = collect_files(root)
    tmp = output.with_name(output.name + ".part")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for f in files:
            z.write(root / f, os.path.join(".", f.as_posix()))
            report.packed.append((f, (root / f).stat().st_size))
    if import_check and (err := check_imports(tmp)):
        report.errors.append(f"the graders' imports fail from the zip alone ({err})")
    size_mb = tmp.stat().st_size / 1e6
    if size_mb > SIZE_WARNING_MB:
        report.warnings.append(f"the zip is {size_mb:.0f} MB; Gradescope uploads this large fail or are slow")
    if report.errors and not force:
        tmp.unlink()
        return report
    tmp.replace(output)
    report.written = True
    return report
