"""A run refused after it claimed a new default run folder leaves no folder and does not move
``latest``: the next plain ``--resume`` still continues the earlier run (issue 26)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import run_dir
from tests.test_run_dir import cli, epoch_records, sst_args


def runs_of(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.is_dir() and not p.is_symlink())


def all_folders(tmp_path: Path) -> list[Path]:
    return sorted(p for p in (tmp_path / "runs").rglob("*") if p.is_dir())


@pytest.mark.parametrize(("mode", "refusal"), [((), ("--max_length", "100000")),
                                               (("--fine-tune-mode", "lora"), ("--lora_targets", "nothing"))])
def test_a_run_refused_after_its_claim_leaves_no_folder_and_keeps_latest(tmp_path, mode, refusal):
    args = sst_args(tmp_path, *mode, output_dir=False)  # the default runs/ of the test's cwd
    first = cli("classifier.py", args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    parent = next(p.parent for p in (tmp_path / "runs").rglob(run_dir.LATEST))
    before, latest, folders = runs_of(parent), run_dir.latest_run(parent), all_folders(tmp_path)
    assert len(before) == 1 and latest is not None and (latest / "last.pt").is_file()

    refused = cli("classifier.py", [*args, *refusal], cwd=tmp_path)
    assert refused.returncode == 2 and refused.stderr.splitlines()[-1].startswith("error: "), refused.stderr
    assert "Traceback" not in refused.stderr
    assert all_folders(tmp_path) == folders and run_dir.latest_run(parent) == latest

    resumed = cli("classifier.py", [*[a if a != "1" or args[i - 1] != "--epochs" else "2"
                                      for i, a in enumerate(args)], "--resume"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert runs_of(parent) == before and [r["epoch"] for r in epoch_records(latest)] == [1, 2]


def test_an_empty_new_folder_is_removed_and_latest_restored(tmp_path, monkeypatch):
    """Unit level: only a new default folder still empty is removed; one holding a file stays."""
    monkeypatch.setattr(run_dir, "_NEW", {})  # this process's earlier tests made new folders of their own
    kept = run_dir.new_run_folder(tmp_path)
    run_dir.claim(kept)
    (kept / "metrics.jsonl").write_text("")
    gone = run_dir.open_run(tmp_path, epochs=1)
    assert run_dir.latest_run(tmp_path).resolve() == gone
    assert run_dir.discard_unused_runs() == [gone]
    assert not gone.exists() and kept.is_dir() and run_dir.latest_run(tmp_path) == kept
    first = run_dir.open_run(tmp_path / "fresh", epochs=1)
    run_dir.discard_unused_runs()
    assert not first.exists() and run_dir.latest_run(tmp_path / "fresh") is None
    explicit = run_dir.open_run(tmp_path, epochs=1, output_dir=str(tmp_path / "mine"))
    run_dir.discard_unused_runs()
    assert explicit.is_dir()
    run_dir.release(kept)
    run_dir.release(explicit)
    served = run_dir.open_run(tmp_path / "served", epochs=1)
    run_dir.release(served)  # its run ended (Trainer.fit releases it): a later failure leaves it alone
    assert run_dir.discard_unused_runs() == [] and served.is_dir()
