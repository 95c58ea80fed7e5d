"""Runs never destroy or mix up results: run-folder locks, refusal of reruns, default folders,
``--overwrite``, predict-only runs, resume rules, kill-then-resume, output paths checked first."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import classifier
import paraphrase_detection as para
import sonnet_generation
from engine import resume, run_dir, tracking
from engine.run_dir import RunDirError
from engine.trainer import Callback, TrainConfig, Trainer
from tests.conftest import MICRO, classifier_cli_args, make_toy_data, make_toy_model, toy_loss_fn
from tests.conftest import sonnet_data_flags as data_flags

ROOT = Path(__file__).resolve().parents[1]


def hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def without_output_dir(args: list[str]) -> list[str]:
    i = [n for n, a in enumerate(args) if a == "--output_dir"]
    return [a for n, a in enumerate(args) if n not in i and n - 1 not in i]


def sst_args(tmp_path: Path, *extra: str, output_dir: bool = True) -> list[str]:
    """The classifier on 8 SST examples with a micro model (made once per test): a run of about a second."""
    args = classifier_cli_args(tmp_path, "last-linear-layer", "--dataset", "sst", "--output_dir", str(tmp_path / "run"),
                               *extra)
    return args if output_dir else without_output_dir(args)


def cli(script: str, args: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def trainer(tmp_path: Path, name: str = "run", batch_size: int = 8, extra: dict | None = None, callbacks=(),
            **cfg) -> Trainer:
    from torch.utils.data import DataLoader, TensorDataset

    X, y = make_toy_data()
    loader = DataLoader(TensorDataset(X, y), batch_size=batch_size, shuffle=True)
    defaults = dict(epochs=3, lr=1e-2, output_dir=str(tmp_path / name), progress=False, log_every=2, plot=False)

    def eval_fn(m):
        return {"accuracy": float((m(X).argmax(-1) == y).float().mean())}

    return Trainer(make_toy_model(), toy_loss_fn, loader, eval_fn, TrainConfig(**{**defaults, **cfg}),
                   callbacks=callbacks, extra=extra)


def epoch_records(folder: Path) -> list[dict]:
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["type"] == "epoch"]


# ----------------------------------------------------------------- locks


def test_second_run_on_a_busy_folder_stops_at_once_naming_the_holder(tmp_path):
    """While a run trains, the same command on its folder exits with status 2 before loading
    anything, naming the running process and its start time."""
    seen = {}

    class SecondRun(Callback):
        def on_step_end(self, t, step, loss):
            if step == 1:
                seen["proc"] = cli("classifier.py", sst_args(tmp_path))

    trainer(tmp_path, callbacks=[SecondRun()]).fit()  # its folder is tmp_path/run, as sst_args's
    proc = seen["proc"]
    assert proc.returncode == 2, proc.stderr
    lock_started = proc.stderr.split("started ")[1].split(")")[0]
    assert f"pid {os.getpid()}" in proc.stderr and "in use by another run" in proc.stderr
    assert lock_started[:4].isdigit() and "T" in lock_started  # an ISO time
    assert "loaded" not in proc.stdout  # stopped before reading data or building a model
    assert epoch_records(tmp_path / "run") and not (tmp_path / "run" / "run.lock").exists()  # released after fit


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "run.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                                 "started": "2026-01-01T00:00:00+00:00"}))
    with run_dir.holding(folder):
        assert json.loads((folder / "run.lock").read_text())["pid"] == os.getpid()
    assert f"pid {dead.pid}" in capsys.readouterr().out
    assert not (folder / "run.lock").exists()


def test_lock_of_a_live_process_elsewhere_is_not_taken(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "run.lock").write_text(json.dumps({"pid": 1, "host": "another-host", "started": "t0"}))
    with pytest.raises(RunDirError, match="pid 1 on host another-host, started t0"):
        run_dir.claim(folder)
    assert json.loads((folder / "run.lock").read_text())["host"] == "another-host"


# ----------------------------------------------------------------- reruns, default folders, --overwrite


def test_rerun_without_resume_is_refused_and_changes_nothing(tmp_path):
    classifier.main(sst_args(tmp_path, "--epochs", "2"))
    before = hashes(tmp_path)
    proc = cli("classifier.py", sst_args(tmp_path, "--epochs", "2", "--lr", "0.5"))
    assert proc.returncode == 2 and "already holds a run" in proc.stderr and "--overwrite" in proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    with pytest.raises(RunDirError, match="already holds a run"):
        classifier.main(sst_args(tmp_path, "--epochs", "2", "--lr", "0.5"))
    assert hashes(tmp_path) == before


def test_overwrite_replaces_the_earlier_run(tmp_path):
    classifier.main(sst_args(tmp_path, "--epochs", "2"))
    classifier.main(sst_args(tmp_path, "--epochs", "1", "--overwrite"))
    assert [r["epoch"] for r in epoch_records(tmp_path / "run")] == [1]  # no record of the replaced run


def test_default_run_folders_are_new_for_each_run_and_resume_takes_latest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = sst_args(tmp_path, output_dir=False)
    classifier.main(args)
    classifier.main(args)
    parent = tmp_path / "runs" / "classifier" / "last-linear-layer-sst"
    runs = sorted(p for p in parent.iterdir() if p.is_dir() and not p.is_symlink())
    assert len(runs) == 2 and all((p / "metrics.jsonl").exists() for p in runs)
    assert run_dir.latest_run(parent).resolve() == runs[-1]
    before = hashes(runs[0])
    classifier.main([*args, "--resume", "--epochs", "2"])  # continues the latest run, not the first
    assert [r["epoch"] for r in epoch_records(runs[-1])] == [1, 2] and hashes(runs[0]) == before


def test_new_run_folders_in_the_same_second_differ(tmp_path):
    a, b = run_dir.new_run_folder(tmp_path), run_dir.new_run_folder(tmp_path)
    assert a != b and run_dir.latest_run(tmp_path) == b


def test_latest_is_a_pointer_file_where_symlinks_fail(tmp_path, monkeypatch):
    def no_symlinks(*a, **k):
        raise OSError("symlinks not supported")

    monkeypatch.setattr(os, "symlink", no_symlinks)
    run = run_dir.new_run_folder(tmp_path)
    assert (tmp_path / "latest").is_file() and run_dir.latest_run(tmp_path) == run


# ----------------------------------------------------------------- --epochs 0


def test_epochs_0_needs_a_model_and_leaves_it_untouched(tmp_path):
    with pytest.raises(RunDirError, match="no trained model.*--load"):
        classifier.main(sst_args(tmp_path, "--epochs", "0"))
    assert not (tmp_path / "run").exists() and not (tmp_path / "pred").exists()
    trained = classifier.main(sst_args(tmp_path, "--epochs", "2"))["sst"]
    before = hashes(tmp_path / "run")
    best = tmp_path / "run" / "best.pt"
    pred = tmp_path / "pred" / "last-linear-layer-sst-dev-out.csv"
    written = pred.read_text()
    pred.unlink()
    again = classifier.main(sst_args(tmp_path, "--epochs", "0", "--load", str(best)))["sst"]
    assert again["accuracy"] == trained["accuracy"] and pred.read_text() == written  # the loaded model's
    # the run's files are untouched; the predicting run keeps its own prediction files in a folder of its own
    after = hashes(tmp_path / "run")
    own = {k: after.pop(k) for k in list(after) if k.startswith("predict-")}
    assert after == before
    assert [Path(k).parts[1:] for k in own] == [("predictions", name) for name in sorted(
        ("last-linear-layer-sst-dev-out.csv", "last-linear-layer-sst-test-out.csv"))]


def test_epochs_0_in_paraphrase_and_sonnets_refuses_without_a_model(tmp_path):
    with pytest.raises(RunDirError, match="--load"):
        para.main(["--model_size", "tiny", "--random_init", "--epochs", "0", "--output_dir", str(tmp_path / "p")])
    with pytest.raises(RunDirError, match="--checkpoint"):
        sonnet_generation.main(["--model_size", "tiny", "--random_init", "--epochs", "0", *data_flags(tmp_path)])
    assert not (tmp_path / "p").exists() and not (tmp_path / "run").exists()


def test_sonnet_epochs_0_decodes_the_checkpoint_and_saves_nothing(tmp_path):
    common = ["--model_size", "tiny", "--random_init", "--limit", "2", "--max_new_tokens", "4", "--max_length", "48",
              "--batch_size", "2", "--decoding", "greedy", *data_flags(tmp_path)]
    first = sonnet_generation.main([*common, "--epochs", "1"])
    model = tmp_path / "run" / "sonnet-model.pt"
    before = hashes(tmp_path / "run")
    again = sonnet_generation.main([*common, "--epochs", "0", "--load", str(model), "--output_dir",
                                    str(tmp_path / "other")])
    assert again["test"] == first["test"] and hashes(tmp_path / "run") == before
    # no model, no checkpoint: only the decoding run's own prediction files, in a folder of their own
    assert [p.relative_to(tmp_path / "other").parts[1:] for p in sorted((tmp_path / "other").rglob("*"))
            if p.is_file()] == [("predictions", "generated_sonnets.txt"), ("predictions", "generated_sonnets_dev.txt")]


# ----------------------------------------------------------------- resume rules


def test_resume_with_nothing_to_resume_is_an_error(tmp_path):
    with pytest.raises(RunDirError, match="no checkpoint"):
        trainer(tmp_path, resume=True).fit()
    args = sst_args(tmp_path, output_dir=False)
    proc = cli("classifier.py", [*args, "--resume"], cwd=tmp_path)  # the default runs/ of a fresh folder
    assert proc.returncode == 2 and "no earlier run to resume" in proc.stderr
    proc = cli("classifier.py", sst_args(tmp_path, "--resume"))
    assert proc.returncode == 2 and "no checkpoint (last.pt) to resume" in proc.stderr


def test_resume_with_other_settings_is_refused_with_the_list_unless_allowed(tmp_path, capsys):
    trainer(tmp_path, max_steps=4, extra={"args": {"batch_size": 8, "limit": 0}}).fit()
    saved = hashes(tmp_path / "run")
    changed = dict(batch_size=4, lr=0.5, grad_accum=2, extra={"args": {"batch_size": 4, "limit": 100}})
    with pytest.raises(RunDirError) as e:
        trainer(tmp_path, resume=True, **changed).fit()
    for item in ("batch_size 8 -> 4", "limit 0 -> 100", "lr 0.01 -> 0.5", "grad_accum 1 -> 2"):
        assert item in str(e.value)
    assert "--resume_allow_changes" in str(e.value) and hashes(tmp_path / "run") == saved
    # settings that do not change the weights (more epochs on a constant schedule, logging) are no obstacle
    t = trainer(tmp_path, resume=True, epochs=4, log_every=5, extra={"args": {"batch_size": 8, "limit": 0}})
    t.fit()
    assert t.epoch == 4
    trainer(tmp_path, "b", max_steps=4).fit()
    capsys.readouterr()
    t = trainer(tmp_path, "b", resume=True, resume_allow_changes=True, lr=0.5)
    t.fit()
    out = capsys.readouterr().out
    assert "resuming with changed settings: lr 0.01 -> 0.5" in out and "saved optimizer" in out
    assert t.epoch == 3


def test_cli_resume_checks_the_model_config_and_the_limit(tmp_path):
    classifier.main(sst_args(tmp_path, "--epochs", "1"))
    other = tmp_path / "other-size"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**MICRO, "n_layer": 1}))
    with pytest.raises(RunDirError) as e:
        classifier.main(sst_args(tmp_path, "--epochs", "2", "--resume", "--limit", "6", "--hidden_dropout_prob",
                                 "0.1", "--model_size", str(other)))
    for item in ("limit 8 -> 6", "hidden_dropout_prob 0.3 -> 0.1", "model.num_hidden_layers 2 -> 1", "model_size"):
        assert item in str(e.value)
    result = classifier.main(sst_args(tmp_path, "--epochs", "2", "--resume"))
    assert [r["epoch"] for r in epoch_records(tmp_path / "run")] == [1, 2] and result["sst"]["accuracy"] >= 0


def test_a_run_saved_when_the_config_held_more_fields_still_resumes(tmp_path):
    """Before the model config held the architecture only, it also held the attention pattern,
    gradient checkpointing and a free-form dict: a last.pt of that time resumes as it is."""
    classifier.main(sst_args(tmp_path, "--epochs", "1"))
    last = tmp_path / "run" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    ckpt["model_config"].update(attn_pattern="dense", attn_window=256, gradient_checkpointing=False, extra={})
    torch.save(ckpt, last)
    result = classifier.main(sst_args(tmp_path, "--epochs", "2", "--resume"))
    assert [r["epoch"] for r in epoch_records(tmp_path / "run")] == [1, 2] and result["sst"]["accuracy"] >= 0
    assert resume.changed_settings({"model.hidden_size": 8, "model.extra": {}}, {"model.hidden_size": 16}) == [
        "model.hidden_size 8 -> 16"]


def test_a_run_saved_before_a_setting_existed_resumes_at_its_default_only(tmp_path):
    """A last.pt older than ``--pooling``, ``--use_dora`` and ``--optimizer`` lacks them: that run had
    their defaults, so a resume with the defaults goes on and one with another value is refused
    (one line, exit status 2), the missing setting shown at its default."""
    classifier.main(sst_args(tmp_path, "--epochs", "1"))
    last = tmp_path / "run" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    for key in ("pooling", "use_dora"):
        ckpt["extra"]["args"].pop(key)
    ckpt["extra"].pop("pooling")
    ckpt["train_config"].pop("optimizer")
    torch.save(ckpt, last)
    proc = cli("classifier.py", sst_args(tmp_path, "--epochs", "2", "--resume", "--pooling", "mean"))
    err = [line for line in proc.stderr.splitlines() if not line.startswith("note:")]
    assert proc.returncode == 2 and len(err) == 1 and err[0].startswith("error:")
    assert "pooling 'last' -> 'mean'" in err[0] and "use_dora" not in err[0]
    classifier.main(sst_args(tmp_path, "--epochs", "2", "--resume"))
    assert [r["epoch"] for r in epoch_records(tmp_path / "run")] == [1, 2]


def test_kill_between_evaluation_and_checkpoint_leaves_no_duplicates_or_temp_files(tmp_path):
    """A kill after epoch 2's evaluation was logged but before its last.pt was written, plus the
    half-written file of a checkpoint being saved: the resumed run cleans up and logs each epoch once,
    as an uninterrupted run does."""

    class Kill(Callback):
        def on_epoch_end(self, t, epoch, metrics):
            if epoch == 2:
                (t.output_dir / ".last.pt.abc123.tmp").write_bytes(b"half a checkpoint")
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trainer(tmp_path, callbacks=[Kill()]).fit()
    assert [r["epoch"] for r in epoch_records(tmp_path / "run")] == [1, 2]
    resumed = trainer(tmp_path, resume=True)
    resumed.fit()
    full = trainer(tmp_path, "full")
    full.fit()
    assert not list((tmp_path / "run").glob("*.tmp")) and not list((tmp_path / "run").glob(".*.tmp"))
    got, want = epoch_records(tmp_path / "run"), epoch_records(tmp_path / "full")
    assert [r["epoch"] for r in got] == [1, 2, 3]
    assert [r["dev"] for r in got] == [r["dev"] for r in want]
    assert [r["train_loss"] for r in got] == pytest.approx([r["train_loss"] for r in want])
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["type"] == "step"]
    assert len(steps) == len(set(steps))


def test_trim_metrics_drops_records_past_the_checkpoint_and_a_cut_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    recs = [{"type": "step", "step": 2}, {"type": "epoch", "epoch": 1, "step": 3}, {"type": "step", "step": 4},
            {"type": "epoch", "epoch": 2, "step": 6}]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"type": "st')
    assert tracking.trim_metrics(path, epoch=1, step=3) == 3
    assert [json.loads(line) for line in path.read_text().splitlines()] == recs[:2]


# ----------------------------------------------------------------- output paths


def test_unwritable_predictions_dir_is_refused_before_training(tmp_path):
    (tmp_path / "a-file").write_text("")
    proc = cli("classifier.py", sst_args(tmp_path, "--predictions_dir", str(tmp_path / "a-file" / "pred")))
    assert proc.returncode == 2 and "a-file" in proc.stderr and "cannot write" in proc.stderr
    assert not (tmp_path / "run").exists() and "loaded" not in proc.stdout
    with pytest.raises(RunDirError, match="cannot write"):
        sonnet_generation.main(["--model_size", "tiny", "--random_init", "--epochs", "1", *data_flags(tmp_path),
                                "--sonnet_out", str(tmp_path / "a-file" / "sonnets.txt")])
    assert not (tmp_path / "run").exists()
    with pytest.raises(RunDirError, match="cannot write"):
        trainer(tmp_path, output_dir=str(tmp_path / "a-file" / "run")).fit()


def test_check_writable_refuses_a_read_only_file(tmp_path, monkeypatch):
    target = tmp_path / "out.csv"
    target.write_text("")
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != target)  # as a non-root user would see it
    with pytest.raises(RunDirError, match="out.csv"):
        run_dir.check_writable([target])
    run_dir.check_writable([tmp_path / "new" / "x.csv", tmp_path / "dir"])
    assert (tmp_path / "new").is_dir() and not list((tmp_path / "new").iterdir())
