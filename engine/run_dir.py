"""Run folders with an owner: a run never overwrites, resumes into or mixes with another run's results.

A run folder (``last.pt``, ``best*.pt``, ``metrics.jsonl``, ...) belongs to one run at a time:

- **Default folders are new for each run**: ``runs/<task>/<mode>-<dataset>/<timestamp>/``, with ``latest``
  (a symlink, or a one-line pointer file where symlinks fail) naming the newest one, so rerunning a
  command never collides with an earlier run. ``--resume`` without ``--output_dir`` continues ``latest``.
- **An explicit ``--output_dir`` that already holds a run is refused** unless ``--resume`` (continue it)
  or ``--overwrite`` (delete what runs made: the engine's own files and those listed in the folder's
  manifest ``.run-files``, where ``atomic_save`` records each checkpoint or model it writes into a
  claimed folder; any other file, e.g. a model placed there by hand, is kept and named).
- **A lock** (``run.lock``: pid, host, start time; created atomically) is held while a run is active, so
  a second run on the same folder stops at once, naming the holder. The lock of a process that died on
  this host is taken over with a note. At the start, half-written ``.tmp`` files left by a kill are removed.
- **Resume rules** (``engine.resume``): ``--resume`` with nothing to resume is an error; the saved run's
  settings that change the result must equal the current ones, or the run is refused. Output files are
  checked writable before any training (``check_writable``).

Task scripts call ``open_run`` once, before building the model; ``Trainer.fit`` runs inside
``engine.resume.fit_guard`` (re-entrant for a folder this process already holds). A run that fails before
writing into its new default folder leaves no folder and does not move ``latest`` (``discard_unused_runs``).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import json
import os
import socket
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from engine import ranks
from errors import InputError

LOCK_NAME = "run.lock"
LATEST = "latest"
# What a run writes into its folder: any of these means "this folder holds a run".
# Names only the training engine writes: ``--overwrite`` deletes them even without a manifest.
ENGINE_FILES = ("last.pt", "best.pt", "best-epoch*.pt", "metrics.jsonl", "curves.png")
RUN_FILES = (*ENGINE_FILES, "*-model.pt", "model.pt")
MANIFEST = ".run-files"  # the names of the files runs wrote into their folder, one a line (``note_written``)


class RunDirError(InputError):
    """A run folder that cannot be used as asked (held, already holding a run, nothing to
    resume, settings that differ, an unwritable output); ``run_main`` prints it as one line."""


# ----------------------------------------------------------------- lock


_HELD: set[Path] = set()  # folders this process holds (claimed by open_run, then by Trainer.fit)
# New default folders this process made -> what ``latest`` named before (``discard_unused_runs``).
_NEW: dict[Path, Path | None] = {}
# Folders this process claimed, in order -> the run folder a command names (``run_root``); files
# saved in them are recorded in their manifest, also after the fit (a task's final model).
_CLAIMED: dict[Path, Path] = {}
_CLEARED: set[Path] = set()  # held folders whose earlier run --overwrite has already deleted


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _read_lock(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _describe(holder: Mapping[str, Any]) -> str:
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
            f"started {holder.get('started', '?')}")


def _link(src: str | Path, dst: Path) -> None:
    """Put ``src``'s content at ``dst`` atomically; FileExistsError if ``dst`` exists."""
    try:
        os.link(src, dst)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: an exclusive create, then the content
        fd = os.open(dst, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        with os.fdopen(fd, "wb") as f:
            f.write(Path(src).read_bytes())


def acquire_lock(folder: str | Path) -> None:
    """Take ``folder/run.lock`` for this process or raise ``RunDirError`` naming its holder.

    The lock file is written complete under a temporary name and hard-linked into place, which
    fails if a lock exists: two runs can never both believe they hold it. A lock left by a dead
    process on this host is moved aside and retaken (only if it is still the one read)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{LOCK_NAME}.", suffix=".new")
    with os.fdopen(fd, "w") as f:
        json.dump(me, f)
    try:
        for _ in range(3):
            try:
                _link(tmp, lock)
                return
            except FileExistsError:
                holder = _read_lock(lock)
            # Our own pid here is a lock this process failed to release (claim() checks _HELD first).
            stale = holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) \
                and (holder["pid"] == me["pid"] or not _pid_alive(holder["pid"]))
            if not stale:
                raise RunDirError(f"{folder}: in use by another run ({_describe(holder)}); wait for it to end or "
                                  f"pick another --output_dir (if that process is not a run, delete {lock})")
            aside = folder / f".{LOCK_NAME}.stale-{me['pid']}"
            with contextlib.suppress(FileNotFoundError):
                os.replace(lock, aside)
                if _read_lock(aside) == holder:
                    print(f"note: {folder}: took over the lock of a run that is no longer running "
                          f"({_describe(holder)})")
                else:  # another process retook it meanwhile: put its lock back
                    with contextlib.suppress(FileExistsError):
                        _link(aside, lock)
                aside.unlink()
        raise RunDirError(f"{folder}: could not take the run lock; another run keeps taking it")
    finally:
        Path(tmp).unlink(missing_ok=True)


def release_lock(folder: str | Path) -> None:
    """Remove ``folder/run.lock`` if this process holds it."""
    lock = Path(folder) / LOCK_NAME
    if _read_lock(lock).get("pid") == os.getpid():
        lock.unlink(missing_ok=True)


# ----------------------------------------------------------------- folders


def run_files(folder: str | Path) -> list[Path]:
    """The files of a run in ``folder`` (not in its subfolders): any that a run makes by name, and
    any the manifest lists."""
    folder = Path(folder)
    return sorted({p for pattern in RUN_FILES for p in folder.glob(pattern) if p.is_file()}
                  | set(_recorded(folder)))


def _recorded(folder: Path) -> list[Path]:
    """The files of ``folder`` its manifest lists that are still there."""
    names = (folder / MANIFEST).read_text().splitlines() if (folder / MANIFEST).is_file() else []
    return [folder / n for n in dict.fromkeys(names) if n and "/" not in n and (folder / n).is_file()]


def note_written(path: str | Path) -> None:
    """Record in its folder's manifest that a run wrote ``path``, if the folder is a run folder this
    process claimed (``--overwrite`` then knows the file for the run's, not a hand-placed one)."""
    path = Path(path).resolve()
    if path.parent in _CLAIMED and path not in _recorded(path.parent):
        with open(path.parent / MANIFEST, "a") as f:
            f.write(path.name + "\n")


def made_by_runs(folder: str | Path) -> list[Path]:
    """What ``--overwrite`` deletes in ``folder``: the engine's own files and those the manifest lists."""
    folder = Path(folder)
    return sorted({p for pattern in ENGINE_FILES for p in folder.glob(pattern) if p.is_file()}
                  | set(_recorded(folder)))


def _overwrite(folder: Path) -> None:
    """Delete the earlier run's files in ``folder`` (once while this process holds it: later claims
    of the same run must not delete what it has written since), keeping and naming the others."""
    if folder in _CLEARED:
        return
    made = made_by_runs(folder)
    for p in made:
        p.unlink(missing_ok=True)
    (folder / MANIFEST).unlink(missing_ok=True)
    _CLEARED.add(folder)
    kept = [p.name for p in run_files(folder)]
    print(f"--overwrite: {'deleted the earlier run' if made else 'no earlier run'}'s files in {folder}"
          + (f"; kept {', '.join(kept)}, which no run recorded writing there" if kept else ""))


def run_root(folder: str | Path) -> Path:
    """The run folder a command names for ``folder`` (its ``--output_dir``, or the default folder
    made for it), which may hold ``folder`` as a stage's subfolder (``<run>/pretrain``)."""
    folder = Path(folder).resolve()
    roots = [r for r in _CLAIMED.values() if r.resolve() == folder or r.resolve() in folder.parents]
    return min(roots, key=lambda r: len(r.resolve().parts)) if roots else folder


def last_claimed() -> Path | None:
    """The run folder (``run_root``) this process claimed last, if any."""
    return run_root(next(reversed(_CLAIMED))) if _CLAIMED else None


def holds_checkpoint(folder: str | Path) -> bool:
    """Whether ``folder`` or a subfolder (a run's earlier stage, e.g. ``pretrain/``) holds ``last.pt``."""
    return any(Path(folder).rglob("last.pt"))


def remove_temp_files(folder: str | Path) -> list[Path]:
    """Delete the half-written ``.*.tmp`` files an atomic save leaves when killed; returns them."""
    removed = [p for p in Path(folder).glob(".*.tmp") if p.is_file()]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


def claim(folder: str | Path, *, resume: bool = False, overwrite: bool = False) -> Path:
    """Lock ``folder`` for this process (unless it already holds it) and check that it may be
    used: refused if it holds a run and neither ``resume`` nor ``overwrite`` is set, or if
    ``resume`` finds no checkpoint in it or its subfolders. With ``overwrite`` the old run's
    files are deleted. The checks are cheap and repeatable, so a script's early claim and the
    Trainer's claim at ``fit`` both make them. Undo with ``release``."""
    folder = Path(folder).resolve()
    if folder not in _HELD:
        check_writable([folder / LOCK_NAME])
        acquire_lock(folder)
        _HELD.add(folder)
    _CLAIMED.setdefault(folder, folder)
    try:
        old = run_files(folder)
        if resume and not holds_checkpoint(folder):
            raise RunDirError(f"{folder}: --resume, but there is no checkpoint (last.pt) to resume; "
                              "drop --resume to start a new run")
        if old and not resume:
            if not overwrite:
                raise RunDirError(f"{folder}: already holds a run ({', '.join(p.name for p in old[:4])}); "
                                  "add --resume to continue it, --overwrite to replace it, or pick another "
                                  "--output_dir")
            _overwrite(folder)
        for p in remove_temp_files(folder):
            print(f"removed {p}, a half-written file of an interrupted run")
    except BaseException:
        release(folder)
        raise
    return folder


def release(folder: str | Path) -> None:
    """Give up ``folder``: its lock is removed (also at process exit for folders still held). A
    folder given up this way has served its run (``Trainer.fit`` ends here), so it is no longer a
    new folder that a later failure in the same process may discard."""
    folder = Path(folder).resolve()
    _NEW.pop(folder, None)
    _CLEARED.discard(folder)
    if folder in _HELD:
        _HELD.discard(folder)
        release_lock(folder)


@atexit.register
def _release_all() -> None:
    for folder in list(_HELD):
        release(folder)


@contextlib.contextmanager
def holding(folder: str | Path, *, resume: bool = False, overwrite: bool = False) -> Iterator[Path]:
    """``claim`` for the duration of a ``with`` block."""
    claim(folder, resume=resume, overwrite=overwrite)
    try:
        yield Path(folder)
    finally:
        release(folder)


def _point_latest(parent: Path, run: Path) -> None:
    """``parent/latest`` -> ``run``: a relative symlink swapped in atomically, else a pointer file."""
    link, tmp = parent / LATEST, parent / f".{LATEST}.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    try:
        os.symlink(run.name, tmp)
    except OSError:
        tmp.write_text(run.name + "\n")
    os.replace(tmp, link)


def latest_run(parent: str | Path) -> Path | None:
    """The run folder ``parent/latest`` names (symlink or pointer file), if any."""
    link = Path(parent) / LATEST
    if link.is_symlink():
        return Path(parent) / os.readlink(link)
    if link.is_file():
        return Path(parent) / link.read_text().strip()
    return None


def unique_folder(parent: str | Path, prefix: str = "", what: str = "folder") -> Path:
    """A new ``parent/<prefix><UTC timestamp>[-n]`` folder, made exclusively: concurrent callers never share one."""
    Path(parent).mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        folder = Path(parent, f"{prefix}{stamp}" if n == 1 else f"{prefix}{stamp}-{n}")
        with contextlib.suppress(FileExistsError):
            folder.mkdir()
            return folder
    raise RunDirError(f"{parent}: could not make a new {what}")


def new_run_folder(parent: str | Path) -> Path:
    """A fresh ``parent/<UTC timestamp>`` folder (``-2``, ``-3``... if taken), made ``latest``."""
    run = unique_folder(parent, what="run folder")
    _NEW[run.resolve()] = latest_run(Path(parent))
    _point_latest(Path(parent), run)
    return run


def discard_unused_runs() -> list[Path]:
    """Undo the new default run folders of a run that failed before writing anything (a refused
    flag, an unreachable hub): each one left empty once its lock is released is removed, and
    ``latest``, if it still names it, names the earlier run again (or is removed), so a plain
    ``--resume`` continues that run. A folder holding any file stays; explicit folders are not
    touched. Called on ``cli.common.run_main``'s error path; returns the folders removed."""
    removed = []
    for run, previous in list(_NEW.items()):
        release(run)
        try:
            run.rmdir()
        except OSError:  # it holds something (a checkpoint, metrics), or is already gone
            continue
        removed.append(run)
        if (latest_run(run.parent) or Path()).resolve() == run:
            if previous is None:
                (run.parent / LATEST).unlink(missing_ok=True)
            else:
                _point_latest(run.parent, previous)
    return removed


def check_writable(paths: Iterable[str | Path | None]) -> None:
    """Raise ``RunDirError`` unless each output file (or folder, for a path that is or ends with
    one) can be written: its folder is made if missing and a probe file created there. Called
    before training, so a bad path fails in a second, not after hours."""
    for p in paths:
        if p is None:
            continue
        path = Path(p)
        folder = path if path.is_dir() or str(p).endswith(os.sep) else path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if path.is_file() and not os.access(path, os.W_OK):
                raise PermissionError(f"{path} is read-only")
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
                pass
        except OSError as e:
            raise RunDirError(f"{p}: cannot write there ({e.strerror or e}); pick a writable path") from None


def open_run(default_parent: str | Path, *, epochs: int, output_dir: str | None = None, resume: bool = False,
             overwrite: bool = False, model: str | None = None, model_flag: str = "load", trains: bool | None = None,
             subdir: str | None = None, outputs: Iterable[str | Path | None] = ()) -> Path | None:
    """For a task, before it builds anything: check its ``outputs`` are writable, then claim its
    run folder and return it: ``output_dir[/subdir]``, else a new ``<default_parent>/<timestamp>``
    (``tasks.common.default_output_dir``), or with ``resume`` the ``latest`` one. It stays locked
    until ``Trainer.fit`` ends (or the process does). A run that does not train (``trains``, by
    default ``epochs`` > 0) claims no folder and returns None; it must then have a ``model`` to
    predict with (a saved model's path, given as ``--<model_flag>``)."""
    trains = epochs > 0 if trains is None else trains
    if not trains and not model:
        raise RunDirError(f"--epochs {epochs} only predicts, and there is no trained model to predict "
                          f"with: give --{model_flag} PATH (a model saved by an earlier run)")
    check_writable(outputs)
    if not trains:
        return None
    if output_dir:
        folder = Path(output_dir, subdir) if subdir else Path(output_dir)
    else:
        parent = Path(default_parent)
        folder = latest_run(parent) if resume else new_run_folder(parent)
        if folder is None:
            raise RunDirError(f"{parent}: --resume, but no earlier run to resume (no {LATEST}); drop --resume "
                              "or give the run's --output_dir")
        print(f"run folder: {folder}")
    if overwrite and model and Path(model).resolve() in {p.resolve() for p in made_by_runs(folder)}:
        raise RunDirError(f"{folder}: --overwrite would delete {model}, the model --{model_flag} starts from; "
                          "copy it elsewhere first or pick another --output_dir")
    claimed = claim(folder, resume=resume, overwrite=overwrite)
    _CLAIMED[claimed] = Path(output_dir) if output_dir else folder
    return claimed


def open_run_on_main(default_parent: str | Path, **kw: Any) -> Path | None:
    """``open_run`` by rank 0 alone under torchrun (it makes, locks and owns the folder); the
    other ranks get the same folder, or the same error (``engine.ranks.on_main``)."""
    return ranks.on_main(lambda: open_run(default_parent, **kw))
