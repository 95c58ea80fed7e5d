"""R-Drop (Liang et al. 2021, "R-Drop: Regularized Dropout for Neural Networks", NeurIPS):
run each batch through the model twice, so that dropout samples two sub-models, and add the
symmetric KL divergence between their predictive distributions to the task loss:

    L = 1/2 (CE(p1, y) + CE(p2, y)) + alpha * 1/2 (KL(p1 || p2) + KL(p2 || p1))

(the paper writes the sum of the two cross-entropies, the same objective at twice the
scale; the usage example in the authors' repository sums the KL over the batch, which ties
alpha to the batch size, where here it is a mean over examples). Without dropout (eval mode
or p = 0) the two passes agree and the term is exactly zero: R-Drop only acts through the
randomness it regularises.

``symmetric_kl`` (the sum of both directions, Jeffreys' divergence) is also SMART's
smoothness loss, so both objectives share it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def kl_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """Batch-mean KL(P || Q) between the softmax distributions of (..., C) logits, in float32."""
    log_p = F.log_softmax(logits_p.float(), dim=-1)
    log_q = F.log_softmax(logits_q.float(), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (...,)
    return kl.mean()


def symmetric_kl(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """KL(A || B) + KL(B || A), batch mean: zero exactly when the two distributions agree, and
    gradients flow into both arguments (detach one to treat it as a fixed target)."""
    return kl_divergence(logits_a, logits_b) + kl_divergence(logits_b, logits_a)


def rdrop_loss(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """R-Drop's regulariser: the mean of the two KL directions between two dropout passes."""
    return 0.5 * symmetric_kl(logits_a, logits_b)


def two_passes(
    model: nn.Module, batch: Any, logits_fn: Callable[[nn.Module, Any], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of two forward passes of the same batch. In train mode each pass draws its
    own dropout masks from the torch RNG, which is what R-Drop needs; in eval mode they agree."""
    return logits_fn(model, batch), logits_fn(model, batch)
