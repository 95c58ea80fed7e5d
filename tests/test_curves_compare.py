"""Curves that compare: training-set accuracy logged beside dev accuracy (metrics.jsonl, the
trackers' names, curves.png) without changing what a run trains, and ``python -m experiments plot``
overlaying runs labelled by what differs between their settings, a seeds experiment as bands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import paraphrase_detection as para
from engine.tracking import read_history, scalars
from engine.trainer import TrainConfig, Trainer
from experiments import plot
from experiments.__main__ import main as experiments_main
from tests.conftest import SHARED_DATA, make_toy_data, make_toy_model, toy_loss_fn
from tests.test_paraphrase import HEADER, SHARED_TOKENIZER, quora_source, write

TINY = ["--model_size", "tiny", "--random_init", "--limit", "8", "--epochs", "2", "--no_progress"]
SST = ["--dataset", "sst", *(x for split, suffix in (("train", "train"), ("dev", "dev"), ("test", "test-student"))
                             for x in (f"--sst_{split}", str(SHARED_DATA / f"ids-sst-{suffix}.csv")))]


def epoch_records(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == "epoch"]


def accuracy_of(model: torch.nn.Module, loader: DataLoader) -> dict[str, float]:
    hits = sum(int((model(x).argmax(-1) == y).sum()) for x, y in loader)
    return {"accuracy": hits / len(loader.dataset)}


def toy_trainer(tmp_path: Path, name: str, train_eval: bool) -> Trainer:
    X, y = make_toy_data()
    train = DataLoader(TensorDataset(X, y), batch_size=8, shuffle=True)
    dev = DataLoader(TensorDataset(X[:16], y[:16]), batch_size=8)
    sample = DataLoader(TensorDataset(X[16:32], y[16:32]), batch_size=8)  # iterating it draws a seed
    cfg = TrainConfig(epochs=3, lr=1e-2, output_dir=str(tmp_path / name), progress=False, plot=train_eval)
    trainer = Trainer(make_toy_model(), toy_loss_fn, train, lambda m: accuracy_of(m, dev), cfg,
                      train_eval_fn=(lambda m: accuracy_of(m, sample)) if train_eval else None)
    trainer.fit()
    return trainer


def test_training_set_metrics_are_logged_and_change_nothing_the_run_trains(tmp_path):
    plain, scored = toy_trainer(tmp_path, "plain", False), toy_trainer(tmp_path, "scored", True)
    # The training-set pass restores the RNG its loader draws from: the same shuffles, the same weights.
    for k, v in plain.model.state_dict().items():
        assert torch.equal(v, scored.model.state_dict()[k]), k
    assert [h["dev"] for h in plain.history] == [h["dev"] for h in scored.history]
    records = epoch_records(tmp_path / "scored")
    assert all(0.0 <= r["train"]["accuracy"] <= 1.0 for r in records) and len(records) == 3
    assert "train" not in epoch_records(tmp_path / "plain")[0]  # a run without one logs as before
    assert scalars(records[-1])["train/accuracy"] == records[-1]["train"]["accuracy"]  # TensorBoard / W&B name
    assert (tmp_path / "scored" / "curves.png").stat().st_size > 0


@pytest.mark.parametrize("settings,names,want", [
    ([{"lr": 1e-3, "seed": 1, "model.n_embd": 64}, {"lr": 1e-2, "seed": 1, "model.n_embd": 128}], ["a", "b"],
     ["lr=0.001", "lr=0.01"]),  # the architecture counts only when nothing else differs
    ([{"model.n_embd": 64, "lr": 1e-3}, {"model.n_embd": 128, "lr": 1e-3}], ["a", "b"], ["model.n_embd=64",
                                                                                       "model.n_embd=128"]),
    ([{"lr": 1e-3}, {"lr": 1e-3}], ["run/a", "run/b"], ["run/a", "run/b"]),  # nothing differs: the folders
    ([{"fine_tune_mode": "lora", "save_trainable_only": True},  # follows from the mode: not named
      {"fine_tune_mode": "full-model", "save_trainable_only": False}], ["a", "b"],
     ["fine_tune_mode=lora", "fine_tune_mode=full-model"]),
    ([{"lr": 1e-3, "pooling": "last"}, {"lr": 1e-3}], ["a", "b"], ["pooling=last", "pooling=(not set)"]),
    ([{"a": 1, "b": [1, 2], "c": 3, "d": 4, "e": True}, {"a": 2, "b": [3], "c": 4, "d": 5, "e": False}], ["x", "y"],
     ["a=1, b=1,2, c=3, d=4 (+1 more)", "a=2, b=3, c=4, d=5 (+1 more)"]),
    ([{"a": 1, "b": 1, "c": 1, "d": 1, "e": 1}, {"a": 2, "b": 2, "c": 2, "d": 2, "e": 1},
      {"a": 2, "b": 2, "c": 2, "d": 2, "e": 2}], ["x", "y", "z"],
     ["x: a=1, b=1, c=1, d=1 (+1 more)", "y: a=2, b=2, c=2, d=2 (+1 more)", "z: a=2, b=2, c=2, d=2 (+1 more)"]),
])
def test_labels_name_what_differs(settings, names, want):
    assert plot.labels(settings, names) == want


def test_a_seeds_line_has_the_settings_its_runs_share_and_a_band():
    assert plot.shared([{"lr": 1e-3, "seed": 1}, {"lr": 1e-3, "seed": 2}]) == {"lr": 1e-3}
    runs = [[{"epoch": 1, "dev": {"accuracy": 0.2}}, {"epoch": 2, "dev": {"accuracy": 0.4}}],
            [{"epoch": 1, "dev": {"accuracy": 0.4}}]]
    epochs, mean, std = plot.mean_curve(runs, "dev", "accuracy")
    assert epochs == [1, 2] and mean == pytest.approx([0.3, 0.4]) and std[0] == pytest.approx(0.1414, abs=1e-4)
    assert std[1] != std[1]  # one run reached epoch 2: no spread to show


@pytest.fixture(scope="module")
def seeds_experiment(tmp_path_factory) -> Path:
    """Two tiny classifier runs through the real CLI, as a seeds experiment (``seed-1``, ``seed-2``)."""
    out = tmp_path_factory.mktemp("seeds") / "sst"
    experiments_main(["seeds", "--task", "classifier", "--seeds", "1,2", "--out", str(out), "--", *SST, *TINY])
    return out


def test_classifier_runs_log_training_accuracy_beside_dev(seeds_experiment):
    for seed in (1, 2):
        records = epoch_records(seeds_experiment / f"seed-{seed}")
        assert len(records) == 2
        for r in records:
            assert {"accuracy", "macro_f1", "matthews_corr"} <= set(r["train"]) and "accuracy" in r["dev"]


def test_two_runs_overlaid_labelled_by_their_seeds(seeds_experiment, tmp_path, capsys):
    out = plot.plot([seeds_experiment / "seed-1", seeds_experiment / "seed-2"], tmp_path / "two.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out.strip().endswith(": seed=1; seed=2")


def test_a_seeds_experiment_is_one_band(seeds_experiment, tmp_path, capsys):
    experiments_main(["plot", str(seeds_experiment), "--out", str(tmp_path / "img" / "seeds.png"),
                      "--metric", "macro_f1"])
    assert (tmp_path / "img" / "seeds.png").stat().st_size > 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'img' / 'seeds.png'}: {seeds_experiment}"
    [curve] = plot.curves_of(seeds_experiment)
    assert len(curve.runs) == 2 and "seed" not in curve.settings and curve.settings["dataset"] == "sst"


@pytest.mark.parametrize("argv,message", [
    (["/no/such/run"], "/no/such/run: no such folder"),
    (["{tmp}/empty"], "no metrics.jsonl in it or below"),
    (["{tmp}/empty/file.txt"], "not a folder"),
    (["{seeds}/seed-1", "--metric", "bleu"], "--metric bleu: no run logged it on dev"),
    (["{seeds}/seed-1", "--out", "{tmp}/x.jpg"], "give a .png file name"),
])
def test_bad_paths_are_refused_in_one_line(seeds_experiment, tmp_path, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "file.txt").write_text("x")
    argv = [a.format(tmp=tmp_path, seeds=seeds_experiment) for a in argv]
    with pytest.raises(SystemExit) as e:
        experiments_main(["plot", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err


def test_paraphrase_run_logs_training_accuracy(tmp_path):
    train = quora_source(tmp_path / "train.tsv", 8)
    dev = write(tmp_path / "dev.tsv", HEADER + "".join(f"{i}\td{i}\tWhy {i}?\tHow {i}?\t{i % 2}\n" for i in range(4)))
    test = write(tmp_path / "test.tsv", "\tid\tsentence1\tsentence2\n0\tt0\tWhat?\tWho?\n")
    out = tmp_path / "run"
    para.main([*TINY, "--tokenizer", str(SHARED_TOKENIZER), "--batch_size", "4", "--output_dir", str(out),
               "--para_train", str(train), "--para_dev", str(dev), "--para_test", str(test),
               "--para_dev_out", str(out / "dev.csv"), "--para_test_out", str(out / "test.csv")])
    history = read_history(out / "metrics.jsonl")
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(0.0 <= h["train"]["accuracy"] <= 1.0 and "accuracy" in h["dev"] for h in history)
