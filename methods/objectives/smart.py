"""SMART (Jiang, He, Chen, Liu, Gao and Zhao 2020, "SMART: Robust and Efficient Fine-Tuning
for Pre-trained Natural Language Models through Principled Regularized Optimization", ACL):
the task loss plus two regularisers,

    F(theta) = L(theta) + lambda_s R_s(theta) + mu D_Breg(theta, theta~)

- smoothness-inducing adversarial regularisation (their Algorithm 1, lines 6-10):
  R_s = mean_i max_{||x~_i - x_i||_inf <= eps} l_s(f(x~_i; theta), f(x_i; theta)), with l_s the
  symmetric KL. The max is approximated by projected gradient ascent on the input embeddings:
  start from x + N(0, sigma^2 I), then ``steps`` times take a step of size eta along the gradient
  normalised by its inf-norm and project back onto the eps-ball (the inf-norm ball, so the
  projection is a clamp). Only the word embeddings of real tokens are perturbed.
- Bregman proximal point (line 14): D_Breg = mean_i l_s(f(x_i; theta), f(x_i; theta~)) against
  a momentum copy theta~ <- beta theta~ + (1 - beta) theta, updated after every optimizer step
  (the paper's S = 1), which keeps each step close to where the model just was.

The perturbation goes in through a forward hook on the body's token embedding (``wte``), so
any head built on ``models.gpt2.GPT2Model`` works unchanged (the model is not edited). The
teacher keeps copies of the trainable parameters only (LoRA adapters and head, or all of them)
and swaps them in for its forward pass, so a frozen body is never duplicated.

Defaults: the paper used eps = 1e-5, sigma = 1e-5, eta = 1e-3, one ascent step, lambda_s in
{1, 3, 5}, mu = 1 and beta = 0.99 on BERT and RoBERTa. The useful radius depends on the scale of
the embeddings it perturbs (the term grows roughly as eps^2), so ``--smart_epsilon`` defaults to
1e-3, reached in one ascent step of eta = 1e-3, and is worth tuning per model.

Differences from the paper, on purpose: the teacher predicts without dropout (a fixed target);
the teacher is not saved in checkpoints, so after ``--resume`` it restarts from the resumed
weights. The reference code (namisan/mt-dnn) rescales the perturbation to unit inf-norm per
token instead of projecting onto the eps-ball; this follows the paper's algorithm.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from methods.objectives.rdrop import symmetric_kl
from models.gpt2 import GPT2Model

LogitsFn = Callable[[nn.Module, Any], torch.Tensor]


def find_body(model: nn.Module) -> GPT2Model:
    """The GPT-2 body of a task model (the model itself, or its first GPT2Model submodule)."""
    for m in model.modules():
        if isinstance(m, GPT2Model):
            return m
    raise TypeError(f"{type(model).__name__} has no models.gpt2.GPT2Model inside; SMART perturbs its embeddings")


@contextlib.contextmanager
def perturbed_embeddings(model: nn.Module, delta: torch.Tensor) -> Iterator[None]:
    """Within the block, the body's token embeddings come out as ``wte(input_ids) + delta``
    (delta (B, T, d), the shape of the batch the block runs). A block in which the embedding
    module's hooks never ran raises (a compiled forward may skip hooks added after compilation),
    since SMART would otherwise regularise nothing without a word."""
    fired = []

    def add_delta(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if output.shape != delta.shape:
            raise ValueError(f"perturbation of shape {tuple(delta.shape)} for embeddings of shape "
                             f"{tuple(output.shape)}")
        fired.append(True)
        return output + delta.to(output.dtype)

    handle = find_body(model).wte.register_forward_hook(add_delta)
    try:
        yield
    finally:
        handle.remove()
    if not fired:
        raise RuntimeError("SMART could not perturb the embeddings: the body's token embedding module was not "
                           "called through its hooks (a compiled model may skip hooks added later); run SMART without "
                           "--compile")


def adversarial_perturbation(
    model: nn.Module,
    batch: Any,
    logits_fn: LogitsFn,
    clean_logits: torch.Tensor,
    attention_mask: torch.Tensor,
    epsilon: float,
    steps: int = 1,
    step_size: float = 1e-3,
    noise_std: float = 1e-5,
) -> torch.Tensor:
    """The (B, T, d) perturbation delta of the token embeddings, ||delta_i||_inf <= epsilon for
    each example, that (approximately) maximises the symmetric KL from ``clean_logits`` (held
    fixed). Returned detached: the regulariser differentiates through the model, not delta."""
    body = find_body(model)
    B, T = attention_mask.shape
    real = attention_mask.to(body.wte.weight.dtype).unsqueeze(-1)  # (B, T, 1)
    delta = (torch.randn(B, T, body.config.hidden_size, device=real.device) * noise_std * real)
    delta = delta.clamp(-epsilon, epsilon)
    target = clean_logits.detach()
    for _ in range(steps):
        delta.requires_grad_(True)
        with perturbed_embeddings(model, delta):
            loss = symmetric_kl(logits_fn(model, batch), target)
        (grad,) = torch.autograd.grad(loss, delta)
        grad = grad * real
        scale = grad.abs().amax(dim=(1, 2), keepdim=True)  # (B, 1, 1) per-example inf-norm
        if not torch.isfinite(scale).all():
            break  # an overflow in the ascent: keep the last finite perturbation
        step = grad / scale.clamp(min=1e-12)
        delta = (delta.detach() + step_size * step).clamp(-epsilon, epsilon)
    return delta.detach()


def smoothness_loss(
    model: nn.Module, batch: Any, logits_fn: LogitsFn, clean_logits: torch.Tensor, delta: torch.Tensor
) -> torch.Tensor:
    """R_s at the perturbation ``delta`` (from ``adversarial_perturbation``): the symmetric KL between
    the predictions at the perturbed embeddings and the clean ones, gradients through both.
    Exactly zero for a zero ``delta`` (epsilon 0) without dropout."""
    with perturbed_embeddings(model, delta):
        adv_logits = logits_fn(model, batch)
    return symmetric_kl(adv_logits, clean_logits)


class MomentumTeacher:
    """theta~, the momentum (EMA) copy of a model's trainable parameters for SMART's Bregman
    proximal point term. ``update`` after each optimizer step; ``logits`` runs the model with
    the copies in place of the live parameters, in eval mode and without gradients."""

    def __init__(self, model: nn.Module, momentum: float = 0.99) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """theta~ <- beta theta~ + (1 - beta) theta."""
        live = dict(model.named_parameters())
        for name, ema in self.params.items():
            ema.lerp_(live[name].detach(), 1.0 - self.momentum)

    @torch.no_grad()
    def logits(self, model: nn.Module, batch: Any, logits_fn: LogitsFn) -> torch.Tensor:
        """``logits_fn(model, batch)`` with theta~ in place of the trainable parameters (swapped
        in and back, so any method of the model works, not only ``forward``), in eval mode."""
        live = dict(model.named_parameters())
        saved = {n: live[n].data for n in self.params}
        was_training = model.training
        model.eval()
        try:
            for n, ema in self.params.items():
                live[n].data = ema
            return logits_fn(model, batch)
        finally:
            for n, t in saved.items():
                live[n].data = t
            model.train(was_training)


def proximal_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """D_Breg: symmetric KL between the student's predictions and the momentum teacher's (fixed)."""
    return symmetric_kl(student_logits, teacher_logits.detach())
