"""prepare_submit.py: what goes in the Gradescope zip, and the checks before it is written."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import pytest

import prepare_submit
from engine.data import DataFormatError
from tasks.course_data import write_id_predictions, write_sonnets
from tasks.submission import ZIP_NAME, collect_files, prepare, read_id_predictions

REPO = Path(__file__).resolve().parents[1]


def write(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def fake_project(root: Path) -> Path:
    """A project whose graders' imports work without torch, with everything that must stay out."""
    write(root / "optimizer.py", "class AdamW: ...\n")
    write(root / "utils.py", "def model_size_to_params(size): ...\n")
    write(root / "config.py", "SIZES = {}\n")
    write(root / "classifier.py", "from training.cli import x\nimport numpy\n")
    write(root / "models/__init__.py")
    write(root / "models/gpt2.py", "from config import SIZES\nclass GPT2Model: ...\n")
    write(root / "modules/__init__.py")
    write(root / "modules/attention.py", "")
    write(root / "training/__init__.py")
    write(root / "training/cli.py", "from training.helpers import y\nx = 1\n")
    write(root / "training/helpers.py", "y = 2\n")
    write(root / "training/objectives/__init__.py")
    write(root / "distillation/__init__.py")  # imported by nothing packed: left out
    write(root / "tests/test_x.py", "")
    for junk in ("data/ids-sst-train.csv", "runs/sst/best.pt", "models/weights.pt", "models/__pycache__/gpt2.pyc",
                 ".venv/lib/site.py", "checkpoints/a.bin", "predictions/model.safetensors", ".git/config"):
        write(root / junk, "junk")
    return root


def good_predictions(root: Path) -> None:
    write_id_predictions(root / "predictions/full-model-sst-dev-out.csv", "Predicted_Sentiment", ["a1", "b2"], [4, 0])
    write_id_predictions(root / "predictions/para-test-output.csv", "Predicted_Is_Paraphrase", ["q1"], [8505])
    write_sonnets(root / "predictions/generated_sonnets.txt", [(0, "Shall I compare thee\nto a summer's day")])


def test_packs_the_starter_set_and_imported_packages_only(tmp_path):
    root = fake_project(tmp_path / "proj")
    good_predictions(root)
    out = tmp_path / "sub.zip"
    report = prepare(root, out)
    assert report.errors == [] and report.written
    with zipfile.ZipFile(out) as z:
        names = sorted(z.namelist())
    assert names == sorted([  # zipfile drops the starter's "./" prefix: same names as its zip
        "classifier.py", "config.py", "optimizer.py", "utils.py", "models/__init__.py", "models/gpt2.py",
        "modules/__init__.py", "modules/attention.py", "training/__init__.py", "training/cli.py",
        "training/helpers.py", "training/objectives/__init__.py",
        "predictions/full-model-sst-dev-out.csv", "predictions/para-test-output.csv",
        "predictions/generated_sonnets.txt"])
    assert "predictions/full-model-sst-test-out.csv" in report.missing
    assert "predictions/para-test-output.csv" not in report.missing


def test_bad_prediction_files_stop_the_zip(tmp_path, capsys):
    root = fake_project(tmp_path / "proj")
    good_predictions(root)
    write(root / "predictions/full-model-cfimdb-dev-out.csv", "id \t Predicted_Sentiment\nx, 1 \n")  # no final space
    write_id_predictions(root / "predictions/last-linear-layer-cfimdb-test-out.csv", "Predicted_Sentiment", ["a"], [3])
    write(root / "predictions/para-dev-output.csv", "id \t Predicted_Is_Paraphrase \nq1, 8505\n")
    write(root / "predictions/generated_sonnets_dev.txt", "Generated sonnets\n\n0\nx\n")
    out = tmp_path / "sub.zip"
    with pytest.raises(SystemExit) as e:
        prepare_submit.main(["--root", str(root), "--output", str(out)])
    assert e.value.code == 2 and not out.exists()
    err = capsys.readouterr().err
    assert "full-model-cfimdb-dev-out.csv:1: header should be" in err
    assert "value 3 (id a) is not one of [0, 1]" in err
    assert "para-dev-output.csv:2: expected '<id>, <integer> '" in err
    assert "generated_sonnets_dev.txt:1: the first line should be '--Generated Sonnets-- '" in err
    assert "no zip written" in err
    prepare_submit.main(["--root", str(root), "--output", str(out), "--force"])
    assert out.exists()


def test_predictions_are_counted_against_the_data_files(tmp_path):
    root = fake_project(tmp_path / "proj")
    good_predictions(root)
    write(root / "data/ids-sst-dev.csv", "\tid\tsentence\tsentiment\n0\ta1\tgood\t4\n1\tb2\tbad\t0\n2\tc3\tmeh\t2\n")
    report = prepare(root, tmp_path / "a.zip")
    assert report.errors == [f"{root}/predictions/full-model-sst-dev-out.csv: 2 predictions for the 3 examples of "
                             f"{root}/data/ids-sst-dev.csv"]
    write(root / "data/ids-sst-dev.csv", "\tid\tsentence\tsentiment\n0\ta1\tgood\t4\n1\tzz\tbad\t0\n")
    assert "'zz' has no prediction" in prepare(root, tmp_path / "b.zip").errors[0]
    write(root / "data/ids-sst-dev.csv", "\tid\tsentence\tsentiment\n0\tB2\tgood\t4\n1\ta1\tbad\t0\n")
    assert prepare(root, tmp_path / "c.zip").errors == []


def test_never_overwrites_without_the_flag(tmp_path, capsys):
    root = fake_project(tmp_path / "proj")
    out = write(tmp_path / ZIP_NAME, "an earlier submission")
    with pytest.raises(SystemExit) as e:
        prepare_submit.main(["--root", str(root), "--output", str(out)])
    assert e.value.code == 2 and out.read_text() == "an earlier submission"
    assert "pass --overwrite" in capsys.readouterr().err
    prepare_submit.main(["--root", str(root), "--output", str(out), "--overwrite"])
    assert zipfile.is_zipfile(out)


def test_a_folder_without_models_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        prepare_submit.main(["--root", str(tmp_path), "--output", str(tmp_path / "x.zip")])
    assert e.value.code == 2 and "has no models/" in capsys.readouterr().err and not (tmp_path / "x.zip").exists()


def test_dry_run_writes_nothing(tmp_path, capsys):
    root = fake_project(tmp_path / "proj")
    out = tmp_path / "sub.zip"
    report = prepare_submit.main(["--root", str(root), "--output", str(out), "--dry_run"])
    assert not out.exists() and not report.written and report.packed
    assert "models/gpt2.py" in capsys.readouterr().out


def test_import_check_catches_a_missing_grader_module(tmp_path):
    root = fake_project(tmp_path / "proj")
    (root / "utils.py").unlink()
    report = prepare(root, tmp_path / "sub.zip")
    assert not report.written
    assert report.errors == ["the graders' imports fail from the zip alone (ModuleNotFoundError: No module named "
                             "'utils')"]


def test_real_models_import_from_the_zip_alone(tmp_path):
    """The project's own models/ and modules/ need nothing outside the zip (utils.py stands in)."""
    root = tmp_path / "proj"
    for d in ("models", "modules"):
        shutil.copytree(REPO / d, root / d, ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("config.py", "errors.py", "optimizer.py"):  # root .py files: the starter zips every one
        shutil.copy(REPO / f, root / f)
    if not (REPO / "utils.py").exists():
        write(root / "utils.py", "def model_size_to_params(size): ...\n")
    else:
        shutil.copy(REPO / "utils.py", root / "utils.py")
    report = prepare(root, tmp_path / "sub.zip")
    assert report.errors == [] and report.written


def test_repository_zip_holds_no_weights_data_or_tests():
    files = [p.as_posix() for p in collect_files(REPO)]
    assert "models/gpt2.py" in files and "engine/trainer.py" in files and "optimizer.py" in files
    assert not [f for f in files if f.startswith(("data/", "runs/", ".venv/", "tests/")) or f.endswith(".pt")]


def test_id_prediction_reader_round_trips_the_writer(tmp_path):
    p = tmp_path / "x.csv"
    write_id_predictions(p, "Predicted_Sentiment", ["abc", "d,e"], [3, 0])  # ", " in an id is refused
    assert read_id_predictions(p, "Predicted_Sentiment") == [("abc", 3), ("d,e", 0)]
    with pytest.raises(DataFormatError, match="header should be"):
        read_id_predictions(p, "Predicted_Is_Paraphrase")
