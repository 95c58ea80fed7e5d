"""What a command says when it stops early, in one line: bad input, a full disk, Ctrl-C.

``cli.common.run_main`` asks ``failure_line`` about the exception that ended a task's ``main``:

- bad input (``errors.InputError``, a missing file): ``error: <what and where>``, exit status 2;
- a full disk: ``engine.checkpoints.atomic_save`` removed its half-written file and kept the
  previous checkpoint (``NoSpaceError``); any other write that found the disk full is an
  ``OSError`` ENOSPC. Both say so, then how to go on, and exit with status 2;
- Ctrl-C: ``interrupted at epoch E step S (last saved: step K); resume with: <command>``, exit
  status 130 (the shell's for SIGINT). The command is this process's own command line with
  ``--resume --output_dir <run>`` in place of any ``--resume``/``--overwrite``/``--output_dir``,
  shell-quoted, so it can be pasted. Without a checkpoint there is nothing to resume: the line
  says so and gives the command that starts again (with ``--overwrite`` where the interrupted run
  left files in its folder).

Anything else is no failure of the input: it is re-raised with its traceback. So is Ctrl-C in a
command that another one runs in-process (``experiments`` runs the task scripts so, and says
itself how to continue the whole experiment): ``nesting`` tells ``run_main`` which one it is.
"""

from __future__ import annotations

import contextlib
import shlex
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from engine import run_dir
from engine.checkpoints import NO_SPACE, NoSpaceError, TrainingInterrupted
from errors import InputError

INTERRUPTED = 130  # exit status of a command stopped by Ctrl-C (128 + SIGINT), as shells report it
RUN_FLAGS = ("--resume", "--overwrite")  # replaced in the command a line suggests
_DEPTH = [0]  # run_main calls in progress in this process


@contextlib.contextmanager
def nesting() -> Iterator[int]:
    """How many commands (``run_main`` calls) run around this one: 0 for the outermost."""
    _DEPTH[0] += 1
    try:
        yield _DEPTH[0] - 1
    finally:
        _DEPTH[0] -= 1


def command_line(flags: Sequence[str] | None = None) -> str:
    """This process's command line, shell-quoted (``python -m package`` where it was started so),
    as typed or with its run-folder flags replaced by ``flags``."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    head = ["-m", spec.name.removesuffix(".__main__")] if spec is not None else [sys.argv[0]]
    if flags is None:
        return shlex.join([sys.executable, *head, *sys.argv[1:]])
    args, skip = [], False
    for a in sys.argv[1:]:
        if skip or a in RUN_FLAGS or a.startswith("--output_dir="):
            skip = False
            continue
        skip = a == "--output_dir"
        if not skip:
            args.append(a)
    return shlex.join([sys.executable, *head, *args, *flags])


def continuation(folder: Path) -> list[str]:
    """The flags that go on with the run in ``folder``: ``--resume`` where it holds a checkpoint,
    ``--overwrite`` where it holds only what a run killed before its first checkpoint left (in it,
    or in a subfolder: an experiment's per-dataset runs), none where it holds nothing of a run."""
    if run_dir.holds_checkpoint(folder):
        return ["--resume"]
    made = folder.is_dir() and (run_dir.run_files(folder) or any(p.is_dir() and run_dir.run_files(p)
                                                                  for p in folder.glob("*")))
    return ["--overwrite"] if made else []


def next_command(folder: Path | None) -> str:
    """How to go on with the run in ``folder``: resume it from its checkpoint, or start it again
    (over what it left there, or as typed where it left nothing: its new folder was removed)."""
    flags = continuation(Path(folder)) if folder is not None else []
    if not flags:
        return f"start again with: {command_line()}"
    verb = "resume" if flags == ["--resume"] else "start again"
    return f"{verb} with: {command_line([*flags, '--output_dir', str(folder)])}"


def interrupted_line(e: KeyboardInterrupt) -> str:
    """The line for Ctrl-C: where training stopped (if it was training) and how to go on."""
    training = isinstance(e, TrainingInterrupted)
    folder = run_dir.run_root(e.folder) if training else run_dir.last_claimed()
    where = f" at epoch {e.epoch} step {e.step}" if training else ""
    if folder is None:
        return f"interrupted{where}"
    if not run_dir.holds_checkpoint(folder):
        return f"interrupted{where}, before the first checkpoint: nothing to resume; {next_command(folder)}"
    known = training and e.checkpoint is not None and e.saved_step is not None
    return f"interrupted{where}{f' (last saved: step {e.saved_step})' if known else ''}; {next_command(folder)}"


def failure_line(e: BaseException, outer: bool = True) -> tuple[str, int] | None:
    """(the line to print, the exit status) for an exception that ends a command, or None for
    one that is no bad input (a bug: its traceback is what helps) or, unless the command is the
    ``outer`` one, a Ctrl-C (the command around it says how to go on)."""
    if isinstance(e, KeyboardInterrupt):
        return (interrupted_line(e), INTERRUPTED) if outer else None
    if isinstance(e, NoSpaceError) or (isinstance(e, OSError) and e.errno in NO_SPACE):
        what = str(e) if isinstance(e, NoSpaceError) else "no space left on device" + (
            f" writing {e.filename}" if isinstance(e, OSError) and e.filename else "")
        return f"error: {what}; free some space, then {next_command(run_dir.last_claimed())}", 2
    if isinstance(e, (InputError, FileNotFoundError)):
        return f"error: {e}", 2
    return None
