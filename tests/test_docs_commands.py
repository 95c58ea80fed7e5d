"""The commands the README and docs/ show still run: a renamed or removed flag fails here, not
in a reader's terminal.

Every command line in a code block fenced as ```` ```bash runnable ```` in ``README.md`` or
``docs/*.md`` is run as a reduced copy of itself: the same script and flags, on a tiny random model
(``--model_size tiny --random_init --limit 8 --epochs 1 --no_progress``; ``generate.py`` on a small
random Hugging Face folder; an experiment on its first seed), with ``--use_gpu`` dropped, from a
temporary copy of the project root (its entries linked, ``runs/`` and ``predictions/`` fresh, the
course data linked), so nothing of the repository's own runs or predictions changes. Each command
runs in this test process (``runpy``, as ``python script.py`` would run it), which keeps the whole
file quick. Lines of a block that do not start with ``python`` (``mkdir``, ``echo``...) are set-up
for a reader and are not run. A command that reads runs (``export.py``, ``python -m experiments plot``) runs
after the commands above it in its block, which make them (reduced: a ``-gpt2`` run folder is ``-tiny``).
"""

from __future__ import annotations

import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import SHARED_DATA, SMALL_GPT2, make_hf_folder

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = "```bash runnable"
PYTHON = ("python", "python3", ".venv/bin/python")

# The reduction: flags set (a value replaced where the command gives one) on every task run.
TINY = (("--model_size", "tiny"), ("--random_init", None), ("--limit", "8"), ("--epochs", "1"),
        ("--no_progress", None))
EXTRA = {
    "classifier.py": (("--max_length", "128"),),  # CFIMDB's reviews fill the context otherwise
    "sonnet_generation.py": (("--max_new_tokens", "16"),),
    "prepare_submit.py": (("--no_import_check", None),),  # the graders' imports are tested elsewhere
}
NOT_TASKS = ("generate.py", "prepare_submit.py", "export.py")
DROPPED = ("--use_gpu",)


def runnable_blocks() -> list[list[tuple[str, list[str]]]]:
    """Each runnable block's python commands in order: (``file:line``, argv after ``python``)."""
    blocks: list[list[tuple[str, list[str]]]] = []
    for doc in DOCS:
        lines = doc.read_text(encoding="utf-8").splitlines()
        inside, pending, start = False, "", 0
        for number, line in enumerate(lines, 1):
            if line.startswith("```"):
                inside = line.strip() == FENCE
                blocks.append([])
                continue
            if not inside:
                continue
            if not pending:
                start = number
            pending += line.rstrip()
            if pending.endswith("\\"):  # a command continued on the next line
                pending = pending[:-1] + " "
                continue
            try:
                words = shlex.split(pending, comments=True)
            except ValueError:  # a quoted string that goes on over the next line
                pending += "\n"
                continue
            pending = ""
            if words and words[0] in PYTHON:
                blocks[-1].append((f"{doc.relative_to(ROOT)}:{start}", words[1:]))
    return [b for b in blocks if b]


def runnable_commands() -> list[tuple[str, list[str]]]:
    """(``file:line``, argv after ``python``) of every python command in a runnable block."""
    return [command for block in runnable_blocks() for command in block]


def reads_runs(argv: list[str]) -> bool:
    return argv[0] == "export.py" or argv[:3] == ["-m", "experiments", "plot"]


def made_before(where: str) -> list[list[str]]:
    """The commands above ``where`` in its block: what makes the runs a command that reads runs reads."""
    for block in runnable_blocks():
        names = [w for w, _ in block]
        if where in names:
            return [argv for _, argv in block[: names.index(where)]]
    return []


def set_flag(argv: list[str], flag: str, value: str | None) -> None:
    """``flag`` set in ``argv``: its value replaced where it has one, else appended."""
    if flag not in argv:
        argv.extend([flag] if value is None else [flag, value])
    elif value is not None:
        argv[argv.index(flag) + 1] = value


def reduced(argv: list[str], tiny_model: Path) -> list[str]:
    """The tiny form of a documented command (see the module docstring)."""
    argv = [a for a in argv if a not in DROPPED]
    if reads_runs(argv):  # the runs above it in its block were made on the tiny model
        argv = [re.sub(r"-gpt2(-medium|-large|-xl)?(?=/|$)", "-tiny", a) if a.startswith("runs/") else a
                for a in argv]
    if argv[0] == "-m" and "--" not in argv:  # an experiment command without task flags (plot, ensemble)
        return argv
    if argv[:2] == ["-m", "experiments"]:
        split = argv.index("--")
        head, task = argv[:split], argv[split + 1:]
        if "--seeds" in head:
            set_flag(head, "--seeds", head[head.index("--seeds") + 1].split(",")[0])
        for flag, value in TINY:
            set_flag(task, flag, value)
        return [*head, "--", *task]
    script = argv[0]
    for flag, value in EXTRA.get(script, ()):
        set_flag(argv, flag, value)
    if script == "generate.py":
        set_flag(argv, "--model", str(tiny_model))
        set_flag(argv, "--max_new_tokens", "8")
    elif script not in NOT_TASKS:
        for flag, value in TINY:
            set_flag(argv, flag, value)
    return argv


@pytest.fixture
def project_copy(tmp_path: Path) -> Path:
    """A stand-in project root: every entry of the real one linked, except fresh ``runs/`` and
    ``predictions/``, and ``data/`` (the downloaded course data, else ``../shared/data``)."""
    copy = tmp_path / "project"
    copy.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in ("runs", "predictions", "data"):
            (copy / entry.name).symlink_to(entry)
    data = ROOT / "data" if (ROOT / "data" / "ids-sst-train.csv").exists() else SHARED_DATA
    (copy / "data").symlink_to(data)
    (copy / "predictions").mkdir()
    return copy


def test_the_docs_mark_the_main_commands_runnable():
    """The main command of each task and the other entry points are among the tested commands."""
    scripts = {" ".join(argv[:2]) if argv[0] == "-m" else argv[0] for _, argv in runnable_commands()}
    assert {"classifier.py", "paraphrase_detection.py", "sonnet_generation.py", "prepare_submit.py", "generate.py",
            "pretrain.py", "-m experiments"} <= scripts


def distinct_commands() -> list[tuple[str, list[str]]]:
    """``runnable_commands`` less those whose reduced form repeats an earlier one (the same
    command with and without ``--use_gpu``, say): each is run once."""
    seen, distinct = set(), []
    for where, argv in runnable_commands():
        key = tuple(reduced(list(argv), Path("tiny-hf")))
        if key not in seen:
            seen.add(key)
            distinct.append((where, argv))
    return distinct


@pytest.mark.parametrize("where,argv", distinct_commands(), ids=lambda v: v if isinstance(v, str) else "")
def test_documented_command_runs(where, argv, project_copy, monkeypatch, capsys):
    tiny_model = project_copy.parent / "tiny-hf"
    command = reduced(argv, tiny_model)
    if command[0] == "generate.py":
        make_hf_folder(tiny_model, **SMALL_GPT2)
    monkeypatch.chdir(project_copy)
    for before in made_before(where) if reads_runs(command) else []:
        run_command(f"{where} (set-up)", reduced(before, tiny_model), project_copy, monkeypatch, capsys)
    run_command(where, command, project_copy, monkeypatch, capsys)


def run_command(where: str, command: list[str], project_copy: Path, monkeypatch, capsys) -> None:
    """``python COMMAND`` in this process, from ``project_copy``; a non-zero exit fails with its stderr."""
    module = command[1] if command[0] == "-m" else None
    script = [module, *command[2:]] if module else [str(project_copy / command[0]), *command[1:]]
    monkeypatch.setattr(sys, "argv", script)
    if module:  # as `python -m` would: a fresh __main__, not one an earlier test imported
        monkeypatch.delitem(sys.modules, f"{module}.__main__", raising=False)
    torch.manual_seed(0)
    try:
        if module:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as e:
        err = capsys.readouterr().err[-3000:]
        assert e.code in (0, None), f"{where}: python {shlex.join(command)} exited with {e.code}:\n{err}"


def test_the_reduction_keeps_every_documented_flag():
    """The reduced command passes each flag the docs give (only values change), so argparse
    sees the documented names."""
    for where, argv in runnable_commands():
        command = reduced(list(argv), Path("tiny"))
        flags = {a for a in argv if a.startswith("--") and a not in DROPPED}
        assert flags <= set(command), where


def test_markers_are_found():
    """A fence the parser would miss (a typo in the marker) would silently test nothing."""
    for doc in DOCS:
        for line in doc.read_text(encoding="utf-8").splitlines():
            if re.match(r"^```\s*bash\s+\S", line):
                assert line.strip() == FENCE, f"{doc.name}: unknown fence {line!r}"
