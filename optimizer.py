"""AdamW written by hand, with the course's semantics.

Adam moments, bias correction folded into the step size (Kingma & Ba, section 2,
"efficient version"), and decoupled weight decay (Loshchilov & Hutter):
``p -= lr * weight_decay * p`` applied after the Adam update, independent of the
gradient. ``correct_bias=False`` skips the bias correction (as BERT's original
optimizer did).

This readable loop, one parameter at a time, is what ``AdamW`` runs. The training engine
trains with ``engine.fast_adamw.FastAdamW``, a subclass that does the same arithmetic on
lists of tensors at once and gives the same numbers bit for bit (a test holds it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer


class AdamW(Optimizer):
    """``foreach`` is accepted as ``torch.optim`` optimizers accept it, as a choice of
    implementation that does not change the numbers: this class has only the loop; the
    multi-tensor variant ``engine.fast_adamw.FastAdamW`` runs unless it is False."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        foreach: bool | None = None,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr} - should be >= 0.0")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter: {betas[0]} - should be in [0.0, 1.0)")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter: {betas[1]} - should be in [0.0, 1.0)")
        if eps < 0.0:
            raise ValueError(f"Invalid epsilon value: {eps} - should be >= 0.0")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay} - should be >= 0.0")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
                        foreach=foreach)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self.update_group(group)
        return loss

    def update_group(self, group: dict[str, Any]) -> None:
        """One AdamW step for every parameter of ``group`` that has a gradient."""
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            grad = p.grad
            state = self.count_step(p)
            m, v = state["exp_avg"], state["exp_avg_sq"]
            m.mul_(beta1).add_(grad, alpha=1.0 - beta1)  # first moment
            v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)  # second moment
            p.addcdiv_(m, v.sqrt() + group["eps"], value=-self.step_size(group, state["step"]))
            if group["weight_decay"] > 0.0:  # decoupled: after the Adam update, not through the gradient
                p.add_(p, alpha=-group["lr"] * group["weight_decay"])

    def count_step(self, p: torch.Tensor) -> dict[str, Any]:
        """``p``'s state with this step counted; both moments start at zero on its first step."""
        if p.grad.is_sparse:
            raise RuntimeError("AdamW does not support sparse gradients")
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        return state

    @staticmethod
    def step_size(group: dict[str, Any], t: int) -> float:
        """The learning rate at step ``t``, with both moments' bias corrections folded in."""
        beta1, beta2 = group["betas"]
        if group["correct_bias"]:
            return group["lr"] * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
        return group["lr"]
