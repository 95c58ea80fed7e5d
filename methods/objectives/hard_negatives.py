"""Hard negatives for supervised SimCSE on paraphrase pairs, mined from the training set by
lexical overlap: for each pair, the question of a pair with the *other* label that shares the most
words with its first question (Jaccard overlap of lower-cased word sets). A near-duplicate
wording that is not a paraphrase is what the in-batch negatives rarely supply.

Report 002 ranked candidates with BLEURT instead; BLEURT needs its own model checkpoint, which is
not available offline here, so this miner uses what can be checked without one. Each mined
question joins the InfoNCE candidates of its batch (``HARD_KEY``; ``contrastive.PairViewCollator``
pads it and ``contrastive.pair_views_loss`` encodes it), as SimCSE's NLI version adds the
contradiction hypothesis.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from methods.objectives import HARD_KEY

WORD = re.compile(r"\w+")


def words(text: str) -> set[str]:
    return set(WORD.findall(text.lower()))


def _bags(texts: Sequence[set[str]], vocab: dict[str, int]) -> torch.Tensor:
    """(N, V) sparse 0/1 matrix of word sets."""
    rows = [i for i, ws in enumerate(texts) for _ in ws]
    cols = [vocab[w] for ws in texts for w in ws]
    values = torch.ones(len(rows))
    return torch.sparse_coo_tensor(torch.tensor([rows, cols]).reshape(2, -1), values, (len(texts), len(vocab)),
                                   check_invariants=True)


def mine_hard_negatives(first: Sequence[str], second: Sequence[str], labels: Sequence[int],
                        chunk: int = 512) -> list[str]:
    """For each pair i, the question (first or second, of any pair j with ``labels[j] !=
    labels[i]``) with the highest Jaccard word overlap with ``first[i]``; ties go to the lower
    index. A label the whole set shares has no candidate: that pair gets its own ``second[i]``."""
    if not len(first) == len(second) == len(labels):
        raise ValueError(f"{len(first)} first, {len(second)} second texts and {len(labels)} labels")
    texts = [*first, *second]  # candidate c is first[c] or second[c - n]
    n = len(first)
    sets = [words(t) for t in texts]
    vocab = {w: i for i, w in enumerate(sorted(set().union(*sets)))} if sets else {}
    if not vocab:
        return list(second)
    cand = _bags(sets, vocab).coalesce()  # (2n, V)
    sizes = torch.tensor([len(s) for s in sets], dtype=torch.float)  # (2n,)
    cand_labels = torch.tensor([*labels, *labels])  # (2n,)
    out = list(second)
    for start in range(0, n, chunk):
        rows = range(start, min(n, start + chunk))
        anchors = _bags([sets[i] for i in rows], vocab).to_dense()  # (c, V)
        inter = torch.sparse.mm(cand, anchors.T).T  # (c, 2n) shared words
        union = sizes[list(rows)].unsqueeze(1) + sizes.unsqueeze(0) - inter
        jaccard = inter / union.clamp(min=1.0)
        other = cand_labels.unsqueeze(0) != torch.tensor([labels[i] for i in rows]).unsqueeze(1)  # (c, 2n)
        jaccard = jaccard.masked_fill(~other, -1.0)
        best = jaccard.argmax(1)  # first maximum: the lower index
        for i, c, ok in zip(rows, best.tolist(), other.any(1).tolist()):
            if ok:
                out[i] = texts[c]
    return out


def add_hard_negatives(features: Sequence[dict[str, Any]], texts: Sequence[str], tokenizer: Any,
                       max_length: int) -> None:
    """Give each feature dict the token ids of its hard negative (``HARD_KEY``, cut to ``max_length``), in place."""
    if len(features) != len(texts):
        raise ValueError(f"{len(features)} features for {len(texts)} hard negatives")
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
    for f, ids in zip(features, encoded):
        f[HARD_KEY] = ids[:max_length]


__all__ = ["HARD_KEY", "add_hard_negatives", "mine_hard_negatives", "words"]
