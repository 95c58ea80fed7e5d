"""DPO: the loss, completion log-probabilities on a tiny GPT-2, pair building, batches."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from config import get_config
from methods.dpo import (
    PreferencePair,
    build_pairs,
    completion_logprobs,
    compute_dtype,
    dpo_batch_loss,
    dpo_loss,
    encode_completion,
    encode_pair,
    frozen_reference,
    make_dpo_loss_fn,
    pair_collator,
    pair_logprobs,
)
from models.gpt2 import GPT2Model
from models.sonnet_gpt import SonnetGPT
from tasks.sonnet_dpo import chrf_scores


def tiny_sonnet_model(seed: int) -> SonnetGPT:
    """A random ``tiny`` sonnet LM without dropout, so that policy and reference agree exactly."""
    torch.manual_seed(seed)
    return SonnetGPT(GPT2Model(get_config("tiny", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)))


@pytest.fixture(scope="module")
def sonnet_model() -> SonnetGPT:
    return tiny_sonnet_model(0).eval()


def direct_logprobs(model: SonnetGPT, ids: torch.Tensor, att: torch.Tensor, comp: torch.Tensor) -> torch.Tensor:
    """The textbook computation: full (B, T, V) log-softmax, gather the next tokens, mask, sum."""
    logp = F.log_softmax(model(ids, att).float(), dim=-1)[:, :-1]  # (B, T-1, V)
    tok = logp.gather(-1, ids[:, 1:, None])[..., 0]  # (B, T-1)
    return (tok * (comp[:, 1:] * att[:, 1:])).sum(-1)


# ----------------------------------------------------------------- loss


def test_loss_is_log2_at_zero_margin():
    lp = torch.tensor([-12.0, -3.5, -40.0])
    out = dpo_loss(lp, lp - 2.0, lp, lp - 2.0, beta=0.1)  # policy == reference
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert torch.all(out.chosen_rewards == 0) and out.margin.item() == 0 and out.accuracy.item() == 0


def test_gradient_raises_chosen_and_lowers_rejected():
    pc = torch.tensor([-10.0, -5.0], requires_grad=True)
    pr = torch.tensor([-11.0, -4.0], requires_grad=True)
    ref_c, ref_r = torch.tensor([-10.0, -6.0]), torch.tensor([-10.0, -4.0])
    dpo_loss(pc, pr, ref_c, ref_r, beta=0.5).loss.backward()
    assert torch.all(pc.grad < 0) and torch.all(pr.grad > 0)  # descent: chosen up, rejected down
    assert torch.allclose(pc.grad, -pr.grad)
    # a gradient step lowers the loss
    with torch.no_grad():
        after = dpo_loss(pc - 0.1 * pc.grad, pr - 0.1 * pr.grad, ref_c, ref_r, beta=0.5).loss
        before = dpo_loss(pc, pr, ref_c, ref_r, beta=0.5).loss
    assert after < before


def test_beta_scales_margin_and_gradient():
    pc, pr = torch.tensor([-9.0]), torch.tensor([-12.0])
    ref_c, ref_r = torch.tensor([-10.0]), torch.tensor([-10.0])  # margin of log-ratios: 1 - (-2) = 3
    for beta in (0.1, 0.5, 2.0):
        out = dpo_loss(pc, pr, ref_c, ref_r, beta=beta)
        assert out.loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-3 * beta))), rel=1e-6)
        assert out.margin.item() == pytest.approx(3 * beta) and out.accuracy.item() == 1.0
        assert out.chosen_rewards.item() == pytest.approx(beta)
        assert out.rejected_rewards.item() == pytest.approx(-2 * beta)
    # at zero margin the gradient is -beta/2 per pair (sigmoid(0) = 1/2), mean over B pairs
    for beta in (0.1, 1.0):
        pc = torch.zeros(4, requires_grad=True)
        dpo_loss(pc, torch.zeros(4), torch.zeros(4), torch.zeros(4), beta=beta).loss.backward()
        assert torch.allclose(pc.grad, torch.full((4,), -beta / 2 / 4))
    # the reference never receives gradient
    ref = torch.zeros(2, requires_grad=True)
    dpo_loss(torch.zeros(2, requires_grad=True), torch.zeros(2), ref, ref, 0.1).loss.backward()
    assert ref.grad is None


def test_loss_rejects_bad_input():
    z = torch.zeros(3)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(z, z, z, z, beta=0.0)
    with pytest.raises(ValueError, match="shape"):
        dpo_loss(z, torch.zeros(2), z, z)


# ----------------------------------------------------------------- log-probabilities


def test_completion_logprobs_equal_direct_computation(sonnet_model):
    torch.manual_seed(1)
    B, T, V = 3, 12, sonnet_model.gpt.config.vocab_size
    ids = torch.randint(0, V, (B, T))
    att = torch.ones(B, T, dtype=torch.long)
    att[1, 9:] = 0  # right padding
    comp = torch.zeros(B, T, dtype=torch.long)
    comp[0, 4:] = 1
    comp[1, 2:] = 1  # completion runs into the padding: padded positions are not scored
    comp[2, 11:] = 1  # a one-token completion
    want = direct_logprobs(sonnet_model, ids, att, comp)
    with torch.no_grad():
        for model in (sonnet_model, sonnet_model.gpt):  # SonnetGPT, or its bare body
            for chunk in (256, 5):
                got = completion_logprobs(model, ids, att, comp, chunk_rows=chunk)
                assert torch.allclose(got, want, atol=1e-4, rtol=1e-5), (got, want)
    # any logits module: the generic path
    logits_only = torch.nn.Module()
    logits_only.forward = lambda i, a: sonnet_model(i, a)  # type: ignore[method-assign]
    assert torch.allclose(completion_logprobs(logits_only, ids, att, comp), want, atol=1e-4)
    # the prompt is masked: changing a prompt-only mask changes nothing; no completion scores 0
    assert completion_logprobs(sonnet_model, ids, att, torch.zeros_like(comp)).abs().sum() == 0
    assert torch.all(want < 0)


def test_completion_logprobs_gradient_matches_direct(sonnet_model):
    torch.manual_seed(2)
    ids = torch.randint(0, 500, (2, 8))
    att, comp = torch.ones(2, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long)
    comp[:, 3:] = 1
    w = sonnet_model.gpt.wte.weight
    g1 = torch.autograd.grad(completion_logprobs(sonnet_model, ids, att, comp, chunk_rows=4).sum(), w)[0]
    g2 = torch.autograd.grad(direct_logprobs(sonnet_model, ids, att, comp).sum(), w)[0]
    assert torch.allclose(g1, g2, atol=1e-5)


def test_completion_logprobs_shape_check(sonnet_model):
    with pytest.raises(ValueError, match="must match"):
        completion_logprobs(sonnet_model, torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 5), torch.ones(2, 4))


# ----------------------------------------------------------------- pairs


def test_best_worst_pairs_are_deterministic_and_ignore_ties():
    prompts = ["p0", "p1", "p2", "p3"]
    cands = [["a", "b", "c"], ["x", "y"], ["s", "t", "u"], []]
    scores = [[0.5, 0.9, 0.1], [0.3, 0.3], [0.2, 0.7, 0.7], []]
    pairs = build_pairs(prompts, cands, scores)
    assert pairs == build_pairs(prompts, cands, scores)
    assert [(p.prompt_index, p.chosen, p.rejected) for p in pairs] == [(0, "b", "c"), (2, "t", "s")]
    assert pairs[0].margin == pytest.approx(0.8) and pairs[1].chosen_score == 0.7  # first of the tied best
    assert build_pairs(prompts, cands, scores, min_margin=0.6) == pairs[:1]


def test_all_pairs_with_margin():
    pairs = build_pairs(["p"], [["a", "b", "c", "d"]], [[1.0, 3.0, 1.0, 2.5]], strategy="all", min_margin=0.4)
    # (a,c) tie and (b,d) margin 0.5 > 0.4; (b,d) kept, ordered by candidate index
    assert [(p.chosen, p.rejected) for p in pairs] == [("b", "a"), ("d", "a"), ("b", "c"), ("b", "d"), ("d", "c")]
    assert all(p.margin > 0.4 for p in pairs)
    # identical texts never pair, even if a noisy scorer gave them different scores
    assert build_pairs(["p"], [["same", "same"]], [[1.0, 0.0]]) == []


def test_build_pairs_validates():
    with pytest.raises(ValueError, match="strategy"):
        build_pairs(["p"], [["a"]], [[1.0]], strategy="best")
    with pytest.raises(ValueError, match="candidates but"):
        build_pairs(["p"], [["a", "b"]], [[1.0]])
    with pytest.raises(ValueError, match="finite"):
        build_pairs(["p"], [["a", "b"]], [[1.0, float("nan")]])
    with pytest.raises(ValueError, match="prompts"):
        build_pairs(["p", "q"], [["a"]], [[1.0]])
    with pytest.raises(ValueError, match="min_margin"):
        build_pairs(["p"], [["a"]], [[1.0]], min_margin=-1)


def test_chrf_scores_rank_the_closer_candidate_higher():
    ref = "Thy youth's proud livery, so gazed on now,"
    s = chrf_scores([ref, "Thy youth's proud livery, gazed on", "zzz qqq"], ref)
    assert s[0] == pytest.approx(100.0) and s[0] > s[1] > s[2]


# ----------------------------------------------------------------- batches and training


def test_encode_completion_masks_the_prompt(tokenizer):
    ids, mask = encode_completion(tokenizer, "Shall I compare thee", " to a summer's day?", max_length=64)
    p = tokenizer("Shall I compare thee", add_special_tokens=False)["input_ids"]
    assert ids[: len(p)] == p and mask == [0] * len(p) + [1] * (len(ids) - len(p))
    ids, mask = encode_completion(tokenizer, "Shall I compare thee", " to a summer's day?", max_length=len(p) + 2)
    assert len(ids) == len(p) + 2 and sum(mask) == 2  # the completion is cut, the prompt kept
    with pytest.raises(ValueError, match="no room"):
        encode_completion(tokenizer, "Shall I compare thee", " to", max_length=len(p))
    with pytest.raises(ValueError, match="empty"):
        encode_completion(tokenizer, "Shall I", "", max_length=64)


def two_pairs(tokenizer) -> dict[str, torch.Tensor]:
    pairs = [PreferencePair(0, "Shall I compare thee", " to a summer's day?", " lorem ipsum dolor", 1.0, 0.0),
             PreferencePair(1, "When forty winters", " shall besiege thy brow", " and so on and so on", 1.0, 0.0)]
    return pair_collator(tokenizer.pad_token_id)([encode_pair(tokenizer, p, 64) for p in pairs])


def test_reference_computes_in_the_policys_dtype(tokenizer):
    """Issue 25, bug 7: FSDP2 on CUDA runs the policy with bf16 weights (embeddings and LayerNorms
    too; emulated here by casting a copy) while the frozen reference was float32, so the loss did
    not start at log 2. The reference now follows the policy's dtype (and a float32 policy keeps a
    float32 reference)."""
    start = tiny_sonnet_model(3)
    reference = frozen_reference(start)
    policy = copy.deepcopy(start).to(torch.bfloat16)  # what FSDP2's bf16 parameter policy computes with
    batch = two_pairs(tokenizer)
    out = make_dpo_loss_fn(reference, beta=0.5)(policy, batch)
    assert out.item() == pytest.approx(math.log(2), abs=1e-6)
    assert {p.dtype for p in reference.parameters()} == {torch.bfloat16} == {compute_dtype(policy)}
    fp32_reference = frozen_reference(start)
    dpo_batch_loss(start, fp32_reference, batch)
    assert {p.dtype for p in fp32_reference.parameters()} == {torch.float32}


def test_a_completion_the_model_ended_is_scored_with_its_eos(tokenizer, sonnet_model):
    prompt, text, eos = "Shall I compare thee", " to a summer's day?", tokenizer.eos_token_id
    cut, cut_mask = encode_completion(tokenizer, prompt, text, max_length=64)
    ended, ended_mask = encode_completion(tokenizer, prompt, text + tokenizer.eos_token, max_length=64)
    assert ended == cut + [eos] and ended_mask == cut_mask + [1] and eos not in cut
    # log p(ended) = log p(cut) + log p(EOS | prompt + completion): DPO sees the ending
    lp = [completion_logprobs(sonnet_model, torch.tensor([ids]), torch.ones(1, len(ids)), torch.tensor([m]))
          for ids, m in ((cut, cut_mask), (ended, ended_mask))]
    with torch.no_grad():
        eos_lp = sonnet_model(torch.tensor([cut]), torch.ones(1, len(cut))).float().log_softmax(-1)[0, -1, eos]
    assert lp[1].item() == pytest.approx(lp[0].item() + eos_lp.item(), abs=1e-4)
    # cut to fit, the EOS goes first: the completion is unfinished within the window
    assert encode_completion(tokenizer, prompt, text + tokenizer.eos_token, max_length=len(cut))[0] == cut
    assert encode_completion(tokenizer, prompt, tokenizer.eos_token, max_length=64)[1][-1:] == [1]  # ended at once


def test_batch_loss_trains_the_policy_toward_chosen(tokenizer):
    policy = tiny_sonnet_model(3)
    reference = frozen_reference(policy)
    assert all(not p.requires_grad for p in reference.parameters()) and not reference.training
    batch = two_pairs(tokenizer)
    assert batch["chosen_input_ids"].shape == batch["chosen_completion_mask"].shape
    # one pass over both sides equals scoring each side alone
    c, r = pair_logprobs(policy, batch)
    alone = completion_logprobs(policy, batch["rejected_input_ids"], batch["rejected_attention_mask"],
                                batch["rejected_completion_mask"])
    assert torch.allclose(r, alone, atol=1e-4)
    out = dpo_batch_loss(policy, reference, batch, beta=0.5)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-5)  # policy == reference
    loss_fn = make_dpo_loss_fn(reference, beta=0.5)
    for _ in range(3):  # plain gradient descent (torch.optim's first step costs seconds of imports)
        policy.zero_grad()
        loss_fn(policy, batch).backward()
        with torch.no_grad():
            for p in policy.parameters():
                p -= 0.5 * p.grad
    after = dpo_batch_loss(policy, reference, batch, beta=0.5)
    assert after.loss.item() < math.log(2) - 0.01 and after.accuracy.item() == 1.0
    c2, r2 = pair_logprobs(policy, batch)
    assert torch.all(c2 - r2 > c - r)  # chosen gained on rejected
    assert torch.equal(reference.gpt.wte.weight, frozen_reference(reference).gpt.wte.weight)
