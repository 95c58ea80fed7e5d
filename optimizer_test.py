"""Graders' check of the hand-written AdamW against reference weights.

Runnable as ``python optimizer_test.py`` (the course's entry point) and
collected by pytest. The reference ``optimizer_test.npy`` holds the weights of
a Linear(3, 2) after 1000 steps (lr 1e-3, weight decay 1e-4, bias correction).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from optimizer import AdamW

SEED = 0
REFERENCE = Path(__file__).resolve().parent / "optimizer_test.npy"


def run_optimizer(opt_class=AdamW, **opt_kwargs) -> torch.Tensor:
    rng = np.random.default_rng(SEED)
    torch.manual_seed(SEED)
    model = torch.nn.Linear(3, 2, bias=False)
    opt = opt_class(model.parameters(), lr=1e-3, weight_decay=1e-4, correct_bias=True, **opt_kwargs)
    for _ in range(1000):
        opt.zero_grad()
        x = torch.FloatTensor(rng.uniform(size=[model.in_features]))
        y_hat = model(x)
        y = torch.Tensor([x[0] + x[1], -x[2]])
        loss = ((y - y_hat) ** 2).sum()
        loss.backward()
        opt.step()
    return model.weight.detach()


def test_optimizer() -> None:
    ref = torch.tensor(np.load(REFERENCE))
    actual = run_optimizer(AdamW)
    assert torch.allclose(ref, actual, atol=1e-6, rtol=1e-4), f"AdamW mismatch:\nref\n{ref}\nactual\n{actual}"


def test_optimizer_foreach_path() -> None:
    ref = torch.tensor(np.load(REFERENCE))
    actual = run_optimizer(AdamW, foreach=True)
    assert torch.allclose(ref, actual, atol=1e-6, rtol=1e-4), f"AdamW (foreach) mismatch:\nref\n{ref}\nactual\n{actual}"


if __name__ == "__main__":
    test_optimizer()
    test_optimizer_foreach_path()
    print("Optimizer test passed!")
