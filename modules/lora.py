"""LoRA (Hu et al. 2021) by composition, in the shape of PEFT's ``lora/layer.py``.

A ``LoRALinear`` wraps a frozen ``nn.Linear`` and adds ``scaling * B(A(dropout(x)))``
with ``A`` Kaiming-uniform and ``B`` zero, so a freshly wrapped model computes exactly
what the base model does. ``merge()`` folds ``scaling * B @ A`` into the base weight
for inference at no extra cost; ``unmerge()`` takes it back out.

Wrapping moves a base weight from ``...c_attn.weight`` to ``...c_attn.base.weight``;
checkpoints of a LoRA run hold only the adapters and the task head
(``lora_state_dict``), to be loaded on top of the same base model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

DEFAULT_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> None:
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        self.base = base
        self.r = r
        self.alpha = alpha
        self.scaling = alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and PEFT
        self.merged = False

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., out)
        if self.merged:
            return y
        # (..., in) -> (..., r) -> (..., out)
        return y + (self.lora_dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"


def apply_lora(
    model: nn.Module,
    targets: Sequence[str] = DEFAULT_TARGETS,
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
) -> list[str]:
    """Replace, in place, every ``nn.Linear`` whose qualified name ends with one of ``targets``
    (e.g. ``attn.c_attn`` matches ``gpt.h.3.attn.c_attn``) by a LoRALinear; returns the names.
    Raises if nothing matched, so a typo in ``--lora_targets`` cannot silently train only the head."""
    targets = tuple(targets)
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)]
    if not names:
        linear = sorted({n.split(".")[-2] + "." + n.split(".")[-1] for n, m in model.named_modules()
                         if isinstance(m, nn.Linear) and n.count(".")})
        raise ValueError(f"no nn.Linear matches LoRA targets {targets}; candidates: {linear}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), r=r, alpha=alpha, dropout=dropout))
    return names


def lora_modules(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (faster inference; the outputs do not change)."""
    for m in lora_modules(model):
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in lora_modules(model):
        m.unmerge()


def unwrap_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight and put the plain ``nn.Linear`` back, so the
    model (and what is saved of it) is an ordinary GPT-2 that needs no adapter code to load."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            m.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, m.base)


def _is_extra(name: str, extra: Iterable[str]) -> bool:
    return any(name == e or name.startswith(e + ".") for e in extra)


def mark_only_lora_trainable(model: nn.Module, extra_trainable: Iterable[str] = ()) -> int:
    """Freeze everything except the adapters and the modules named in ``extra_trainable``
    (prefixes such as ``"classifier"``); returns the number of trainable parameters."""
    extra = tuple(extra_trainable)
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name.rsplit(".", 1)[-1] or _is_extra(name, extra)
        n += p.numel() if p.requires_grad else 0
    return n


def lora_state_dict(model: nn.Module, extra: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """Only the adapters (and the ``extra`` prefixed modules): what a LoRA run saves."""
    extra = tuple(extra)
    return {k: v for k, v in model.state_dict().items()
            if "lora_" in k.rsplit(".", 1)[-1] or _is_extra(k, extra)}
