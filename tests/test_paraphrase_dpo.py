"""DPO for paraphrase: the right cloze answer chosen, the other rejected, through methods.dpo's
loss; log 2 at the start (reference == policy), lower after a few steps."""

from __future__ import annotations

import math

import pytest
import torch

from config import get_config
from engine.data import PadCollator
from methods.dpo import disable_dropout, frozen_reference
from models.gpt2 import GPT2Model
from models.heads import ClozeParaphraseScorer
from tasks.paraphrase import ParaphraseSettings
from tasks.paraphrase_dpo import answer_logprobs, make_paraphrase_dpo_loss_fn, paraphrase_dpo_loss
from tasks.quora_data import load_quora_splits, paraphrase_features


@pytest.fixture(scope="module")
def batch(tokenizer):
    d = ParaphraseSettings()
    rows = load_quora_splits(d.para_train, d.para_dev, d.para_test, limit=8)["train"]
    feats = paraphrase_features(rows, tokenizer, 64, verbose=False)
    return PadCollator(tokenizer.pad_token_id)(feats)


def scorer(seed: int = 0) -> ClozeParaphraseScorer:
    torch.manual_seed(seed)
    return disable_dropout(ClozeParaphraseScorer(GPT2Model(get_config("tiny"))))


def test_answer_logprobs_are_the_vocabulary_log_softmax_at_yes_and_no(batch):
    model = scorer().eval()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    full = model(ids, mask).log_softmax(-1)
    lp = answer_logprobs(model, ids, mask)
    torch.testing.assert_close(lp[:, 1], full[:, model.answer_ids[1]])
    torch.testing.assert_close(lp[:, 0], full[:, model.answer_ids[0]])


def test_dpo_starts_at_log_2_and_decreases(batch):
    policy = scorer()
    reference = frozen_reference(policy)
    loss_fn = make_paraphrase_dpo_loss_fn(reference, beta=0.5)
    assert len(set(batch["labels"].tolist())) == 2  # both answers are preferred somewhere
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss = loss_fn(policy.train(), batch)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert losses[-1] < losses[0] - 0.05
    out = paraphrase_dpo_loss(policy.eval(), reference, batch, beta=0.5)
    assert out.accuracy.item() > 0.5 and out.margin.item() > 0
