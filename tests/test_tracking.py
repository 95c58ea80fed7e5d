"""--report_to: TensorBoard event files equal metrics.jsonl, W&B gets the same values, a missing
tracker package is a parse error, and a resume may change the tracker."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import classifier
from cli import validation
from engine import tracking
from engine.trainer import Callback, TrainConfig, Trainer
from tests.conftest import make_toy_data, make_toy_model, toy_loss_fn


def toy_trainer(tmp_path, report_to: str, epochs: int = 3, **cfg) -> Trainer:
    X, y = make_toy_data()
    loader = DataLoader(TensorDataset(X, y), batch_size=8, shuffle=True)

    def eval_fn(m):
        return {"accuracy": (m(X).argmax(-1) == y).float().mean().item(), "loss": toy_loss_fn(m, [X, y]).item()}

    config = TrainConfig(epochs=epochs, lr=1e-2, output_dir=str(tmp_path / "run"), progress=False, plot=False,
                         log_every=2, report_to=report_to, **cfg)
    return Trainer(make_toy_model(), toy_loss_fn, loader, eval_fn, config)


def expected_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        for name, value in tracking.scalars(rec).items():
            out.setdefault(name, []).append((rec["step"], value))
    return out


def event_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_events_equal_metrics_jsonl(tmp_path):
    trainer = toy_trainer(tmp_path, "tensorboard")
    trainer.fit()
    folder = tmp_path / "run"
    assert list(folder.glob("events.out.tfevents.*")), "no event file beside metrics.jsonl"
    want, got = expected_scalars(folder), event_scalars(folder)
    assert {"train/loss", "train/lr", "dev/accuracy", "dev/loss", "train/loss_epoch"} <= set(want)
    assert set(got) == set(want)
    for tag, points in want.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag
    assert len(got["dev/accuracy"]) == 3  # one per epoch


def test_resume_mirrors_only_new_records_and_may_change_the_tracker(tmp_path):
    toy_trainer(tmp_path, "none", epochs=2).fit()
    folder = tmp_path / "run"
    assert not list(folder.glob("events.out.tfevents.*"))
    toy_trainer(tmp_path, "tensorboard", epochs=3, resume=True).fit()  # report_to is not a result setting
    got = event_scalars(folder)
    epochs = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in epochs if r["type"] == "epoch"][-1]
    assert [v for _, v in got["dev/accuracy"]] == pytest.approx([last["dev"]["accuracy"]])  # epoch 3 only
    assert got["train/epoch"][0][1] == 3


class FakeWandbRun:
    def __init__(self, **kwargs):
        self.init, self.logged, self.finished = kwargs, [], False

    def log(self, values, step):
        self.logged.append((step, values))

    def finish(self):
        self.finished = True


def test_wandb_offline_without_network_logs_the_same_values(tmp_path, monkeypatch):
    runs = []
    fake = types.SimpleNamespace(init=lambda **kw: runs.append(FakeWandbRun(**kw)) or runs[-1],
                                 util=types.SimpleNamespace(generate_id=lambda: "abc123"))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr(tracking, "wandb_reachable", lambda timeout=2.0: False)
    toy_trainer(tmp_path, "wandb", epochs=2).fit()
    (run,) = runs
    assert run.init["mode"] == "offline" and run.init["dir"] == str(tmp_path / "run") and run.finished
    assert run.init["config"]["lr"] == 1e-2
    logged = {}
    for step, values in run.logged:
        for name, v in values.items():
            logged.setdefault(name, []).append((step, v))
    assert logged == expected_scalars(tmp_path / "run")
    assert (tmp_path / "run" / "wandb-run-id").read_text().strip() == "abc123"


@pytest.mark.parametrize("kind", ["wandb", "tensorboard"])
def test_missing_tracker_package_is_a_parse_error(kind, monkeypatch, capsys, classifier_cli):
    real = validation.importlib.util.find_spec  # --report_to's check (cli.validation.report_to)
    monkeypatch.setattr(validation.importlib.util, "find_spec", lambda name: None if name == kind else real(name))
    with pytest.raises(SystemExit) as e:
        classifier.get_args(classifier_cli("lora", "--report_to", kind))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"{kind} is not installed" in err and "pip install" in err


def test_unknown_tracker_is_a_parse_error(capsys, classifier_cli):
    with pytest.raises(SystemExit) as e:
        classifier.get_args(classifier_cli("lora", "--report_to", "mlflow"))
    assert e.value.code == 2 and "must be one of none, tensorboard, wandb" in capsys.readouterr().err


def test_attached_callbacks_reach_trainers_built_inside_the_block(tmp_path):
    seen = []

    class Spy(Callback):
        def on_epoch_end(self, trainer, epoch, metrics):
            seen.append(epoch)

    with tracking.attach(Spy()):
        toy_trainer(tmp_path, "none", epochs=2).fit()
    toy_trainer(tmp_path / "b", "none", epochs=1).fit()  # outside the block: not attached
    assert seen == [1, 2]
    assert torch.is_grad_enabled()
