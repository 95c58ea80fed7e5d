"""``--optimizer``: every choice resumes exactly (2 steps, stop, resume to 4 equals 4 straight
steps, bit for bit, preconditioner refreshes included), trains a task from the command line, is
refused under ``--fsdp`` where it cannot work, and a plain AdamW run never loads
``pytorch_optimizer``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import classifier
from engine import optimizers
from engine.checkpoints import load_checkpoint
from engine.fast_adamw import FastAdamW
from engine.run_dir import RunDirError
from engine.trainer import TrainConfig, Trainer
from errors import InputError
from tests.conftest import make_toy_data, toy_loss_fn
from tests.test_bad_flags import micro, run_cli  # noqa: F401  (micro: a fixture)
from tests.test_trainer import PLAIN_RUN, assert_same_weights
from tests.test_validation import classifier_args

NEW = [name for name in optimizers.OPTIMIZERS if name != "adamw"]


def make_model() -> nn.Module:
    """Wide enough that Shampoo keeps a 2-D block (its shape interpretation merges a tensor of at most
    512 elements into one dimension, which it leaves to the graft) and SOAP has two eigenbases."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Dropout(0.1), nn.Linear(32, 32), nn.Tanh(),
                         nn.Linear(32, 2))


def run(tmp_path: Path, name: str, optimizer: str, **cfg) -> Trainer:
    X, y = make_toy_data()
    loader = DataLoader(TensorDataset(X, y), batch_size=12, shuffle=True)  # 4 steps per epoch
    config = TrainConfig(epochs=1, lr=3e-3, weight_decay=0.1, optimizer=optimizer, output_dir=str(tmp_path / name),
                         progress=False, plot=False, **cfg)
    trainer = Trainer(make_model(), toy_loss_fn, loader, None, config)
    trainer.fit()
    return trainer


@pytest.mark.parametrize("name", NEW)
def test_two_steps_then_resume_equals_four_steps(tmp_path, monkeypatch, name):
    monkeypatch.setattr(optimizers, "PRECONDITION_EVERY", 2)  # refreshed at steps 2 and 4: around the stop
    full = run(tmp_path, "full", name)
    part = run(tmp_path, "resumed", name, max_steps=2)
    assert part.global_step == 2
    load_checkpoint(tmp_path / "resumed" / "last.pt")  # the state is plain tensors: weights_only reads it
    torch.manual_seed(1234)  # a fresh process has other RNG states: the resume restores them
    resumed = run(tmp_path, "resumed", name, resume=True)
    assert resumed.global_step == full.global_step == 4
    assert_same_weights(full.model, resumed.model)
    before = [p.detach().clone() for p in full.model.parameters()]
    for t in (full, resumed):  # one more step (no dropout): the resumed state steps as the live one
        t.model.eval()(make_toy_data()[0]).sum().backward()
    full.optimizer.step(), resumed.optimizer.step()
    assert_same_weights(full.model, resumed.model)
    assert any(not torch.equal(a, b) for a, b in zip(before, full.model.parameters()))


def test_default_is_the_course_adamw_with_its_groups(tmp_path):
    trainer = run(tmp_path, "a", "adamw", max_steps=1)
    opt = trainer.optimizer
    assert type(opt) is FastAdamW and TrainConfig().optimizer == "adamw"
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert [p.dim() for p in opt.param_groups[1]["params"]] == [1, 1, 1]


@pytest.mark.parametrize("name", NEW)
def test_no_weight_decay_on_biases(tmp_path, name):
    opt = run(tmp_path, "a", name, max_steps=1).optimizer
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def test_bad_choices_are_refused():
    with pytest.raises(InputError, match="not one of"):
        TrainConfig(optimizer="kfac")
    for name in optimizers.OPTIMIZERS:
        if name in optimizers.SHARDABLE:
            TrainConfig(optimizer=name, fsdp=True)
        else:
            with pytest.raises(InputError, match=f"--optimizer {name} cannot train under --fsdp"):
                TrainConfig(optimizer=name, fsdp=True)


def test_soap_trains_the_classifier_from_the_command_line(tmp_path, micro):  # noqa: F811
    classifier.main(classifier_args(tmp_path, micro, "--optimizer", "soap", "--fine-tune-mode", "full-model"))
    saved = load_checkpoint(next((tmp_path / "runs").rglob("last.pt")))
    assert saved["train_config"]["optimizer"] == "soap" and "GG" in next(iter(saved["optimizer"]["state"].values()))


def test_shampoo_under_fsdp_is_one_error_line_before_any_work(tmp_path, micro, capsys):  # noqa: F811
    code, out, err = run_cli(classifier.main, classifier_args(tmp_path, micro, "--optimizer", "shampoo", "--fsdp"),
                             capsys)
    assert code == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("error: --optimizer shampoo cannot train under --fsdp"), err
    assert not (tmp_path / "runs").exists()


def test_a_plain_run_never_loads_pytorch_optimizer(tmp_path):
    root = Path(__file__).resolve().parent.parent
    script = PLAIN_RUN.replace('"engine.distributed" in sys.modules', '"pytorch_optimizer" in sys.modules')
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run")], cwd=root, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_a_run_saved_before_the_flag_existed_resumes(tmp_path):
    """Checkpoints written before ``--optimizer`` hold no such setting: they trained with AdamW."""
    full = run(tmp_path, "full", "adamw")
    run(tmp_path, "old", "adamw", max_steps=2)
    last = tmp_path / "old" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    del ckpt["train_config"]["optimizer"]
    torch.save(ckpt, last)
    assert_same_weights(full.model, run(tmp_path, "old", "adamw", resume=True).model)


def test_a_resume_cannot_change_the_optimizer(tmp_path):
    run(tmp_path, "a", "adamw", max_steps=2)
    with pytest.raises(RunDirError, match=r"cannot change the optimizer \(optimizer 'adamw' -> 'soap'\)"):
        run(tmp_path, "a", "soap", resume=True, resume_allow_changes=True)
