"""LoRA (Hu et al. 2021) by composition, in the shape of PEFT's ``lora/layer.py``.

A ``LoRALinear`` wraps a frozen ``nn.Linear`` and adds ``scaling * B(A(dropout(x)))``
with ``A`` Kaiming-uniform and ``B`` zero, so a freshly wrapped model computes exactly
what the base model does. ``merge()`` folds ``scaling * B @ A`` into the base weight
for inference at no extra cost; ``unmerge()`` takes it back out.

DoRA (Liu et al. 2024, ``use_dora=True``) splits the adapted weight into a magnitude and a
direction, ``W' = m * (W + scaling * B A) / ||W + scaling * B A||_c``, with the norm taken per
output row and ``m`` (``lora_magnitude``) initialised to the row norms of ``W``, so a fresh wrap
is again the base model. As in PEFT (and section 4.3 of the paper) the norm is treated as a
constant in the backward pass, which saves memory and matches PEFT's gradients.

Wrapping moves a base weight from ``...c_attn.weight`` to ``...c_attn.base.weight``;
checkpoints of a LoRA run hold only the trainable parameters (the adapters, DoRA's magnitudes
and the task head: ``engine.checkpoints.trainable_state_dict``), to be loaded on top of the
same base model. ``unwrap_lora`` merges and removes the wrappers, so a saved final model is
a plain GPT-2. The adapter settings and the ``lora`` fine-tune mode are in
``methods.fine_tune``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from errors import InputError
from methods.qlora import base_layer_for, float_linear

DEFAULT_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


class LoraTargetError(InputError, ValueError):
    """``--lora_targets`` naming no linear layer: a bad flag (one ``error:`` line), not a bug."""


class LoRALinear(nn.Module):
    def __init__(
        self, base: nn.Linear, r: int = 8, alpha: float = 16.0, dropout: float = 0.0, use_dora: bool = False
    ) -> None:
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
        self.use_dora = use_dora
        if use_dora:  # (out,): the row norms of W, so that m * W / ||W||_c == W at the start
            self.lora_magnitude = nn.Parameter(self.weight_norm().detach().clone())
        self._merge_norm: torch.Tensor | None = None  # DoRA: the norm merge() divided by, for unmerge()
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

    def weight_norm(self) -> torch.Tensor:
        """DoRA's ``||W + scaling * B A||_c``: one L2 norm per output row, over the input dimension,
        of the unmerged adapted weight; no gradient flows through it (PEFT, DoRA section 4.3)."""
        with torch.no_grad():
            w = self.base.weight + self.delta_weight().to(self.base.weight.dtype)  # (out, in)
            return torch.linalg.norm(w, dim=1).to(w.dtype)  # (out,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., out)
        if self.merged:
            return y
        xd = self.lora_dropout(x)
        # (..., in) -> (..., r) -> (..., out)
        lora = (xd @ self.lora_A.t() @ self.lora_B.t()) * self.scaling
        if not self.use_dora:
            return y + lora
        scale = self.lora_magnitude / self.weight_norm()  # (out,)
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            wx = y if self.base.bias is None else y - self.base.bias  # (..., out): W x
        else:  # dropout applies to the direction's input, as in PEFT
            wx = F.linear(xd, self.base.weight)
        # y + (m/n - 1) W x + (m/n) scaling B A x  ==  (m/n) (W + scaling B A) x + bias without dropout
        return y + (scale - 1) * wx + scale * lora

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        if not isinstance(self.base, nn.Linear):  # an int8 base: its weight is computed, not stored
            raise TypeError(f"cannot merge adapters into a {type(self.base).__name__} base; "
                            "keep them separate, or train on a float base to merge")
        w = self.base.weight
        if self.use_dora:
            self._merge_norm = self.weight_norm()  # of the unmerged weight, kept so unmerge() inverts exactly
            factor = (self.lora_magnitude / self._merge_norm).view(-1, 1)  # (out, 1)
            w.copy_((factor * (w + self.delta_weight())).to(w.dtype))
        else:
            w += self.delta_weight().to(w.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        w = self.base.weight
        if self.use_dora:
            factor = (self.lora_magnitude / self._merge_norm).view(-1, 1)  # (out, 1)
            w.copy_((w / factor - self.delta_weight()).to(w.dtype))
            self._merge_norm = None
        else:
            w -= self.delta_weight().to(w.dtype)
        self.merged = False

    def folded(self) -> nn.Linear:
        """The base linear with the adapter merged in: the protocol ``decoding.inference.fold_adapters``
        uses to give decoding plain weights. A quantised base (QLoRA) is dequantised first."""
        if not isinstance(self.base, nn.Linear):
            self.base = float_linear(self.base)
        self.merge()
        return self.base

    def extra_repr(self) -> str:
        dora = ", use_dora=True" if self.use_dora else ""
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}{dora}, merged={self.merged}"


def apply_lora(
    model: nn.Module,
    targets: Sequence[str] = DEFAULT_TARGETS,
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    use_dora: bool = False,
    base_layer: Callable[[nn.Linear], nn.Module] | None = None,
    quantize_base: str = "none",
) -> list[str]:
    """Replace, in place, every ``nn.Linear`` whose qualified name ends with one of ``targets``
    (e.g. ``attn.c_attn`` matches ``gpt.h.3.attn.c_attn``) by a LoRALinear (DoRA with
    ``use_dora``); returns the names. ``base_layer``: each base linear is first replaced by
    ``base_layer(linear)``, e.g. ``decoding.quant.Int8Linear.from_linear``, a frozen int8 base
    (QLoRA's idea with int8) under adapters that stay in float; ``quantize_base`` (``int8``, ``int4``)
    names such a base (``methods.qlora``).
    Raises if nothing matched, so a typo in ``--lora_targets`` cannot silently train only the head."""
    targets = tuple(targets)
    base_layer = base_layer or base_layer_for(quantize_base)
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in targets)]
    if not names:
        linear = sorted({n.split(".")[-2] + "." + n.split(".")[-1] for n, m in model.named_modules()
                         if isinstance(m, nn.Linear) and n.count(".")})
        raise LoraTargetError(f"no nn.Linear matches --lora_targets {','.join(targets)}; the model's linear "
                              f"layers: {', '.join(linear)}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        if base_layer is not None:
            base = base_layer(base)
        setattr(parent, child, LoRALinear(base, r=r, alpha=alpha, dropout=dropout, use_dora=use_dora))
    return names


def lora_modules(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def unwrap_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight and put the plain ``nn.Linear`` back, so the
    model (and what is saved of it) is an ordinary GPT-2 that needs no adapter code to load."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, m.folded())


def _is_extra(name: str, extra: Iterable[str]) -> bool:
    return any(name == e or name.startswith(e + ".") for e in extra)


def mark_only_lora_trainable(model: nn.Module, extra_trainable: Iterable[str] = ()) -> int:
    """Freeze everything except the adapters (``lora_A``, ``lora_B``, DoRA's ``lora_magnitude``)
    and the modules named in ``extra_trainable`` (prefixes such as ``"classifier"``); returns the
    number of trainable parameters."""
    extra = tuple(extra_trainable)
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad = "lora_" in name.rsplit(".", 1)[-1] or _is_extra(name, extra)
        n += p.numel() if p.requires_grad else 0
    return n
