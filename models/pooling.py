"""Sentence representations from GPT-2 hidden states: ``--pooling last|mean`` (the classifier
head's and the training objectives').

``last`` is the course's choice: with causal attention only the last real token has read
the whole sentence. ``mean`` averages the hidden states of the real tokens, which SimCSE-style
contrastive objectives often prefer (every position contributes, so no single state carries
the whole sentence). Both read the attention mask, so they give the same vector for a text
whether the batch was padded on the left or on the right.
"""

from __future__ import annotations

import torch

from models.gpt2 import last_index

POOLINGS = ("last", "mean")


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, pooling: str = "last") -> torch.Tensor:
    """(B, T, d) hidden states and (B, T) mask (1 = real token; None = all real) -> (B, d).

    ``mean`` divides by the number of real tokens of each row, so pad positions, whatever
    their states hold, contribute nothing. A row with no real token gives zeros."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    B, T, _ = hidden.shape
    if pooling == "last":
        return hidden[torch.arange(B, device=hidden.device), last_index(attention_mask, T)]  # (B, d)
    if attention_mask is None:
        return hidden.mean(1)
    m = attention_mask[:, -T:].to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, d)

__all__ = ["POOLINGS", "pool"]
