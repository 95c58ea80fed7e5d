"""CoLA end to end on a micro random GPT-2: ``classifier.py --dataset cola`` (Matthews correlation
beside accuracy, in the returned metrics and in metrics.jsonl; dev predictions only), ``python -m
distillation kd --dataset cola`` with and without the teacher, and the efficiency record every
run writes."""

from __future__ import annotations

import json

import pytest

import classifier
from engine.checkpoints import load_checkpoint
from engine.efficiency import EFFICIENCY_FILE, efficiency_table, read_efficiency
from tasks.metrics import matthews_corr
from tasks.sentiment import read_cola
from tests.conftest import SHARED_DATA

COLA = ["--cola_train", str(SHARED_DATA / "cola-train.tsv"), "--cola_dev", str(SHARED_DATA / "cola-dev.tsv")]


def cola_run(classifier_cli, mode: str = "full-model", *extra: str) -> list[str]:
    return classifier_cli(mode, "--dataset", "cola", "--limit", "16", "--lr", "1e-3", *COLA, *extra)


def test_cola_reports_matthews_correlation_and_writes_dev_predictions(tmp_path, capsys, classifier_cli):
    results = classifier.main(cola_run(classifier_cli))
    assert set(results) == {"cola"}
    metrics = results["cola"]
    assert {"accuracy", "macro_f1", "matthews_corr", "majority_baseline"} <= set(metrics)
    assert "Matthews corr." in capsys.readouterr().out

    pred = tmp_path / "pred"  # --predictions_dir: published there, with the record of the run it came from
    assert sorted(p.name for p in pred.iterdir()) == ["full-model-cola-dev-out.csv", "provenance.json"]  # no test set
    assert (pred / "full-model-cola-dev-out.csv").read_bytes() == (
        tmp_path / "runs" / "predictions" / "full-model-cola-dev-out.csv").read_bytes()  # the run keeps its own
    lines = (pred / "full-model-cola-dev-out.csv").read_text().split("\n")
    assert lines[0] == "id \t Predicted_Acceptability " and lines[-1] == ""
    rows = [line.split(", ") for line in lines[1:-1]]
    gold = read_cola(SHARED_DATA / "cola-dev.tsv", limit=16)
    assert [r[0] for r in rows] == [e.id for e in gold]
    predicted = [int(r[1]) for r in rows]
    # The reported scores are those of the written predictions.
    assert metrics["matthews_corr"] == pytest.approx(matthews_corr([e.label for e in gold], predicted))

    records = [json.loads(x) for x in (tmp_path / "runs" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in records if r["type"] == "epoch"]
    assert epochs and all("matthews_corr" in r["dev"] and "accuracy" in r["dev"] for r in epochs)
    ckpt_extra = load_checkpoint(tmp_path / "runs" / "best.pt")["extra"]
    assert ckpt_extra["dataset"] == "cola" and ckpt_extra["num_labels"] == 2


def test_every_run_writes_its_efficiency_record(tmp_path, capsys, classifier_cli):
    classifier.main(cola_run(classifier_cli, "last-linear-layer", "--epochs", "2"))
    record = read_efficiency(tmp_path / "runs")
    assert record["mode"] == "last-linear-layer" and record["epochs"] == 2
    assert 0 < record["trainable_parameters"] < record["parameters"]
    assert record["trainable_share"] == pytest.approx(record["trainable_parameters"] / record["parameters"])
    assert record["trainable_parameters"] == 32 * 2 + 2  # the linear head on the micro model's 32-d states
    assert record["seconds_per_epoch"] > 0 and record["eval_seconds_per_epoch"] > 0
    assert record["peak_memory_bytes"] > 2**20 and record["peak_memory_kind"] == "cpu peak RSS"
    out = capsys.readouterr().out
    assert f"efficiency ({tmp_path / 'runs' / EFFICIENCY_FILE})" in out and efficiency_table([record]) in out
    assert "| last-linear-layer | 66 of " in out


def test_kd_on_cola_with_and_without_the_teacher(tmp_path, capsys, classifier_cli):
    from distillation.__main__ import main

    teacher_run = classifier.main(cola_run(classifier_cli))
    summary = main(["kd", "--teacher", str(tmp_path / "runs" / "best.pt"), "--dataset", "cola",
                    "--train", str(SHARED_DATA / "cola-train.tsv"), "--dev", str(SHARED_DATA / "cola-dev.tsv"),
                    "--limit", "16", "--epochs", "1", "--batch_size", "8", "--student_hidden", "16",
                    "--max_length", "32", "--no_progress", "--output_dir", str(tmp_path / "kd")])
    results = summary["results"]
    assert set(results) == {"teacher", "kd", "baseline"} and summary["dataset"] == "cola"
    assert results["teacher"]["dev_matthews_corr"] == pytest.approx(teacher_run["cola"]["matthews_corr"])
    assert results["teacher"]["dev_accuracy"] == pytest.approx(teacher_run["cola"]["accuracy"])
    for k in ("kd", "baseline"):
        assert -1 <= results[k]["dev_matthews_corr"] <= 1 and (16 * results[k]["dev_accuracy"]).is_integer()
        assert (tmp_path / "kd" / k / EFFICIENCY_FILE).exists()
    out = capsys.readouterr().out
    assert "cola dev Matthews corr.: teacher" in out and "student alone" in out


def test_kd_refuses_a_teacher_of_another_dataset(tmp_path, classifier_cli):
    from distillation.__main__ import main
    from models.loading import CheckpointError

    classifier.main(cola_run(classifier_cli, "last-linear-layer", "--epochs", "1"))
    with pytest.raises(CheckpointError, match="trained on cola .* --dataset sst"):
        main(["kd", "--teacher", str(tmp_path / "runs" / "best.pt"), "--dataset", "sst", "--limit", "8",
              "--output_dir", str(tmp_path / "kd")])
