"""Minimum Bayes risk selection: sample several continuations per prompt with
``models.generation.generate`` and keep the consensus one.

Why a module of its own: it is a layer above decoding (many ``generate`` rows in,
one chosen token list per prompt out, judged by a text-level utility such as chrF),
not a decoding strategy that ``generate`` dispatches to.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from models.generation import generate, trim


def mbr_select(candidates: Sequence[str], utility: Callable[[str, str], float]) -> int:
    """Index of the candidate with the highest mean utility against the others
    (minimum Bayes risk with the samples as pseudo-references)."""
    n = len(candidates)
    if n == 0:
        raise ValueError("mbr_select needs at least one candidate")
    if n == 1:
        return 0
    means = [sum(utility(c, r) for j, r in enumerate(candidates) if j != i) / (n - 1) for i, c in enumerate(candidates)]
    return max(range(n), key=means.__getitem__)


@torch.no_grad()
def mbr_generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    num_candidates: int,
    decode: Callable[[list[int]], str],
    utility: Callable[[str, str], float],
    **sample_kwargs,
) -> list[list[int]]:
    """Draw ``num_candidates`` samples per prompt and keep the one with the highest
    mean ``utility`` (chrF for sonnets) against the others. Returns token lists
    (prompt included, padding and what follows EOS removed) per prompt."""
    B, P = input_ids.shape
    ids = input_ids.repeat_interleave(num_candidates, 0)
    mask = None if attention_mask is None else attention_mask.repeat_interleave(num_candidates, 0)
    sample_kwargs.setdefault("do_sample", True)
    out = generate(model, ids, mask, **sample_kwargs)  # (B*N, T)
    eos = sample_kwargs.get("eos_token_id")
    rows = [trim(out[i], P, None if mask is None else int((mask[i] == 0).sum()), eos) for i in range(out.size(0))]
    chosen = []
    for b in range(B):
        group = rows[b * num_candidates : (b + 1) * num_candidates]
        texts = [decode(r) for r in group]
        chosen.append(group[mbr_select(texts, utility)])
    return chosen
