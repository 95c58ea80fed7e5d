"""Seeds runner and ensembles on a micro random GPT-2: summaries hold the runs' own numbers, an
interrupted seed resumes, an ensemble of one is that model, of two the mean of their probabilities."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
import torch

import experiments.__main__ as cli
from engine import tracking
from engine.trainer import Callback
from experiments import ensemble, launch, seeds
from tests.conftest import classifier_cli_args


def task_flags(tmp_path: Path, *extra: str, mode: str = "last-linear-layer") -> list[str]:
    """classifier.py flags of a quick SST run, without the ones the runner owns."""
    argv = classifier_cli_args(tmp_path, mode, "--dataset", "sst", *extra)
    for flag in ("--output_dir", "--predictions_dir"):
        i = argv.index(flag)
        del argv[i:i + 2]
    return argv


class InterruptAt(Callback):
    """Ctrl-C at the end of the ``n``-th epoch seen (before that epoch's last.pt is written)."""

    def __init__(self, n: int) -> None:
        self.n, self.seen = n, 0

    def on_epoch_end(self, trainer, epoch, metrics):
        self.seen += 1
        if self.seen == self.n:
            raise KeyboardInterrupt


def test_seeds_summary_is_mean_and_std_of_each_run_and_resumes(tmp_path, capsys):
    out = tmp_path / "exp"
    flags = task_flags(tmp_path, "--epochs", "2")
    with tracking.attach(InterruptAt(4)), pytest.raises(KeyboardInterrupt):  # seed 42's second epoch
        seeds.run_seeds("classifier", [11711, 42], out, flags)
    assert (out / "seed-11711" / launch.DONE).exists() and not (out / "seed-42" / launch.DONE).exists()
    assert (out / "seed-42" / "last.pt").exists()
    capsys.readouterr()
    rows = seeds.run_seeds("classifier", [11711, 42], out, flags)
    log = capsys.readouterr().out
    assert "seed 11711: finished earlier" in log and "resumed from" in log and "epoch 1" in log
    by_name = {r["metric"]: r for r in rows}
    per_seed = {}
    for s in (11711, 42):
        epochs = [json.loads(x) for x in (out / f"seed-{s}" / "metrics.jsonl").read_text().splitlines()
                  if json.loads(x)["type"] == "epoch"]
        assert [e["epoch"] for e in epochs] == [1, 2]  # the interrupted epoch is logged once
        per_seed[s] = max(epochs, key=lambda e: (e["dev"]["accuracy"], -e["epoch"]))["dev"]["accuracy"]
        assert (out / f"seed-{s}" / "predictions" / "last-linear-layer-sst-dev-out.csv").exists()
    acc = by_name["dev/accuracy"]
    assert acc["seed 11711"] == per_seed[11711] and acc["seed 42"] == per_seed[42]
    assert acc["mean"] == pytest.approx(statistics.fmean(per_seed.values()))
    assert acc["std"] == pytest.approx(statistics.stdev(per_seed.values()))
    assert {"dev/macro_f1", "dev/epoch"} <= set(by_name)
    with open(out / "summary.csv") as f:
        table = {r["metric"]: r for r in csv.DictReader(f)}
    assert float(table["dev/accuracy"]["mean"]) == pytest.approx(acc["mean"])
    assert "| dev/accuracy |" in (out / "summary.md").read_text()


def test_summary_reads_efficiency_numbers_a_run_folder_holds(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text(
        json.dumps({"type": "epoch", "epoch": 1, "step": 2, "train_loss": 1.0, "dev": {"accuracy": 0.5}}) + "\n"
        + json.dumps({"type": "epoch", "epoch": 2, "step": 4, "train_loss": 0.9, "dev": {"accuracy": 0.4}}) + "\n"
        + json.dumps({"type": "efficiency", "trainable_parameters": 10, "seconds_per_epoch": 1.5}) + "\n")
    assert launch.run_results(folder) == {"dev/accuracy": 0.5, "dev/epoch": 1.0,
                                          "efficiency/trainable_parameters": 10.0,
                                          "efficiency/seconds_per_epoch": 1.5}
    rows = seeds.summarise({1: {"dev/accuracy": 0.5}, 2: {"dev/accuracy": 0.7}})
    assert rows[0]["mean ± std"] == f"0.6000 ± {statistics.stdev([0.5, 0.7]):.4f}"


@pytest.mark.parametrize("argv,message", [
    (["seeds", "--task", "classifier", "--seeds", "1,,2", "--out", "x"], "comma-separated list of int"),
    (["seeds", "--task", "classifier", "--seeds", "1,1", "--out", "x"], "repeats a seed"),
    (["seeds", "--task", "classifier", "--seeds", "1", "--out", "x", "--", "--seed", "3"], "--seed: set by the runner"),
    (["seeds", "--task", "paraphrase", "--seeds", "1", "--out", "x", "--", "--para_dev_out", "p.csv"],
     "--para_dev_out: set by the runner"),
    (["ensemble", "--out", "x", "missing.pt"], "does not exist"),
])
def test_bad_experiment_input_is_one_error_line_and_status_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        cli.run_main(lambda: cli.main(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (tmp_path / "x").exists()


def test_help_explains_each_command(capsys):
    for command in ("seeds", "ensemble", "sweep"):
        with pytest.raises(SystemExit) as e:
            cli.main([command, "--help"])
        assert e.value.code == 0
        assert "python -m experiments " + command in capsys.readouterr().out


def test_ensemble_of_one_is_that_model_and_of_two_the_mean(tmp_path):
    import classifier

    runs = {}
    for mode in ("last-linear-layer", "lora"):
        (tmp_path / mode).mkdir()
        argv = classifier_cli_args(tmp_path / mode, mode, "--dataset", "sst", "--epochs", "2")
        classifier.main(argv)
        runs[mode] = tmp_path / mode

    one = ensemble.run_ensemble([runs["lora"] / "runs" / "best.pt"], tmp_path / "one", prefix="lora")
    for split in ("dev", "test"):  # byte for byte the run's own prediction files
        assert (tmp_path / "one" / "predictions" / f"lora-sst-{split}-out.csv").read_text() == \
            (runs["lora"] / "pred" / f"lora-sst-{split}-out.csv").read_text()

    two = ensemble.run_ensemble([runs["last-linear-layer"] / "runs" / "best.pt", runs["lora"] / "runs" / "best.pt"],
                                tmp_path / "two")
    members = ensemble.load_members([runs["last-linear-layer"] / "runs" / "best.pt"], torch.device("cpu"))
    rows = ensemble.read_split(members[0], "dev", None, 8)
    p_a = ensemble.probabilities(members[0], rows, 4)
    p_b = one["probs"]["dev"]
    assert torch.allclose(two["probs"]["dev"], (p_a + p_b) / 2, atol=1e-6)
    assert torch.allclose(two["probs"]["dev"].sum(-1), torch.ones(len(rows)), atol=1e-5)
    assert not torch.allclose(p_a, p_b)  # two different models: the mean is neither
    lines = (tmp_path / "two" / "predictions" / "ensemble-sst-dev-out.csv").read_text().split("\n")
    assert lines[0] == "id \t Predicted_Sentiment "
    assert [int(x.split(", ")[1]) for x in lines[1:-1]] == two["probs"]["dev"].argmax(-1).tolist()
    labels = [r.label for r in rows]
    hits = sum(int(p == y) for p, y in zip(two["probs"]["dev"].argmax(-1).tolist(), labels))
    assert two["dev"]["accuracy"] == pytest.approx(hits / len(labels))
    assert [m["checkpoint"] for m in two["members"]] == [str(runs[m] / "runs" / "best.pt")
                                                         for m in ("last-linear-layer", "lora")]
    assert "ensemble of 2" in (tmp_path / "two" / "ensemble.md").read_text()


def test_ensemble_refuses_checkpoints_of_another_dataset(tmp_path):
    import classifier

    for ds in ("sst", "cfimdb"):
        (tmp_path / ds).mkdir()
        classifier.main(classifier_cli_args(tmp_path / ds, "last-linear-layer", "--dataset", ds))
    from models.loading import CheckpointError

    with pytest.raises(CheckpointError, match="ensemble checkpoints of one dataset"):
        ensemble.run_ensemble([tmp_path / "sst" / "runs" / "best.pt", tmp_path / "cfimdb" / "runs" / "best.pt"],
                              tmp_path / "out")


def test_paraphrase_ensemble_reads_as_its_runs_did_and_averages_p_yes(tmp_path):
    import paraphrase_detection
    from tests.test_paraphrase import quora_source

    train, dev = quora_source(tmp_path / "train.tsv", 12), quora_source(tmp_path / "dev.tsv", 6)
    micro = Path(classifier_cli_args(tmp_path, "lora")[3])
    models = []
    for seed in ("1", "2"):
        run = tmp_path / f"run{seed}"
        paraphrase_detection.main([
            "--model_size", str(micro), "--random_init", "--epochs", "1", "--batch_size", "4", "--no_progress",
            "--max_length", "24", "--padding_side", "left", "--seed", seed, "--output_dir", str(run),
            "--para_train", str(train), "--para_dev", str(dev), "--para_test", str(dev),
            "--para_dev_out", str(run / "dev.csv"), "--para_test_out", str(run / "test.csv")])
        models.append(run / "paraphrase-model.pt")
    one = ensemble.run_ensemble(models[:1], tmp_path / "one")
    assert (tmp_path / "one" / "predictions" / "para-dev-output.csv").read_text() == \
        (tmp_path / "run1" / "dev.csv").read_text()
    two = ensemble.run_ensemble(models, tmp_path / "two")
    (second,) = ensemble.load_members(models[1:], torch.device("cpu"))
    assert second.max_length == 24 and second.settings.padding_side == "left"
    p2 = ensemble.probabilities(second, ensemble.read_split(second, "dev", None), 4)
    assert torch.allclose(two["probs"]["dev"], (one["probs"]["dev"] + p2) / 2, atol=1e-6)
    assert not torch.allclose(one["probs"]["dev"], p2)


def test_seeds_of_a_classifier_on_both_datasets_resume_a_dataset_killed_before_its_first_checkpoint(tmp_path, capsys):
    argv = classifier_cli_args(tmp_path, "last-linear-layer")
    for flag in ("--output_dir", "--predictions_dir"):
        i = argv.index(flag)
        del argv[i:i + 2]
    out = tmp_path / "exp"
    with tracking.attach(InterruptAt(2)), pytest.raises(KeyboardInterrupt):  # cfimdb's first epoch
        seeds.run_seeds("classifier", [5], out, argv)
    cfimdb = out / "seed-5" / "cfimdb"
    assert (cfimdb / "metrics.jsonl").exists() and not (cfimdb / "last.pt").exists()
    capsys.readouterr()
    rows = {r["metric"]: r for r in seeds.run_seeds("classifier", [5], out, argv)}
    assert "seed 5: finished earlier" in capsys.readouterr().out
    assert {"sst/dev/accuracy", "cfimdb/dev/accuracy"} <= set(rows)
    for ds in ("sst", "cfimdb"):
        assert (out / "seed-5" / ds / "predictions" / f"last-linear-layer-{ds}-dev-out.csv").exists()
        epochs = [x for x in (out / "seed-5" / ds / "metrics.jsonl").read_text().splitlines() if '"epoch", ' in x]
        assert len(epochs) == 1


def test_best_epoch_skips_epochs_without_the_metric(tmp_path):
    """An epoch whose dev record lacks the metric (after one that has it) is skipped, not a KeyError."""
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in (
        {"type": "epoch", "epoch": 1, "dev": {"chrf": 1.0}}, {"type": "epoch", "epoch": 2, "dev": {}},
        {"type": "epoch", "epoch": 3, "dev": {"chrf": 2.0}}, {"type": "step", "step": 9})))
    assert launch.best_epoch(log, "chrf") == {"chrf": 2.0, "epoch": 3}
    assert launch.best_epoch(log, "chrf", mode="min") == {"chrf": 1.0, "epoch": 1}
