"""Training on more than one process (CPU, Gloo, 2 ranks): the same weights as one process with
the whole batch, exact resume after both ranks are killed, FSDP, and a failing rank ending the job.

The two-rank runs are ``torch.multiprocessing`` spawns of the workers below (the environment
torchrun would set, made by hand) or real ``torchrun`` commands; each rank uses one thread.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from engine import distributed, ranks
from engine.data import LengthGroupedSampler, make_loader
from engine.rng import seed_everything
from engine.trainer import Callback, TrainConfig, Trainer
from tests.conftest import MICRO, classifier_cli_args, make_toy_model

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]

# ------------------------------------------------------------------ a toy task with uneven counts


def features(n: int = 43) -> list[dict]:
    """Examples whose loss items vary (1-3 per example), so count weighting matters; 43 leaves a
    short last batch, split unevenly over 2 ranks (so their dropout streams part)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, 6, generator=g)
    return [{"x": X[i].tolist(), "y": int(X[i, 0] + X[i, 1] > 0), "input_ids": [0] * (1 + i % 3)} for i in range(n)]


def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    return {"x": torch.tensor([e["x"] for e in examples]), "y": torch.tensor([e["y"] for e in examples]),
            "k": torch.tensor([float(len(e["input_ids"])) for e in examples])}


def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    ce = F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")
    return (ce * batch["k"]).sum() / batch["k"].sum()  # a mean over items, as an LM loss over tokens


def fit(out: Path, batch: int, accum: int = 1, group: bool = False, dropout: float = 0.0, resume: bool = False,
        fsdp: bool = False, callbacks=(), max_steps: int = 0) -> dict[str, torch.Tensor]:
    """Train the toy model 2 epochs; its final weights (gathered under FSDP)."""
    seed_everything(0)
    model = make_toy_model(dropout)
    loader = make_loader(features(), collate, batch, shuffle=True, group_by_length=group)
    cfg = TrainConfig(epochs=2, lr=1e-2, weight_decay=0.01, output_dir=str(out), progress=False, plot=False,
                      seed=5, grad_accum=accum, resume=resume, save_every_steps=1, fsdp=fsdp, max_steps=max_steps)
    trainer = Trainer(model, loss_fn, loader, None, cfg, count_fn=lambda b: b["k"].sum(), callbacks=callbacks)
    trainer.fit()
    if trainer.strategy.sharded:
        return trainer.strategy.model_state(model, trainable_only=False)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------ two ranks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), GPT2_DIST_TIMEOUT="60")
    torch.set_num_threads(1)
    distributed.setup(torch.device("cpu"))


def spawn(worker, *args) -> None:
    mp.spawn(worker, args=(2, free_port(), *args), nprocs=2, join=True)


def save_on_main(weights: dict[str, torch.Tensor], path: Path) -> None:
    if ranks.is_main():
        torch.save(weights, path)


def runs_worker(rank: int, world: int, port: int, tmp: Path, jobs: list[tuple[str, dict]]) -> None:
    join(rank, world, port)
    for name, kw in jobs:
        save_on_main(fit(tmp / name, **kw), tmp / f"{name}.pt")
    # Leave the group together: a process that exits while Gloo's threads still run aborts
    # ("terminate called without an active exception", SIGABRT) now and then.
    ranks.barrier()
    ranks.teardown()


class Kill(Callback):
    """Both ranks die (no clean-up, as under kill -9) after optimizer step ``at``."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_step_end(self, trainer: Trainer, step: int, loss: float | None) -> None:
        if step == self.at:
            os._exit(3)


def killed_worker(rank: int, world: int, port: int, tmp: Path, at: int) -> None:
    join(rank, world, port)
    fit(tmp / "killed", batch=4, dropout=0.2, callbacks=[Kill(at)])


def test_sharded_sampler_splits_every_global_batch():
    """Each rank's batch k is its slice of the one-process batch k; ranks get equally many batches
    (a short last batch split, one smaller than the number of ranks padded)."""
    gen = torch.Generator().manual_seed(1)
    base, state = LengthGroupedSampler([i % 7 for i in range(23)], batch_size=8, generator=gen), gen.get_state()
    order = list(base)
    shards = []
    for r in range(2):
        gen.set_state(state)  # each rank draws the same order
        shards.append(list(distributed.ShardedSampler(base, 4, rank=r, world=2)))
    assert [len(distributed.ShardedSampler(base, 4, rank=r, world=2)) for r in range(2)] == [8 + 3, 8 + 4]
    assert [len(s) for s in shards] == [11, 12]
    for k in range(2):
        assert shards[0][4 * k: 4 * k + 4] + shards[1][4 * k: 4 * k + 4] == order[8 * k: 8 * k + 8]
    assert shards[0][8:] + shards[1][8:] == order[16:]
    tiny = [list(distributed.ShardedSampler(range(9), 4, rank=r, world=2)) for r in range(2)]  # 9 = 8 + 1
    assert tiny == [[0, 1, 2, 3, 8], [4, 5, 6, 7, 8]]


def fake_process_group(monkeypatch, backend: str, device: torch.device) -> list[torch.Tensor]:
    """Rank 0 of a 2-rank process group as the strategy sees it, emulated in this one process
    (rank 1 holds what rank 0 holds). Its tensor collectives -- all_reduce, all_gather,
    broadcast -- keep NCCL's rule: a tensor on any other device than the one the group serves is
    refused, with NCCL's message. It records the tensors it was given."""
    given: list[torch.Tensor] = []

    def serve(*tensors: torch.Tensor) -> None:
        for t in tensors:
            if t.device != device:
                raise RuntimeError(f"No backend type associated with device type {t.device.type}")
        given.append(tensors[-1])

    def all_gather(out: list[torch.Tensor], tensor: torch.Tensor, *args, **kwargs) -> None:
        serve(*out, tensor)
        for o in out:
            o.copy_(tensor)

    def all_gather_object(out: list, obj, *args, **kwargs) -> None:  # objects: pickled by torch itself
        out[:] = [obj] * len(out)

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, *a, **k: serve(tensor))
    monkeypatch.setattr(dist, "broadcast", lambda tensor, *a, **k: serve(tensor))
    monkeypatch.setattr(dist, "all_gather", all_gather)
    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    return given


def test_the_nccl_emulation_refuses_a_tensor_on_another_device(monkeypatch):
    """The emulated NCCL group is strict where NCCL is: it refuses the count the Trainer's
    ``_group_total`` all-reduced before the fix (bug 1, written here as it was), and a CPU tensor
    given to all_gather or broadcast, while it serves tensors on its own device."""
    gpu = torch.device("meta")
    fake_process_group(monkeypatch, "nccl", gpu)
    counts = [3.0, 4.0]
    with pytest.raises(RuntimeError, match="device type cpu"):
        dist.all_reduce(torch.tensor(sum(counts), dtype=torch.float64))  # the old _group_total
    with pytest.raises(RuntimeError, match="device type cpu"):
        dist.all_gather([torch.empty(2, device=gpu)] * 2, torch.zeros(2))
    with pytest.raises(RuntimeError, match="device type cpu"):
        dist.broadcast(torch.zeros(2), src=0)
    dist.all_reduce(torch.zeros(2, device=gpu))
    dist.broadcast(torch.zeros(2, device=gpu), src=0)


def test_reductions_reach_nccl_on_its_device(monkeypatch):
    """Issue 25, bug 1: the Trainer's reductions (the group's example count, made on the host,
    and the losses) go through the strategy, which hands them to the process group on the
    device it serves. NCCL serves only this rank's GPU; no GPU here, so the meta device stands
    in for it (it is not the CPU, which is what matters). Before the fix ``_group_total``
    all-reduced a CPU float64 tensor and this group refused it, as NCCL did at a GPU run's first
    step. With Gloo the reductions stay on the CPU."""
    gpu = torch.device("meta")
    reduced = fake_process_group(monkeypatch, "nccl", gpu)
    strategy = distributed.strategy(gpu)
    count = torch.tensor(25.0, dtype=torch.float64)  # what Trainer._group_total reduces
    total = strategy.sum(count)
    assert total.device == gpu and total.dtype == torch.float64 and count.device.type == "cpu"
    assert strategy.mean(torch.zeros(())).device == gpu
    assert [t.device for t in reduced] == [gpu, gpu]

    reduced = fake_process_group(monkeypatch, "gloo", torch.device("cpu"))
    assert distributed.strategy(torch.device("cpu"), fsdp=True).sum(count) == count
    assert [t.device.type for t in reduced] == ["cpu"] and reduced[0] is not count  # a copy: reduced in place


def test_all_gather_reaches_the_group_on_its_device_and_keeps_the_local_gradient(monkeypatch):
    """The strategy's all_gather (SimCSE's views) goes to the group on its device (NCCL: the
    GPU, the meta device here), returns every rank's rows in rank order, and only this rank's
    rows carry gradients. The emulated rank 1 holds rank 0's rows."""
    gpu = torch.device("meta")
    fake_process_group(monkeypatch, "nccl", gpu)
    assert distributed.strategy(gpu).all_gather(torch.ones(3, 4, device=gpu)).shape == (6, 4)

    fake_process_group(monkeypatch, "gloo", torch.device("cpu"))
    x = torch.arange(6.0).view(3, 2).requires_grad_()
    both = distributed.strategy(torch.device("cpu")).all_gather(x)
    assert torch.equal(both, torch.cat([x, x]).detach())
    both.sum().backward()
    assert torch.equal(x.grad, torch.ones(3, 2))  # through rank 0's slice only


def test_tensor_collectives_have_one_place():
    """Every tensor collective of the project's code is in ``engine.distributed``'s strategies,
    behind ``DataParallel.on_group``, which puts the tensor on the group's device; the object
    collectives (``ranks``) are pickled and placed by torch itself."""
    pattern = re.compile(r"\bdist\.(all_reduce|all_gather|all_gather_into_tensor|broadcast|reduce|reduce_scatter|"
                         r"reduce_scatter_tensor|scatter|gather|send|recv|all_to_all)\(")
    found = {}
    for path in ROOT.rglob("*.py"):
        if not {".venv", "tests"} & set(path.relative_to(ROOT).parts):
            for line in path.read_text().splitlines():
                if pattern.search(line):
                    found.setdefault(str(path.relative_to(ROOT)), []).append(line.strip())
    assert found == {"engine/distributed.py": ["dist.all_reduce(x)", "dist.all_gather(parts, local)"]}


def test_two_ranks_equal_one_process(tmp_path):
    """2 ranks of batch 4 give the weights of 1 process of batch 8, with and without accumulation
    (uneven item counts: the group total is the one over both ranks), with length grouping."""
    jobs = [("plain", dict(batch=4)), ("accum", dict(batch=4, accum=2, group=True))]
    spawn(runs_worker, tmp_path, jobs)
    for name, kw in jobs:
        one = fit(tmp_path / f"one-{name}", **{**kw, "batch": 8})
        two = torch.load(tmp_path / f"{name}.pt")
        for k in one:
            torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6, msg=f"{name}: {k}")
    log = [json.loads(line) for line in (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if r["type"] == "epoch"] == [1, 2]  # written once, by rank 0


def test_resume_after_killing_both_ranks(tmp_path):
    """Dropout on: both ranks killed mid-epoch 2, resumed, end with the uninterrupted weights, bit for bit."""
    with pytest.raises(mp.ProcessExitedException):
        spawn(killed_worker, tmp_path, 8)
    spawn(runs_worker, tmp_path, [("killed", dict(batch=4, dropout=0.2, resume=True)),
                                  ("whole", dict(batch=4, dropout=0.2))])
    resumed, whole = torch.load(tmp_path / "killed.pt"), torch.load(tmp_path / "whole.pt")
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)


def test_fsdp_matches_ddp_and_resumes(tmp_path):
    """FSDP2 on Gloo (CPU): the DDP weights after 2 epochs with the hand-written AdamW on sharded
    parameters; a run stopped at step 3 and resumed from its gathered last.pt ends the same; the
    checkpoint loads into a plain model."""
    spawn(runs_worker, tmp_path, [("ddp", dict(batch=4, accum=2)), ("fsdp", dict(batch=4, accum=2, fsdp=True)),
                                  ("stop", dict(batch=4, accum=2, fsdp=True, max_steps=3)),
                                  ("stop", dict(batch=4, accum=2, fsdp=True, resume=True))])
    ddp, fsdp, resumed = (torch.load(tmp_path / f"{n}.pt") for n in ("ddp", "fsdp", "stop"))
    for k in ddp:
        torch.testing.assert_close(fsdp[k], ddp[k], rtol=1e-5, atol=1e-6)
        assert torch.equal(resumed[k], fsdp[k])
    plain = make_toy_model(0.0)
    from engine.checkpoints import load_weights_into

    load_weights_into(plain, tmp_path / "fsdp" / "last.pt")
    assert all(torch.equal(plain.state_dict()[k], fsdp[k]) for k in fsdp)


# ------------------------------------------------------------------ torchrun commands


def test_classifier_under_torchrun_matches_one_process(tmp_path):
    """``torchrun --nproc_per_node 2 classifier.py`` (batch 4 per rank), with DDP and with FSDP
    (per-block shards, a vocabulary that does not split evenly, rank-0 evaluation of a sharded
    model), evaluates and predicts as ``classifier.py`` with batch 8: same dev metrics each epoch,
    identical prediction files."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs = {}
    runs = (("one", [sys.executable], "8", []), ("two", [*TORCHRUN, str(free_port())], "4", []),
            ("fsdp", [*TORCHRUN, str(free_port())], "4", ["--fsdp"]))
    for name, launcher, batch, extra in runs:
        (tmp_path / name).mkdir()
        args = classifier_cli_args(tmp_path / name, "full-model", "--dataset", "sst", "--limit", "16",
                                   "--epochs", "2", "--hidden_dropout_prob", "0", "--batch_size", batch, *extra)
        (tmp_path / name / "micro" / "config.json").write_text(
            json.dumps({**MICRO, "resid_pdrop": 0, "embd_pdrop": 0, "attn_pdrop": 0}))
        out = subprocess.run([*launcher, str(ROOT / "classifier.py"), *args], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        logs[name] = [json.loads(x)["dev"] for x in (tmp_path / name / "runs" / "metrics.jsonl").read_text()
                      .splitlines() if json.loads(x)["type"] == "epoch"]
        if name != "one":
            assert f"global batch 8 = 2 processes x batch 4 x 1 accumulated ({name.upper().replace('TWO', 'DDP')})" \
                in out.stdout
    assert logs["two"] == logs["one"] == logs["fsdp"] and len(logs["one"]) == 2
    for split in ("dev", "test"):
        name = f"full-model-sst-{split}-out.csv"
        for run in ("two", "fsdp"):
            assert (tmp_path / run / "pred" / name).read_text() == (tmp_path / "one" / "pred" / name).read_text()


FAILING = """
import sys, torch
sys.path.insert(0, {root!r})
from engine import distributed, ranks
distributed.setup(torch.device("cpu"))
if ranks.rank() == 1:
    raise RuntimeError("rank 1 fails on purpose")
ranks.barrier()  # rank 0 would wait here for ever without the job's teardown or the timeout
"""


def test_failing_rank_ends_the_job(tmp_path):
    """One rank raises: the whole job exits non-zero within seconds, with that rank's error."""
    script = tmp_path / "fail.py"
    script.write_text(FAILING.format(root=str(ROOT)))
    start = time.monotonic()
    out = subprocess.run([*TORCHRUN, str(free_port()), str(script)], env={**os.environ, "GPT2_DIST_TIMEOUT": "30",
                         "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "rank 1 fails on purpose" in out.stderr
    assert time.monotonic() - start < 60
