"""Model configuration: one dataclass and the named GPT-2 sizes.

Field names follow the course starter (``hidden_size``, ``num_hidden_layers``...)
so that students recognise them; ``models.loading`` is the only place that maps
them to Hugging Face's ``n_embd``/``n_layer`` names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass
class GPT2Config:
    """The architecture only: what a checkpoint's weights need, and which of two equal ways
    computes attention. A method that changes a built model (``methods``) keeps its own settings."""

    vocab_size: int = 50257
    max_position_embeddings: int = 1024
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int | None = None  # None -> 4 * hidden_size
    hidden_dropout_prob: float = 0.1  # embedding and residual dropout
    attention_probs_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    # "sdpa": torch.nn.functional.scaled_dot_product_attention; "eager": explicit
    # softmax(QK^T)V, same numbers, useful for reading and debugging.
    attn_impl: str = "sdpa"

    def __post_init__(self) -> None:
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.attn_impl not in ("sdpa", "eager"):
            raise ValueError(f"attn_impl must be 'sdpa' or 'eager', got {self.attn_impl!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def num_parameters(self, include_embeddings: bool = True) -> int:
        """Parameter count of GPT2Model with this config (tied LM head counted once)."""
        d, L, f = self.hidden_size, self.num_hidden_layers, self.intermediate_size
        per_layer = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)
        emb = self.vocab_size * d + self.max_position_embeddings * d
        return L * per_layer + 2 * d + (emb if include_embeddings else 0)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPT2Config:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GPT2Config fields: {unknown}")
        return cls(**d)

    def architecture(self) -> dict[str, Any]:
        """The fields that decide parameter shapes: two configs that differ here
        cannot share a checkpoint."""
        return {
            k: getattr(self, k)
            for k in (
                "vocab_size",
                "max_position_embeddings",
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "intermediate_size",
            )
        }


# name -> (hidden_size, num_hidden_layers, num_attention_heads)
SIZES: dict[str, tuple[int, int, int]] = {
    "gpt2": (768, 12, 12),  # 124M
    "gpt2-medium": (1024, 24, 16),  # 355M
    "gpt2-large": (1280, 36, 20),  # 774M
    "gpt2-xl": (1600, 48, 25),  # 1.5B
    "tiny": (128, 2, 4),  # tests and offline smoke runs (6.96M, mostly embeddings)
}


def get_config(name: str, **overrides: Any) -> GPT2Config:
    """A named size with optional field overrides, e.g. ``get_config("tiny", hidden_dropout_prob=0.0)``
    or ``get_config("tiny", num_hidden_layers=1)`` (a size field overridden too)."""
    if name not in SIZES:
        raise ValueError(f"unknown model size {name!r}; choose one of {sorted(SIZES)} or give a local folder")
    d, n_layer, n_head = SIZES[name]
    fields = dict(hidden_size=d, num_hidden_layers=n_layer, num_attention_heads=n_head)
    return GPT2Config(**{**fields, **overrides})
