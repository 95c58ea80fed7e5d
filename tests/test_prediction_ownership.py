"""Prediction files belong to the run that made them (``tasks.publish``), through the real CLIs.

Each case runs in a fresh project folder (the working folder of the run: ``runs/`` and
``predictions/`` are made there) whose ``data/`` holds 8-example course-format SST files, so a
run without ``--limit`` is complete and publishes into ``predictions/``; ``--limit`` makes it
partial. Tiny random models, one epoch.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

import classifier
import paraphrase_detection
import prepare_submit
import sonnet_generation
from tasks.publish import REPLACED, set_aside
from tests.conftest import SHARED_DATA

FILES = ("full-model-sst-dev-out.csv", "full-model-sst-test-out.csv")
SONNET_FILES = ("sonnets.txt", "sonnets_held_out.txt", "sonnets_held_out_dev.txt", "TRUE_sonnets_held_out_dev.txt")


def sst_rows(split: str, n: int = 8) -> str:
    labelled = split != "test-student"
    rows = "".join(f"{i}\t{split[:2]}{i}\tthe film was {'good' if i % 2 else 'dull'} , take {i}"
                   + (f"\t{i % 5}" if labelled else "") + "\n" for i in range(n))
    return "\tid\tsentence" + ("\tsentiment" if labelled else "") + "\n" + rows


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A project folder, made the working folder: small SST files in data/, the course's sonnets
    and offline Quora source linked there, and models/ (what prepare_submit.py takes for a project)."""
    (tmp_path / "data").mkdir()
    for split in ("train", "dev", "test-student"):
        (tmp_path / "data" / f"ids-sst-{split}.csv").write_text(sst_rows(split))
    for name in (*SONNET_FILES, "quora-minbert-dev.csv"):
        (tmp_path / "data" / name).symlink_to(SHARED_DATA / name)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text("")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def sst(capsys, *extra: str) -> tuple[str, Path]:
    """One ``classifier.py`` SST run in the working folder: (its output, its run folder)."""
    classifier.main(["--dataset", "sst", "--fine-tune-mode", "full-model", "--model_size", "tiny", "--random_init",
                     "--epochs", "1", "--batch_size", "4", "--max_length", "32", "--no_progress", *extra])
    out = capsys.readouterr().out
    run = next(line.split()[-1] for line in out.splitlines() if line.startswith("wrote "))
    return out, Path(run).parent.parent


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def records(folder: Path = Path("predictions")) -> dict:
    return json.loads((folder / "provenance.json").read_text())["files"]


def test_a_partial_run_never_touches_predictions(project, capsys):
    out, run = sst(capsys, "--limit", "4")
    assert not (project / "predictions").exists()
    assert sorted(p.name for p in (run / "predictions").iterdir()) == sorted(FILES)
    assert (f"predictions/ left alone: this run is partial (--limit 4); its prediction files are in "
            f"{run}/predictions/") in out.splitlines()

    sst(capsys)  # a complete run publishes; a later partial one leaves its files and records as they are
    before = snapshot(project / "predictions")
    out, run = sst(capsys, "--limit", "4", "--seed", "5")
    assert snapshot(project / "predictions") == before
    assert out.count("left alone") == 1 and f"{run}/predictions/" in out


def test_a_replaced_file_stays_recoverable_and_the_metrics_are_compared(project, capsys):
    out, first = sst(capsys, "--seed", "1")
    old = {name: (project / "predictions" / name).read_bytes() for name in FILES}
    for name in FILES:  # the published file is the run's own, byte for byte
        assert (first / "predictions" / name).read_bytes() == old[name]
    old_acc = records()[FILES[0]]["value"]
    assert f"predictions/{FILES[0]}: copied from {first}/predictions/{FILES[0]} (dev accuracy {old_acc:.3f})" in out

    out, second = sst(capsys, "--seed", "2")
    new_acc = records()[FILES[0]]["value"]
    for name in FILES:
        assert (f"predictions/{name}: replaced the file of {first} (dev accuracy {old_acc:.3f}) with this "
                f"run's (dev accuracy {new_acc:.3f})") in out.splitlines()
        assert (first / "predictions" / name).read_bytes() == old[name]  # recoverable from the run that made it
        assert (project / "predictions" / name).read_bytes() == (second / "predictions" / name).read_bytes()
    rec = records()[FILES[1]]
    assert rec["run"] == str(project / second) and rec["complete"] is True and rec["metric"] == "accuracy"


def test_a_file_no_run_holds_is_kept_aside_when_replaced(project, capsys):
    hand = project / "predictions" / FILES[0]
    hand.parent.mkdir()
    hand.write_text("id \t Predicted_Sentiment \nde0, 1 \n")
    out, _ = sst(capsys)
    kept = list((project / "predictions" / "replaced").glob(f"*/{FILES[0]}"))
    assert len(kept) == 1 and kept[0].read_text() == "id \t Predicted_Sentiment \nde0, 1 \n"
    line = next(x for x in out.splitlines() if x.startswith(f"predictions/{FILES[0]}: replaced"))
    assert f"replaced a file of unknown origin, kept as {kept[0].relative_to(project)}, with this run's" in line


def test_a_run_that_only_predicts_keeps_its_files_in_a_folder_of_its_own(project, capsys):
    _, trained = sst(capsys)
    latest = (trained.parent / "latest").resolve()
    out, run = sst(capsys, "--epochs", "0", "--load", str(trained / "best.pt"))
    assert run.parent == trained.parent and run.name.startswith("predict-")
    assert (trained.parent / "latest").resolve() == latest  # a later plain --resume still continues the trained run
    assert f"predictions/{FILES[0]}: replaced the file of {trained} (" in out
    assert records()[FILES[0]]["run"] == str(project / run)


def test_prepare_submit_names_each_files_run_and_refuses_a_partial_one(project, capsys):
    _, complete = sst(capsys)
    out, partial = sst(capsys, "--limit", "4", "--dataset", "sst", "--predictions_dir", "sub/predictions")
    sub = project / "sub"
    (sub / "models").mkdir()
    (sub / "models" / "__init__.py").write_text("")
    assert (f"sub/predictions/{FILES[0]}: copied from {partial}/predictions/{FILES[0]} (dev accuracy "
            in out) and "(a partial run: --limit 4; prepare_submit.py refuses it)" in out

    prepare_submit.main(["--root", ".", "--output", "ok.zip", "--no_import_check"])
    out = capsys.readouterr().out.splitlines()
    acc = records()[FILES[0]]["value"]
    stamp = records()[FILES[0]]["time"]
    assert f"predictions/{FILES[0]}: from {complete} (dev accuracy {acc:.3f}, {stamp})" in out
    assert any(x.startswith("the autograder reads predictions/{last-linear-layer-sst-dev-out.csv,") for x in out)
    with zipfile.ZipFile("ok.zip") as z:  # the record stays out of what Gradescope gets
        assert sorted(n for n in z.namelist() if n.startswith("predictions/")) == sorted(f"predictions/{f}"
                                                                                         for f in FILES)

    with pytest.raises(SystemExit) as exit_info:
        prepare_submit.main(["--root", "sub", "--output", "no.zip", "--no_import_check"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and not Path("no.zip").exists()
    assert (f"error: sub/predictions/{FILES[0]}: from {partial} (dev accuracy "
            in err) and ("a partial run (--limit 4); the autograder would grade it as your submission: rerun "
                         "without that, or pass --force") in err
    prepare_submit.main(["--root", "sub", "--output", "forced.zip", "--no_import_check", "--force"])
    assert Path("forced.zip").exists()


def test_files_without_a_record_and_files_never_graded_are_named(project, capsys):
    out, _ = sst(capsys, "--fine-tune-mode", "lora", "--predictions_dir", "sub/predictions")
    for split in ("dev", "test"):
        assert (f"note: the autograder never reads lora-sst-{split}-out.csv; it reads "
                f"last-linear-layer-sst-{split}-out.csv or full-model-sst-{split}-out.csv "
                "(rename it to have it graded)") in out.splitlines()
    (project / "sub" / "models").mkdir()
    (project / "sub" / "models" / "__init__.py").write_text("")
    by_hand = project / "sub" / "predictions" / "full-model-sst-dev-out.csv"
    by_hand.write_text("id \t Predicted_Sentiment \nde0, 1 \n")
    prepare_submit.main(["--root", "sub", "--dry_run", "--no_import_check"])
    out = capsys.readouterr().out.splitlines()
    assert ("warning: sub/predictions/full-model-sst-dev-out.csv: origin unknown (no record in "
            "sub/predictions/provenance.json)") in out
    assert ("warning: sub/predictions/lora-sst-dev-out.csv: the autograder never reads lora-sst-dev-out.csv; it reads "
            "last-linear-layer-sst-dev-out.csv or full-model-sst-dev-out.csv (rename it to have it graded)") in out


def test_paraphrase_on_carved_splits_and_a_sonnet_smoke_run_leave_predictions_alone(project, capsys):
    common = ["--model_size", "tiny", "--random_init", "--epochs", "1", "--no_progress", "--max_length", "48"]
    paraphrase_detection.main([*common, "--limit", "8", "--batch_size", "4"])
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "left alone" in x)
    assert line.startswith("predictions/ left alone: this run is partial (--limit 8; data/quora-train.csv, "
                           "data/quora-dev.csv, data/quora-test-student.csv missing: splits carved offline); ")
    sonnet_generation.main([*common, "--limit", "2", "--max_new_tokens", "4", "--batch_size", "2"])
    out = capsys.readouterr().out
    runs = sorted(Path("runs/sonnet").glob("*/2*"))
    assert (f"predictions/ left alone: this run is partial (--limit 2); its prediction files are in "
            f"{runs[0]}/predictions/") in out.splitlines()
    assert sorted(p.name for p in (runs[0] / "predictions").iterdir()) == ["generated_sonnets.txt",
                                                                         "generated_sonnets_dev.txt"]
    assert not (project / "predictions").exists()


def test_files_set_aside_in_the_same_second_never_overwrite_each_other(tmp_path):
    kept = []
    for text in ("first", "second"):
        (tmp_path / "a.csv").write_text(text)
        kept.append(set_aside(tmp_path / "a.csv"))
    assert [p.read_text() for p in kept] == ["first", "second"] and not (tmp_path / "a.csv").exists()
    assert all(p.parent.parent == tmp_path / REPLACED for p in kept)
