"""The ways a run stops early, each one line through the real command (issue 26): a full disk
while a checkpoint is saved (the old checkpoint kept, no half-written file), Ctrl-C (where it
stopped and the exact command that resumes, exit status 130), ``--overwrite`` next to files no run
wrote (kept and named), and ``pretrain.py --max_length`` beyond the model's positions.

A full disk is a small tmpfs that a callback fills during the run where the test may mount one
(root), and everywhere a file whose writes fail with ENOSPC after some bytes, as the kernel's do,
opened where ``atomic_save`` opens its temporary file. Ctrl-C is a real SIGINT sent to the process
while a callback holds it inside an epoch. Each runs the script's own ``__main__`` (``runpy``) in
a subprocess with those faults added (``WRAPPER``).
"""

from __future__ import annotations

import errno
import importlib.machinery
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import classifier
import pretrain
from cli.common import run_main
from cli.failures import command_line
from engine import checkpoints, run_dir
from engine.checkpoints import NoSpaceError, atomic_save
from tasks import publish, sentiment
from tests.test_run_dir import ROOT, cli, epoch_records, sst_args, without_output_dir

# Runs ``SCRIPT`` as ``python SCRIPT ARGS...`` would, with faults from the environment:
# C3_FULL_AFTER=N: the Nth save of last.pt (1-based) finds the disk full after 4 KiB, first copying
# the last.pt it would replace to $C3_FULL_COPY; C3_LOG_FULL=1: no line fits in metrics.jsonl;
# C3_FILL_AT=S: at optimizer step S a callback fills the disk with the file $C3_FILLER;
# C3_HOLD_AT=S: a callback holds the run at optimizer step S.
WRAPPER = r"""
import errno, io, os, runpy, shutil, sys, time
from engine import checkpoints, tracking
from engine.train_config import Callback

class FullDisk(io.FileIO):
    written, room = 0, 4096
    def write(self, data):
        if self.written + len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.written += len(data)
        return super().write(data)

saves = []
def save_open(path, mode="r", *args, **kw):
    if os.path.basename(str(path)).startswith(".last.pt.") and "C3_FULL_AFTER" in os.environ:
        saves.append(path)
        if len(saves) == int(os.environ["C3_FULL_AFTER"]):
            shutil.copy(os.path.join(os.path.dirname(str(path)), "last.pt"), os.environ["C3_FULL_COPY"])
            return FullDisk(path, "wb")
    return open(path, mode, *args, **kw)

def log_open(path, mode="r", *args, **kw):
    if "a" in mode and "C3_LOG_FULL" in os.environ:
        raw = FullDisk(path, "ab")
        raw.room = 0
        return io.TextIOWrapper(io.BufferedWriter(raw))
    return open(path, mode, *args, **kw)

checkpoints.open, tracking.open = save_open, log_open

def fill(path):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    for size in (1 << 16, 4096, 1):
        try:
            while True:
                os.write(fd, bytes(size))
        except OSError:
            pass
    os.close(fd)

class Hold(Callback):
    def on_step_end(self, trainer, step, loss):
        if step == int(os.environ.get("C3_FILL_AT", 0)):
            fill(os.environ["C3_FILLER"])
        if step == int(os.environ.get("C3_HOLD_AT", 0)):
            print("holding", flush=True)
            time.sleep(120)

sys.argv = sys.argv[1:]
with tracking.attach(Hold()):
    runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run(script: str, args: list[str], **env: str) -> subprocess.Popen:
    """``python script args`` under ``WRAPPER`` with the faults ``env`` asks for, unbuffered, and
    with SIGINT handled as in a terminal (a test started in the background may inherit it ignored)."""
    return subprocess.Popen([sys.executable, "-c", WRAPPER, str(ROOT / script), *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def command(script: str, args: list[str], run_folder: Path, *flags: str) -> str:
    """The command a line must name: this script's, with ``flags`` and ``--output_dir`` last."""
    return shlex.join([sys.executable, str(ROOT / script), *without_output_dir(args), *flags, "--output_dir",
                       str(run_folder)])


def ended(proc: subprocess.Popen, status: int) -> str:
    """The last stderr line of ``proc``, which must have ended with ``status`` and no traceback."""
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == status and "Traceback" not in err, err
    return err.splitlines()[-1]


def hold(proc: subprocess.Popen) -> list[str]:
    """The stdout lines up to the hold."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("holding"):
            return seen
    raise AssertionError(f"the run never reached the hold: {seen}")


def resume(line_command: str, run_folder: Path, epochs: list[int], step: int) -> None:
    """Run the command a line printed: it must continue the run from its last.pt."""
    done = subprocess.run(shlex.split(line_command), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"resumed from {run_folder}/last.pt: epoch {epochs[0]}, step {step}" in done.stdout
    assert [r["epoch"] for r in epoch_records(run_folder)] == epochs


def test_a_full_disk_while_saving_last_pt_is_one_line_keeps_the_old_one_and_resumes(tmp_path):
    args = sst_args(tmp_path, "--epochs", "2")  # 2 steps an epoch; last.pt at each epoch's end
    folder, copy = tmp_path / "run", tmp_path / "last-before.pt"
    line = ended(run("classifier.py", args, C3_FULL_AFTER="2", C3_FULL_COPY=str(copy)), 2)
    resume_with = command("classifier.py", args, folder, "--resume")
    assert line == (f"error: no space left on {folder} while saving last.pt; the previous last.pt is kept; "
                    f"free some space, then resume with: {resume_with}")
    assert (folder / "last.pt").read_bytes() == copy.read_bytes()  # epoch 1's, untouched
    assert not list(folder.glob(".*.tmp"))
    resume(resume_with, folder, [1, 2], step=2)


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs mounted for the test (root only; skipped elsewhere)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount") or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=True)


def test_a_disk_that_fills_up_during_the_run_is_one_line_and_the_run_resumes(tmp_path, small_disk):
    """The same on a real file system that fills up in epoch 2 (torch said "unexpected pos ...")."""
    folder, filler = small_disk / "run", small_disk / "filler"
    args = [*sst_args(tmp_path, "--epochs", "2", "--save_top_k", "0"), "--output_dir", str(folder)]
    line = ended(run("classifier.py", args, C3_FILL_AT="3", C3_FILLER=str(filler)), 2)
    resume_with = command("classifier.py", args, folder, "--resume")
    assert line == (f"error: no space left on {folder} while saving last.pt; the previous last.pt is kept; "
                    f"free some space, then resume with: {resume_with}")
    assert torch.load(folder / "last.pt", weights_only=True)["epoch"] == 1 and not list(folder.glob(".*.tmp"))
    filler.unlink()
    resume(resume_with, folder, [1, 2], step=2)


def test_atomic_save_on_a_full_disk_leaves_nothing_half_written(tmp_path, monkeypatch):
    """The first save of a file: nothing of it is left, and the line says none was written; any
    other write error stays what it is (not torch's 'unexpected pos')."""
    def failing(code: int):
        class Failing(io.FileIO):
            def write(self, data):
                raise OSError(code, os.strerror(code))

        return lambda path, mode, buffering=-1: Failing(path, mode)

    for size in (16, 1 << 16):  # a first write that fits in the buffer (the error comes at close) or not
        monkeypatch.setattr(checkpoints, "open", failing(errno.ENOSPC), raising=False)
        with pytest.raises(NoSpaceError) as full:
            atomic_save({"w": torch.zeros(size)}, tmp_path / "a.pt")
        assert str(full.value) == f"no space left on {tmp_path} while saving a.pt; no a.pt was written"
        monkeypatch.setattr(checkpoints, "open", failing(errno.EIO), raising=False)
        with pytest.raises(OSError, match="Input/output error") as err:
            atomic_save({"w": torch.zeros(size)}, tmp_path / "a.pt")
        assert err.value.errno == errno.EIO and not isinstance(err.value, NoSpaceError)
        assert list(tmp_path.iterdir()) == []


def test_a_full_disk_while_publishing_keeps_the_published_files_whole(tmp_path, monkeypatch):
    """predictions/provenance.json and a published file go through the same atomic write as a
    checkpoint: a full disk is the same one line, the old file stays, no temporary file is left."""
    class Full(io.FileIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    publish.write_records(tmp_path, {"a.csv": {"run": "r1"}})
    (tmp_path / "run.csv").write_text("id,x\n")
    monkeypatch.setattr(checkpoints, "open", lambda path, mode, buffering=-1: Full(path, mode), raising=False)
    with pytest.raises(NoSpaceError, match="while saving provenance.json; the previous provenance.json is kept"):
        publish.write_records(tmp_path, {"a.csv": {"run": "r2"}})
    with pytest.raises(NoSpaceError, match="while saving a.csv; no a.csv was written"):
        publish.copy_atomically(tmp_path / "run.csv", tmp_path / "a.csv")
    assert publish.read_records(tmp_path) == {"a.csv": {"run": "r1"}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["provenance.json", "run.csv"]


def test_a_full_disk_outside_a_checkpoint_is_one_line_too(tmp_path):
    """metrics.jsonl cannot grow (its first line, before any checkpoint): the same kind of line, and
    the command that starts the run again over what it left (``--overwrite``)."""
    args = sst_args(tmp_path)
    again = command("classifier.py", args, tmp_path / "run", "--overwrite")
    assert ended(run("classifier.py", args, C3_LOG_FULL="1"), 2) == (
        f"error: no space left on device; free some space, then start again with: {again}")


def test_ctrl_c_says_where_it_stopped_and_the_command_that_resumes(tmp_path):
    args = sst_args(tmp_path, "--epochs", "3", "--save_every_steps", "1")  # 2 steps an epoch
    folder = tmp_path / "run"
    proc = run("classifier.py", args, C3_HOLD_AT="3")
    assert any(line.startswith("epoch 1:") for line in hold(proc))  # held in epoch 2, after the epoch 1 line
    proc.send_signal(signal.SIGINT)
    resume_with = command("classifier.py", args, folder, "--resume")
    assert ended(proc, 130) == f"interrupted at epoch 2 step 3 (last saved: step 2); resume with: {resume_with}"
    resume(resume_with, folder, [1, 2, 3], step=2)


def test_ctrl_c_before_the_first_checkpoint_says_there_is_nothing_to_resume(tmp_path):
    args = sst_args(tmp_path, "--epochs", "2")  # last.pt at each epoch's end, after its last step
    proc = run("classifier.py", args, C3_HOLD_AT="2")
    hold(proc)
    proc.send_signal(signal.SIGINT)
    again = command("classifier.py", args, tmp_path / "run", "--overwrite")  # its metrics.jsonl is there
    assert ended(proc, 130) == ("interrupted at epoch 1 step 2, before the first checkpoint: nothing to resume; "
                                f"start again with: {again}")
    assert not (tmp_path / "run" / "last.pt").exists()


def test_overwrite_keeps_a_model_file_no_run_wrote(tmp_path):
    """A sonnet-model.pt placed by hand in a classifier run's folder survives --overwrite, named."""
    first = cli("classifier.py", sst_args(tmp_path))
    assert first.returncode == 0, first.stderr
    folder = tmp_path / "run"
    (folder / "sonnet-model.pt").write_bytes(b"my best sonnet model")
    again = cli("classifier.py", sst_args(tmp_path, "--overwrite"))
    assert again.returncode == 0, again.stderr
    assert (f"--overwrite: deleted the earlier run's files in {folder.resolve()}; kept sonnet-model.pt, which no "
            "run recorded writing there") in again.stdout.splitlines()
    assert (folder / "sonnet-model.pt").read_bytes() == b"my best sonnet model"
    assert [r["epoch"] for r in epoch_records(folder)] == [1]


def test_overwrite_deletes_the_model_files_a_run_recorded(tmp_path):
    """A model a run saved, also after its fit ended (a task's final model), is the run's: deleted."""
    folder = run_dir.claim(tmp_path / "run")
    atomic_save({"w": torch.zeros(1)}, folder / "last.pt")
    run_dir.release(folder)
    atomic_save({"w": torch.zeros(1)}, folder / "paraphrase-model.pt")  # saved after the fit
    (folder / "model.pt").write_bytes(b"placed by hand")
    assert (folder / run_dir.MANIFEST).read_text().splitlines() == ["last.pt", "paraphrase-model.pt"]
    run_dir.claim(folder, overwrite=True)
    run_dir.claim(folder, overwrite=True)  # the Trainer's own claim of the same run deletes nothing more
    atomic_save({"w": torch.zeros(1)}, folder / "best.pt")
    run_dir.claim(folder, overwrite=True)
    run_dir.release(folder)
    assert sorted(p.name for p in folder.iterdir()) == [".run-files", "best.pt", "model.pt"]


def test_pretrain_max_length_beyond_the_positions_is_refused_before_training(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("From fairest creatures we desire increase,\n" * 40)
    micro = tmp_path / "micro"
    micro.mkdir()
    (micro / "config.json").write_text(json.dumps(dict(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2,
                                                       n_head=2)))
    with pytest.raises(SystemExit) as exit_:
        run_main(lambda: pretrain.main(["--corpus", str(corpus), "--model_size", str(micro), "--random_init",
                                        "--limit", "8", "--epochs", "1", "--no_progress", "--max_length", "100",
                                        "--output_dir", str(tmp_path / "pre")]))
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "error: --max_length 100 is longer than the model's context of 64 positions; use at most 64 (0: the context)")
    assert not (tmp_path / "pre" / "last.pt").exists()


def test_the_command_a_line_names_replaces_the_run_flags(monkeypatch):
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))  # ``python classifier.py``
    monkeypatch.setattr(sys, "argv", ["classifier.py", "--overwrite", "--output_dir=old", "--lr", "1e-3",
                                      "--output_dir", "a b", "--resume"])
    assert command_line(["--resume", "--output_dir", "run 1"]) == shlex.join(
        [sys.executable, "classifier.py", "--lr", "1e-3", "--resume", "--output_dir", "run 1"])
    assert command_line() == shlex.join([sys.executable, *sys.argv])
    main = types.ModuleType("__main__")
    main.__spec__ = importlib.machinery.ModuleSpec("experiments.__main__", None)  # ``python -m experiments``
    monkeypatch.setitem(sys.modules, "__main__", main)
    monkeypatch.setattr(sys, "argv", ["/x/experiments/__main__.py", "seeds", "--out", "o"])
    assert command_line() == shlex.join([sys.executable, "-m", "experiments", "seeds", "--out", "o"])


def test_ctrl_c_before_training_leaves_no_new_folder(tmp_path, monkeypatch, capsys):
    """Ctrl-C while the model is built, in a new default run folder: the start-up cleanup applies
    (no folder, ``latest`` not moved), and the line gives the command as typed."""
    def interrupted(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.chdir(tmp_path)
    args = without_output_dir(sst_args(tmp_path))
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))
    monkeypatch.setattr(sys, "argv", ["classifier.py", *args])
    monkeypatch.setattr(sentiment, "build_body", interrupted)
    with pytest.raises(SystemExit) as exit_:
        run_main(lambda: classifier.main(args))
    assert exit_.value.code == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        "interrupted, before the first checkpoint: nothing to resume; start again with: "
        + shlex.join([sys.executable, "classifier.py", *args]))
    assert not list((tmp_path / "runs" / "classifier" / "last-linear-layer-sst").iterdir())  # nor a latest
