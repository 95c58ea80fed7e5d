"""Training objectives any classification task can add to its loss, each opted into, off by default:

- ``rdrop``: R-Drop (Liang et al. 2021), symmetric KL between two dropout passes;
- ``contrastive``: SimCSE-style InfoNCE (Gao et al. 2021), unsupervised or on paraphrase pairs;
- ``smart``: SMART (Jiang et al. 2020), adversarial smoothness on the embeddings and a Bregman
  proximal point term against a momentum teacher;
- ``hard_negatives``: SimCSE hard negatives for paraphrase pairs, mined by word overlap;
- ``combined``: the wrapper (``build_objective``) that adds every term asked for to a task's loss.

This file holds only what a task needs to know without loading any of them: the settings
(``ObjectiveSettings``, whose ``enabled`` says whether any term is asked for) and the default
task loss. A run with every term off trains on its plain loss and never imports the modules
above; the sentence pooling they share is ``models.heads.pool``, beside the head that also uses it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.heads import POOLINGS

HARD_KEY = "hard_negative_input_ids"  # a pair's mined SimCSE hard negative (``hard_negatives``, ``contrastive``)
LogitsFn = Callable[[nn.Module, Any], torch.Tensor]  # a task's (model, batch) -> (B, C) logits
TaskLoss = Callable[[torch.Tensor, Any], torch.Tensor]  # a task's (logits, batch) -> loss


@dataclass(frozen=True)
class ObjectiveSettings:
    """The objectives' settings (``cli.common.add_objective_args`` has their flags); every
    weight 0 (off) by default. ``pooling`` is the sentence representation, which the classifier
    head uses too, so it is read whether or not an objective is on."""

    rdrop_alpha: float = 0.0
    contrastive_weight: float = 0.0
    contrastive_temperature: float = 0.05
    contrastive_supervised: bool = False
    smart_weight: float = 0.0
    smart_epsilon: float = 1e-3
    smart_steps: int = 1
    smart_step_size: float = 1e-3
    smart_noise_std: float = 1e-5
    smart_proximal_weight: float = 0.0
    smart_momentum: float = 0.99
    pooling: str = "last"

    def __post_init__(self) -> None:
        for name in ("rdrop_alpha", "contrastive_weight", "smart_weight", "smart_epsilon", "smart_step_size",
                     "smart_noise_std", "smart_proximal_weight", "smart_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.contrastive_temperature <= 0:
            raise ValueError(f"contrastive_temperature must be > 0, got {self.contrastive_temperature}")
        if not 0.0 <= self.smart_momentum < 1.0:
            raise ValueError(f"smart_momentum must be in [0, 1), got {self.smart_momentum}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")

    @property
    def enabled(self) -> bool:
        """Whether any term is asked for (a weight above 0), or the paraphrase pairs' views are
        (``contrastive_supervised`` changes the training batches). Otherwise the objective would
        be exactly the task loss of one forward pass, so a task trains on that directly."""
        weights = (self.rdrop_alpha, self.contrastive_weight, self.smart_weight, self.smart_proximal_weight)
        return any(w > 0 for w in weights) or self.contrastive_supervised


def cross_entropy_loss(logits: torch.Tensor, batch: Any) -> torch.Tensor:
    """The default task loss: cross-entropy of ``batch["labels"]``."""
    return F.cross_entropy(logits.float(), batch["labels"])


__all__ = ["HARD_KEY", "LogitsFn", "ObjectiveSettings", "TaskLoss", "cross_entropy_loss"]
