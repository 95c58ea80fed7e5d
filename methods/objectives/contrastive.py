"""SimCSE-style contrastive learning of sentence representations (Gao, Yao and Chen 2021,
"SimCSE: Simple Contrastive Learning of Sentence Embeddings", EMNLP).

InfoNCE with in-batch negatives: for anchors h_i and candidates h'_j (cosine similarity
sim, temperature tau), with h'_{t(i)} the positive of anchor i,

    l_i = -log  exp(sim(h_i, h'_{t(i)}) / tau)  /  sum_j exp(sim(h_i, h'_j) / tau)

- unsupervised: h and h' are two dropout views of the same batch of texts (t(i) = i), so
  every other text of the batch is a negative;
- supervised, for paraphrase pairs: the anchors are the first questions of the positive
  pairs, the candidates the second questions of every pair in the batch. A positive pair's
  other question is the positive; the second question of a non-paraphrase pair (often on the
  same topic) is a hard negative, as the contradiction hypothesis is in SimCSE's NLI version.

The two questions of a pair reach the loss as their own padded token ids: ``add_pair_views``
puts each question's token ids in its example's features, and ``PairViewCollator`` pads
``sentence1_input_ids`` / ``sentence2_input_ids`` beside the prompt and gives each its mask.

Under torchrun every rank holds a slice of the batch; the negatives must still be the whole
batch's, or N processes would not train as one process of N times the batch. Both views are
gathered from every rank through the strategy (``gather``), this rank's rows keeping their
gradients, and every rank computes the whole batch's loss (``global_batch_loss``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.data import PadCollator
from methods.objectives import HARD_KEY
from models.heads import pool

PAIR_KEYS = ("sentence1_input_ids", "sentence2_input_ids")
Gather = Callable[[torch.Tensor], torch.Tensor]  # (B_r, ...) -> the global batch's rows (strategy.all_gather)


def info_nce(
    anchors: torch.Tensor, candidates: torch.Tensor, targets: torch.Tensor | None = None, temperature: float = 0.05
) -> torch.Tensor:
    """Mean InfoNCE of (N, d) ``anchors`` against (M, d) ``candidates`` by cosine similarity;
    ``targets`` (N,) index each anchor's positive among the candidates (default: the same row)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    sim = F.normalize(anchors.float(), dim=-1) @ F.normalize(candidates.float(), dim=-1).T  # (N, M)
    if targets is None:
        targets = torch.arange(anchors.size(0), device=anchors.device)
    return F.cross_entropy(sim / temperature, targets)


def local(x: torch.Tensor) -> torch.Tensor:
    """The gather of one process: ``x``'s own rows."""
    return x


def global_batch_loss(loss: torch.Tensor, local_rows: int, global_rows: int) -> torch.Tensor:
    """``loss`` (the same value on every rank, each with gradients through its own rows only) with
    its gradient scaled by ``global_rows / local_rows``. The Trainer weighs a rank's loss by its
    share of the batch and DDP averages the ranks' gradients, while the ranks' gradients of this
    loss *add up* to the global batch's; the value stays ``loss``, for the logs."""
    scale = global_rows / local_rows
    return loss if scale == 1 else loss * scale - loss.detach() * (scale - 1)


def unsupervised_contrastive_loss(
    view_a: torch.Tensor, view_b: torch.Tensor, temperature: float = 0.05, gather: Gather = local
) -> torch.Tensor:
    """Unsupervised SimCSE: (B, d) representations of the same B texts under two dropout masks.
    ``gather`` (the Trainer strategy's ``all_gather``) brings in both views of the other ranks'
    texts, so that under DDP/FSDP the negatives are those of the global batch, as in one process
    (and as SimCSE's own ``cl_forward`` does)."""
    a, b = gather(view_a), gather(view_b)
    return global_batch_loss(info_nce(a, b, temperature=temperature), view_a.size(0), a.size(0))


def supervised_pair_loss(
    first: torch.Tensor, second: torch.Tensor, labels: torch.Tensor, temperature: float = 0.05,
    gather: Gather = local, hard: torch.Tensor | None = None,
) -> torch.Tensor:
    """Supervised SimCSE on pairs: (B, d) representations of the first and second questions and
    (B,) 0/1 labels, the other ranks' gathered as in ``unsupervised_contrastive_loss``; ``hard``
    (B, d), mined hard negatives (``hard_negatives``), join the candidates. A batch without a
    positive pair contributes zero (still attached to the graph)."""
    rows = first.size(0)
    first, second, labels = gather(first), gather(second), gather(labels)
    if hard is not None:
        second = torch.cat([second, gather(hard)])  # the positives keep their rows: targets unchanged
    return global_batch_loss(_pair_loss(first, second, labels, temperature), rows, first.size(0))


def _pair_loss(first: torch.Tensor, candidates: torch.Tensor, labels: torch.Tensor,
               temperature: float) -> torch.Tensor:
    positive = labels.bool()
    if not positive.any():
        return (first.sum() + candidates.sum()) * 0.0
    rows = positive.nonzero().squeeze(-1)  # (N,) anchors: the positive pairs
    return info_nce(first[rows], candidates, targets=rows, temperature=temperature)


def encode_sentences(
    body: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, pooling: str = "last"
) -> torch.Tensor:
    """(B, d) sentence representations from the GPT-2 body (``models.gpt2.GPT2Model``)."""
    out = body(input_ids, attention_mask)
    return pool(out["last_hidden_state"], attention_mask, pooling)


def pair_views_loss(
    body: nn.Module, batch: Mapping[str, Any], pooling: str = "last", temperature: float = 0.05,
    gather: Gather = local,
) -> torch.Tensor:
    """``supervised_pair_loss`` on a batch from ``PairViewCollator`` (two extra body passes)."""
    missing = [k for k in (*PAIR_KEYS, "labels") if k not in batch]
    if missing:
        raise KeyError(f"supervised contrastive loss needs batch keys {missing}; build batches with PairViewCollator")
    first, second = (encode_sentences(body, batch[k], batch[mask_key(k)], pooling) for k in PAIR_KEYS)
    hard = encode_sentences(body, batch[HARD_KEY], batch[mask_key(HARD_KEY)], pooling) if HARD_KEY in batch else None
    return supervised_pair_loss(first, second, batch["labels"], temperature, gather, hard)


def add_pair_views(
    features: Sequence[dict[str, Any]], first: Sequence[str], second: Sequence[str], tokenizer: Any, max_length: int
) -> None:
    """Give each feature dict the token ids of its pair's two texts (``sentence1_input_ids``,
    ``sentence2_input_ids``, each cut to ``max_length``), in place, for ``PairViewCollator``."""
    if not len(features) == len(first) == len(second):
        raise ValueError(f"{len(features)} features for {len(first)} first and {len(second)} second texts")
    for key, texts in zip(PAIR_KEYS, (first, second)):
        encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
        for f, ids in zip(features, encoded):
            f[key] = ids[:max_length]


def mask_key(ids_key: str) -> str:
    return ids_key.replace("input_ids", "attention_mask")


class PairViewCollator(PadCollator):
    """``PadCollator`` that also pads each example's ``sentence1_input_ids`` and
    ``sentence2_input_ids`` (the two questions alone, token ids), and its mined hard negative
    where it has one (``HARD_KEY``), and adds their masks (``sentence1_attention_mask``...), for
    the supervised contrastive term."""

    def __init__(self, pad_id: int, padding_side: str = "right") -> None:
        super().__init__(pad_id, {k: pad_id for k in (*PAIR_KEYS, HARD_KEY)}, padding_side)

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        batch = super().__call__(examples)
        for k in (*PAIR_KEYS, HARD_KEY):
            if k in batch:
                batch[mask_key(k)] = self._pad([[1] * len(ex[k]) for ex in examples], 0)
        return batch
