"""Paths that name a run through its ``latest``, for the commands that read runs (``export.py``,
``demo.py``, ``python -m experiments plot``): where symlinks fail, ``latest`` is a pointer file
(``engine.run_dir``), which a path cannot go through as it goes through a symlink."""

from __future__ import annotations

from pathlib import Path

from engine.run_dir import LATEST, latest_run


def resolve_latest(path: str | Path) -> Path:
    """``path`` with each ``latest`` pointer file in it replaced by the run folder it names (a path
    through a symlink, or with no ``latest``, is returned as it is)."""
    path = Path(path)
    for i, part in enumerate(path.parts):
        head = Path(*path.parts[: i + 1])
        if part == LATEST and head.is_file() and not head.is_symlink() and (run := latest_run(head.parent)):
            return resolve_latest(run.joinpath(*path.parts[i + 1 :]))
    return path


__all__ = ["resolve_latest"]
