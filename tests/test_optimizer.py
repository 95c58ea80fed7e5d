"""The readable AdamW (``optimizer.AdamW``) and the multi-tensor one the Trainer uses
(``engine.fast_adamw.FastAdamW``) give the same parameters and moments bit for bit, and both
match the course's reference weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine import fast_adamw
from engine.fast_adamw import FastAdamW
from optimizer import AdamW
from optimizer_test import REFERENCE, run_optimizer

SHAPES = [(37, 11), (5,), (300,), (8, 9), (1,)]


def train(opt_class: type[AdamW], block: int | None = None, steps: int = 4, **kw) -> list[torch.Tensor]:
    """Parameters and both moments after ``steps`` steps on fixed gradients (one of them not
    contiguous), with FastAdamW's CPU slices of ``block`` elements."""
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(s, generator=g) for s in SHAPES]
    grads = [[torch.randn(s, generator=g) for s in SHAPES] for _ in range(steps)]
    grads[1][3] = torch.randn(9, 8, generator=g).t()  # non-contiguous gradient
    params = [torch.nn.Parameter(b.clone()) for b in base]
    opt = opt_class(params, lr=1e-2, **kw)
    old, fast_adamw.FOREACH_BLOCK = fast_adamw.FOREACH_BLOCK, block or fast_adamw.FOREACH_BLOCK
    try:
        for step in grads:
            for p, gr in zip(params, step):
                p.grad = gr.clone() if gr.is_contiguous() else gr
            opt.step()
    finally:
        fast_adamw.FOREACH_BLOCK = old
    return [p.detach() for p in params] + [opt.state[p][k] for p in params for k in ("exp_avg", "exp_avg_sq")]


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("correct_bias", [True, False])
def test_fast_adamw_equals_the_readable_loop_bit_for_bit(weight_decay, correct_bias) -> None:
    """Blocks of 64 elements split tensors across blocks and let small ones share one; 1 << 18
    holds them all; the last case is the real default."""
    loop = train(AdamW, weight_decay=weight_decay, correct_bias=correct_bias)
    for block in (64, 1 << 18, None):
        fast = train(FastAdamW, block, weight_decay=weight_decay, correct_bias=correct_bias)
        for a, b in zip(loop, fast):
            assert torch.equal(a, b)


def test_a_parameter_added_later_keeps_its_own_step_count() -> None:
    """Steps are counted per parameter: a group with parameters at different steps updates each
    with its own bias correction, in both classes alike."""
    results = []
    for opt_class in (AdamW, FastAdamW):
        torch.manual_seed(0)
        a, b = torch.nn.Parameter(torch.randn(6)), torch.nn.Parameter(torch.randn(4))
        opt = opt_class([a, b], lr=0.1, weight_decay=0.01)
        a.grad = torch.randn(6)
        opt.step()  # b has no gradient yet
        a.grad, b.grad = torch.randn(6), torch.randn(4)
        opt.step()
        assert (opt.state[a]["step"], opt.state[b]["step"]) == (2, 1)
        results.append((a.detach().clone(), b.detach().clone()))
    assert all(torch.equal(x, y) for x, y in zip(*results))


def test_fast_adamw_matches_the_course_reference() -> None:
    ref = torch.tensor(np.load(REFERENCE))
    actual = run_optimizer(FastAdamW)
    assert torch.allclose(ref, actual, atol=1e-6, rtol=1e-4), f"FastAdamW mismatch:\nref\n{ref}\nactual\n{actual}"


def test_foreach_false_runs_the_loop() -> None:
    loop = train(AdamW, weight_decay=0.1)
    assert all(torch.equal(a, b) for a, b in zip(loop, train(FastAdamW, 64, weight_decay=0.1, foreach=False)))
