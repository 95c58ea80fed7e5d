"""The training objectives (and DPO) on more than one process (CPU, Gloo, 2 ranks): each under DDP and FSDP
has the gradients of one process with the whole batch, or is refused (SMART under FSDP:
``cli.validation.check_objectives``). Run with tests/test_distributed.py's two-rank harness."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
from torch.distributed.tensor import DTensor

from engine import distributed, ranks
from engine.strategy import SingleProcess
from methods.dpo import frozen_reference, make_dpo_loss_fn
from methods.objectives import ObjectiveSettings
from methods.objectives.combined import Objective, build_objective
from tests.test_distributed import join, save_on_main, spawn
from tests.test_dpo import tiny_sonnet_model
from tests.test_objectives import batch as objective_batch
from tests.test_objectives import logits_fn as objective_logits
from tests.test_objectives import tiny_classifier

SPLIT = 3  # rank 0 takes rows [0, 3) of the 8, rank 1 the other 5: uneven, as a short last batch
OBJECTIVES = {  # SMART without its initial noise (each rank would draw its own); not under FSDP (refused)
    "simcse": dict(contrastive_weight=1.0),
    "pairs": dict(contrastive_weight=1.0, contrastive_supervised=True),
    "rdrop": dict(rdrop_alpha=1.0),
    "smart": dict(smart_weight=1.0, smart_epsilon=0.01, smart_noise_std=0.0, smart_proximal_weight=1.0),
}
OBJECTIVES["dpo"] = {}  # against its frozen reference, on preference pairs
RUNS = [(name, gathered, fsdp) for name in OBJECTIVES for gathered in (True, False) for fsdp in (False, True)
        if (gathered or name in ("simcse", "pairs")) and not (fsdp and (name == "smart" or not gathered))]


def objective_case(name: str) -> tuple[torch.nn.Module, Callable, dict[str, torch.Tensor]]:
    """A dropout-free tiny model, the objective ``name`` and an 8-row batch (with the two
    questions of each pair for the supervised SimCSE, 8 preference pairs for DPO)."""
    if name == "dpo":
        model, g = tiny_sonnet_model(0), torch.Generator().manual_seed(2)
        b = {f"{side}_{k}": v for side in ("chosen", "rejected") for k, v in (
            ("input_ids", torch.randint(0, 1000, (8, 6), generator=g)), ("attention_mask", torch.ones(8, 6)),
            ("completion_mask", torch.tensor([0, 0, 1, 1, 1, 1]).expand(8, 6)))}
        return model, make_dpo_loss_fn(frozen_reference(model), beta=0.5), b
    model = tiny_classifier(dropout=0.0)
    b = objective_batch(B=8)
    if name == "pairs":
        b = {**b, "sentence1_input_ids": b["input_ids"], "sentence1_attention_mask": b["attention_mask"],
             "sentence2_input_ids": b["input_ids"].roll(1, 1), "sentence2_attention_mask": b["attention_mask"],
             "labels": torch.tensor([1, 0, 2, 1, 0, 0, 2, 1])}
    return model, build_objective(ObjectiveSettings(**OBJECTIVES[name]), objective_logits), b


def grads_and_terms(model: torch.nn.Module, objective: Callable) -> dict[str, torch.Tensor]:
    """The gradients (gathered whole from FSDP's shards: collective) and the global batch's terms
    (the others are means over a rank's own rows)."""
    out = {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).detach().clone()
           for n, p in model.named_parameters() if p.grad is not None}
    terms = getattr(objective, "last_terms", {})
    return {**out, **{f"term.{k}": v for k, v in terms.items() if k == "contrastive"}}


def objectives_worker(rank: int, world: int, port: int, tmp: Path) -> None:
    """Each rank: its rows of the batch through DDP or FSDP, weighted as the Trainer weighs them;
    the gradients after their reduction, with the Trainer's callback (the strategy's gather, SMART's
    teacher) or, for SimCSE, without it (the objective before the fix)."""
    join(rank, world, port)
    rows = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
    for name, gathered, fsdp in RUNS:
        model, objective, b = objective_case(name)
        strategy = distributed.strategy(torch.device("cpu"), fsdp)
        wrapped = strategy.wrap(model)
        if gathered and isinstance(objective, Objective):
            objective.on_train_begin(SimpleNamespace(strategy=strategy, model=model))
        mine = {k: v[rows] for k, v in b.items()}
        loss = wrapped(objective, mine)
        (loss * len(next(iter(mine.values()))) * world / 8).backward()
        save_on_main(grads_and_terms(model, objective), tmp / f"{name}-{gathered}-{fsdp}.pt")
    ranks.barrier()
    ranks.teardown()


def test_objectives_under_ddp_and_fsdp_equal_one_process_with_the_whole_batch(tmp_path):
    """Issue 25, bug 3 and the objectives' promise: SimCSE (unsupervised and on pairs), R-Drop,
    SMART and DPO under DDP, and all but SMART (refused) under FSDP, the batch split unevenly over 2
    ranks, have the gradients (and SimCSE its loss) of one process with the whole batch. Without
    the gather (SimCSE before the fix) each rank's negatives were its own rows only, and the
    gradients differ."""
    spawn(objectives_worker, tmp_path)
    for name in OBJECTIVES:
        model, objective, b = objective_case(name)
        if isinstance(objective, Objective):
            objective.on_train_begin(SimpleNamespace(strategy=SingleProcess(torch.device("cpu")), model=model))
        objective(model, b).backward()
        one = grads_and_terms(model, objective)
        for _, gathered, fsdp in (r for r in RUNS if r[0] == name):
            two = torch.load(tmp_path / f"{name}-{gathered}-{fsdp}.pt")
            assert set(two) == set(one)
            close = [torch.allclose(two[k], one[k], rtol=1e-5, atol=1e-6) for k in one]
            assert all(close) == gathered, (name, gathered, fsdp, [k for k, c in zip(one, close) if not c])
