"""The training engine on a small MLP: resume exactness, accumulation, schedules,
early stopping, checkpoints and logs."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from engine.checkpoints import load_checkpoint
from engine.rng import get_rng_state, set_rng_state
from engine.strategy import SingleProcess
from engine.train_config import lr_lambda
from engine.trainer import Callback, TrainConfig, Trainer
from tests.conftest import make_toy_data, make_toy_model, toy_loss_fn

make_data, make_model, loss_fn = make_toy_data, make_toy_model, toy_loss_fn


def run(tmp_path, name: str, model: nn.Module | None = None, batch_size: int = 8, eval_fn=None, **cfg) -> Trainer:
    X, y = make_data()
    loader = DataLoader(TensorDataset(X, y), batch_size=batch_size, shuffle=True)
    defaults = dict(epochs=3, lr=1e-2, output_dir=str(tmp_path / name), progress=False, log_every=2, plot=False)
    trainer = Trainer(model or make_model(), loss_fn, loader, eval_fn, TrainConfig(**{**defaults, **cfg}))
    trainer.fit()
    return trainer


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_loss_falls(tmp_path):
    X, y = make_data()
    model = make_model(dropout=0.0)
    before = F.cross_entropy(model(X), y).item()
    run(tmp_path, "a", model, epochs=5)
    assert F.cross_entropy(model(X), y).item() < 0.7 * before


# mid-epoch, at an epoch boundary, mid-epoch with accumulation (6 batches -> 3 steps per epoch)
@pytest.mark.parametrize("stop_at,grad_accum", [(4, 1), (6, 1), (5, 2)])
def test_resume_equals_uninterrupted(tmp_path, stop_at, grad_accum):
    common = dict(epochs=3, scheduler="cosine", warmup_ratio=0.2, grad_accum=grad_accum)
    full = run(tmp_path, "full", **common)
    part = run(tmp_path, "resumed", max_steps=stop_at, **common)
    assert part.global_step == stop_at and part.epoch < 3
    torch.manual_seed(1234)  # a fresh process would have other RNG states; resume must restore them
    resumed = run(tmp_path, "resumed", resume=True, **common)
    assert resumed.global_step == full.global_step
    assert_same_weights(full.model, resumed.model)
    assert [h["train_loss"] for h in resumed.history] == pytest.approx([h["train_loss"] for h in full.history])
    assert resumed.optimizer.state_dict()["state"][0]["step"] == full.optimizer.state_dict()["state"][0]["step"]


def sampler_loader(grouped: bool) -> DataLoader:
    """Shuffled by a generator on the sampler: DataLoader(generator=...) or the length-grouped sampler."""
    X, y = make_data()
    if not grouped:
        return DataLoader(TensorDataset(X, y), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(5))
    from engine.data import make_loader

    def collate(rows):
        idx = torch.tensor([r["i"] for r in rows])
        return [X[idx], y[idx]]

    torch.manual_seed(5)
    return make_loader([{"input_ids": [0] * (1 + i % 7), "i": i} for i in range(len(X))], collate, 8,
                       shuffle=True, group_by_length=True)


@pytest.mark.parametrize("grouped", [False, True])
def test_resume_with_sampler_generator(tmp_path, grouped):
    def fit(name, **cfg):
        t = Trainer(make_model(), loss_fn, sampler_loader(grouped), None,
                    TrainConfig(epochs=2, lr=1e-2, output_dir=str(tmp_path / name), progress=False, **cfg))
        t.fit()
        return t

    full = fit("full")
    fit("res", max_steps=9)
    assert_same_weights(full.model, fit("res", resume=True).model)


def test_grad_accum_matches_large_batch(tmp_path):
    a = run(tmp_path, "a", make_model(0.0), batch_size=48, epochs=2, grad_accum=1)
    # 48 examples in batches of 16, accumulated 3 at a time: same gradient as one batch of 48
    b = run(tmp_path, "b", make_model(0.0), batch_size=16, epochs=2, grad_accum=3)
    assert a.global_step == b.global_step == 2
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_schedules():
    warm = lr_lambda("linear", warmup_steps=4, total_steps=14)
    assert [warm(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert warm(9) == pytest.approx(0.5) and warm(14) == 0.0
    cos = lr_lambda("cosine", 0, 10)
    assert cos(0) == 1.0 and cos(5) == pytest.approx(0.5) and cos(10) == pytest.approx(0.0)
    assert lr_lambda("constant", 2, 10)(7) == 1.0
    with pytest.raises(ValueError, match="scheduler"):
        TrainConfig(scheduler="step")


def test_lr_follows_schedule(tmp_path):
    t = run(tmp_path, "a", epochs=2, scheduler="linear", warmup_ratio=0.25)  # 12 steps, 3 warm-up
    lrs = [json.loads(line)["lr"] for line in open(tmp_path / "a" / "metrics.jsonl") if '"step"' in line
           and json.loads(line)["type"] == "step"]
    assert t.total_steps == 12
    assert lrs[0] == pytest.approx(1e-2)  # after step 2 the lr is that of step index 2: 3/3
    assert lrs[-1] == pytest.approx(0.0)


def scripted_eval(values):
    it = iter(values)
    return lambda model: {"accuracy": next(it), "macro_f1": 0.0}


def test_early_stopping_and_best(tmp_path):
    t = run(tmp_path, "a", eval_fn=scripted_eval([0.5, 0.7, 0.6, 0.65, 0.9]), epochs=5, patience=2)
    assert t.epoch == 4 and t.stop  # epochs 3 and 4 did not beat 0.7
    assert t.best_metrics == {"accuracy": 0.7, "macro_f1": 0.0, "epoch": 2}
    assert load_checkpoint(t.best_checkpoint)["epoch"] == 2


def test_top_k_and_load_best(tmp_path):
    snapshots = {}

    class Snap(Callback):
        def on_epoch_end(self, trainer, epoch, metrics):
            snapshots[epoch] = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    X, y = make_data()
    loader = DataLoader(TensorDataset(X, y), batch_size=8, shuffle=True)
    cfg = TrainConfig(epochs=4, lr=1e-2, output_dir=str(tmp_path), progress=False, save_top_k=2)
    t = Trainer(make_model(), loss_fn, loader, scripted_eval([0.6, 0.9, 0.5, 0.8]), cfg, callbacks=[Snap()])
    best = t.fit()
    assert best["epoch"] == 2
    assert sorted(p.name for p in tmp_path.glob("best*.pt")) == ["best-epoch2.pt", "best-epoch4.pt"]
    assert t.best_checkpoint == tmp_path / "best-epoch2.pt"
    t.load_best()
    for k, v in t.model.state_dict().items():
        assert torch.equal(v, snapshots[2][k])


def test_min_mode(tmp_path):
    losses = iter([3.0, 1.0, 2.0])
    t = run(tmp_path, "a", eval_fn=lambda m: {"loss": next(losses)}, metric="loss", mode="min")
    assert t.best_metrics == {"loss": 1.0, "epoch": 2}


def test_eval_fn_must_return_metric(tmp_path):
    with pytest.raises(KeyError, match="accuracy"):
        run(tmp_path, "a", eval_fn=lambda m: {"f1": 1.0})


def test_logs_plot_and_trainable_only(tmp_path):
    model = make_model()
    model[0].weight.requires_grad_(False)
    model[0].bias.requires_grad_(False)
    t = run(tmp_path, "a", model, eval_fn=lambda m: {"accuracy": 0.5}, save_trainable_only=True, plot=True)
    out = tmp_path / "a"
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["epoch"] for r in records if r["type"] == "epoch"] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["examples_per_s"] > 0 for r in records if r["type"] == "step")
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    for name in ("best.pt", "last.pt"):
        assert set(load_checkpoint(out / name)["model"]) == {"3.weight", "3.bias"}
    frozen = model[0].weight.clone()
    t.load_best()
    assert torch.equal(model[0].weight, frozen)


def test_rng_state_roundtrip():
    state = get_rng_state()
    a = (torch.rand(3), random.random(), np.random.rand())
    set_rng_state(state)
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_one_process_strategy_is_the_identity(tmp_path):
    """What the loop calls at its fixed points does nothing in one process: no wrapper, no
    synchronisation, numbers unreduced, rank 0 of 1 evaluating and writing."""
    strategy = SingleProcess(torch.device("cpu"))
    x = torch.tensor([1.5, 2.0])
    assert strategy.wrap(make_model()) is None
    with strategy.sync_gradients(False):
        pass
    assert strategy.sum(x) is x and strategy.mean(x) is x
    assert (strategy.world_size, strategy.rank, strategy.is_main, strategy.sharded) == (1, 0, True, False)
    assert strategy.evaluate(lambda: {"accuracy": 1.0}) == {"accuracy": 1.0} and strategy.on_main(lambda: 3) == 3
    assert strategy.gather_objects({"a": 1}) == [{"a": 1}]
    t = run(tmp_path, "a", epochs=1)
    assert isinstance(t.strategy, SingleProcess) and t.wrapped is None


PLAIN_RUN = """
import sys, torch
from engine.data import make_loader
from engine.trainer import TrainConfig, Trainer
from tests.conftest import make_toy_data, make_toy_model, toy_loss_fn
X, y = make_toy_data()
loader = make_loader([{"i": i} for i in range(len(X))], lambda rows: [X[[r["i"] for r in rows]],
                     y[[r["i"] for r in rows]]], 8, shuffle=True)
cfg = TrainConfig(epochs=1, output_dir=sys.argv[1], progress=False, plot=False)
Trainer(make_toy_model(), toy_loss_fn, loader, lambda m: {"accuracy": 1.0}, cfg).fit()
print("engine.distributed" in sys.modules)
"""


def test_a_one_process_run_never_loads_the_distributed_machinery(tmp_path):
    """engine.distributed (DDP, FSDP, sharded checkpoints) is for torchrun only: a student's
    one-process run (shuffled loader, training, evaluation, checkpoints) does not load it."""
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", PLAIN_RUN, str(tmp_path / "run")], cwd=root, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_the_rng_is_kept_around_the_training_set_evaluation_only_when_there_is_one(tmp_path, monkeypatch):
    """The training-set evaluation's loader draws a seed; the RNG is put back around it (the run trains
    the same with or without it), and untouched in a run without one."""
    restored = []
    monkeypatch.setattr("engine.trainer.set_rng_state", lambda state: restored.append(set_rng_state(state)))
    X, y = make_data()

    def fit(name: str, train_eval_fn=None) -> Trainer:
        torch.manual_seed(0)
        loader = DataLoader(TensorDataset(X, y), batch_size=8, shuffle=True)
        cfg = TrainConfig(epochs=2, lr=1e-2, output_dir=str(tmp_path / name), progress=False, plot=False)
        trainer = Trainer(make_model(), loss_fn, loader, None, cfg, train_eval_fn=train_eval_fn)
        trainer.fit()
        return trainer

    plain = fit("plain")
    assert restored == []
    scored = fit("scored", lambda m: {"accuracy": float(torch.rand(()).item() >= 0)})
    assert len(restored) == 2 and [h["train"] for h in scored.history] == [{"accuracy": 1.0}] * 2
    assert_same_weights(plain.model, scored.model)
