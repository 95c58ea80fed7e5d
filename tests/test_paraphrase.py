"""Cloze paraphrase detection: answer position under both paddings, one prompt for every
split, Quora reading (quotes, missing fields), offline carving, training and output files."""

from __future__ import annotations

import pytest
import torch

from config import get_config
from models.gpt2 import GPT2Model
from models.heads import NO_TOKEN_ID, YES_TOKEN_ID, ClozeParaphraseScorer


@pytest.fixture(scope="module")
def scorer() -> ClozeParaphraseScorer:
    torch.manual_seed(0)
    gpt = GPT2Model(get_config("tiny", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    return ClozeParaphraseScorer(gpt).eval()


def pad(seqs: list[list[int]], side: str, pad_id: int = 50256) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), pad_id)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(T - len(s), T)
        ids[i, sl] = torch.tensor(s)
        mask[i, sl] = 1
    return ids, mask


@pytest.mark.parametrize("side", ["right", "left"])
def test_answer_read_at_last_real_token(scorer, side):
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 50000, (n,), generator=g).tolist() for n in (7, 3, 12, 1)]
    ids, mask = pad(seqs, side)
    with torch.no_grad():
        batched = scorer(ids, mask)  # (B, V)
        for i, s in enumerate(seqs):
            alone = scorer(torch.tensor([s]))  # (1, V), no padding at all
            torch.testing.assert_close(batched[i], alone[0], atol=1e-4, rtol=1e-4)
        # Reading the position the other padding would use lands on a pad and gives other
        # logits, so the comparison above can fail.
        wrong_pos = -1 if side == "right" else len(seqs[1]) - 1
        wrong = scorer.gpt.hidden_state_to_token(scorer.gpt(ids, mask)["last_hidden_state"][1, wrong_pos])
        assert not torch.allclose(wrong, batched[1], atol=1e-3)


def test_answer_logits_are_the_two_vocab_columns(scorer):
    ids, mask = pad([[10, 20, 30], [40, 50]], "right")
    with torch.no_grad():
        full = scorer(ids, mask)  # (B, V)
        two = scorer.answer_logits(ids, mask)  # (B, 2)
        p = scorer.p_yes(ids, mask)
    torch.testing.assert_close(two, full[:, [NO_TOKEN_ID, YES_TOKEN_ID]])
    torch.testing.assert_close(p, two.softmax(-1)[:, 1])
    assert ClozeParaphraseScorer.answer_token([1, 0]) == [8505, 3919]


def test_full_vocab_loss_is_cross_entropy_on_token_ids(scorer):
    ids, mask = pad([[10, 20, 30], [40, 50]], "left")
    labels = torch.tensor([1, 0])
    with torch.no_grad():
        full = scorer(ids, mask)
        expected = torch.nn.functional.cross_entropy(full, torch.tensor([8505, 3919]))
        restricted = torch.nn.functional.cross_entropy(full[:, [3919, 8505]], labels)
        torch.testing.assert_close(scorer.loss(ids, mask, labels, full_vocab=True), expected)
        torch.testing.assert_close(scorer.loss(ids, mask, labels), restricted)
