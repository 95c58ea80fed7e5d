"""Decoding against ``transformers``' ``generate`` on the same random weights,
cached against uncached, and contrastive search against Su et al. 2022 step by step."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config as HFConfig
from transformers import GPT2LMHeadModel
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from decoding.mbr import mbr_generate, mbr_select
from models.decoding import top_k_filter, top_p_filter
from models.generation import STRATEGIES, LineStop, generate, trim
from models.generation_config import GenerationConfig
from models.gpt2 import GPT2Model

PROMPT_LEN, NEW = 9, 30


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Our model and transformers' on the same weights. A large init range makes the
    next-token distributions peaked, so argmax never hinges on float noise; EOS is
    the token greedy decoding emits most, so that rows really finish early."""
    torch.manual_seed(0)
    cfg = HFConfig(n_embd=64, n_layer=2, n_head=4, n_positions=96, vocab_size=300, initializer_range=0.2,
                   bos_token_id=0, eos_token_id=0)
    hf = GPT2LMHeadModel(cfg).eval()
    folder = tmp_path_factory.mktemp("gen")
    hf.save_pretrained(folder)
    ours = GPT2Model.from_pretrained(folder).eval()
    ids = torch.randint(1, 300, (4, PROMPT_LEN), generator=torch.Generator().manual_seed(1))
    out = generate(ours, ids, max_new_tokens=NEW)[:, PROMPT_LEN:]
    values, counts = out.unique(return_counts=True)
    eos = int(values[counts.argmax()])
    return ours, hf, ids, eos


def left_padded(ids: torch.Tensor, eos: int) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :5] = 0
    return ids.masked_fill(mask == 0, eos), mask


def hf_generate(hf, ids, mask, eos, **kw) -> torch.Tensor:
    mask = torch.ones_like(ids) if mask is None else mask
    return hf.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=kw.pop("do_sample", False),
                       pad_token_id=eos, eos_token_id=eos, top_k=kw.pop("top_k", None), **kw)


SETTINGS = [
    dict(),
    dict(repetition_penalty=1.3),
    dict(no_repeat_ngram_size=2),
    dict(num_beams=3),
    dict(num_beams=4, length_penalty=0.6),
    dict(num_beams=3, early_stopping=True),
    dict(num_beams=3, early_stopping="never", length_penalty=1.5),
    dict(num_beams=2, length_penalty=-1.0, no_repeat_ngram_size=3, repetition_penalty=1.2),
    dict(num_beams=3, num_return_sequences=3),
    dict(num_beams=4, length_penalty=0.6, num_return_sequences=2),
]


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("kw", SETTINGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "greedy")
def test_greedy_and_beam_match_transformers(models, kw, padded):
    ours, hf, ids, eos = models
    ids, mask = left_padded(ids, eos) if padded else (ids, None)
    ref = hf_generate(hf, ids, mask, eos, **kw)
    for use_cache in (True, False):
        out = generate(ours, ids, mask, max_new_tokens=NEW, eos_token_id=eos, use_cache=use_cache, **kw)
        assert out.shape == ref.shape and torch.equal(out, ref), (use_cache, out, ref)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_custom_stop_condition_matches_transformers(models, num_beams):
    """A caller's stop condition (here: the continuation contains a given token) ends rows
    exactly as a ``transformers`` StoppingCriteria does, in greedy and beam search."""
    from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList

    ours, hf, ids, eos = models
    ids, mask = left_padded(ids, eos)
    free = generate(ours, ids, mask, max_new_tokens=NEW, eos_token_id=eos, num_beams=num_beams)
    values, counts = free[:, PROMPT_LEN:].unique(return_counts=True)
    token = int(values[counts.masked_fill(values == eos, 0).argmax()])  # the commonest non-EOS token

    def stop(seqs: torch.Tensor) -> torch.Tensor:
        return (seqs[:, PROMPT_LEN:] == token).any(-1)

    class Criteria(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return stop(input_ids)

    ref = hf_generate(hf, ids, mask, eos, num_beams=num_beams, stopping_criteria=StoppingCriteriaList([Criteria()]))
    out = generate(ours, ids, mask, max_new_tokens=NEW, eos_token_id=eos, num_beams=num_beams, stop=stop)
    assert torch.equal(out, ref)
    assert not (out.shape == free.shape and torch.equal(out, free))  # the condition changed the result


def test_parity_cases_really_stop_at_eos(models):
    """The fixture's EOS ends some rows early, so the parity tests cover finished rows."""
    ours, _, ids, eos = models
    out = generate(ours, ids, max_new_tokens=NEW, eos_token_id=eos)
    gen = out[:, PROMPT_LEN:]
    assert (gen == eos).any()
    first = (gen == eos).float().argmax(-1)
    assert (first < gen.size(1) - 1).any()
    for row, f in zip(gen, first.tolist()):  # after the first EOS a row holds only padding (= EOS)
        if (row == eos).any():
            assert (row[f:] == eos).all()


def test_sampling_matches_transformers_with_same_seed(models):
    ours, hf, ids, eos = models
    ids, mask = left_padded(ids, eos)
    kw = dict(do_sample=True, temperature=1.1, top_k=40, top_p=0.9, repetition_penalty=1.1)
    torch.manual_seed(123)
    ref = hf_generate(hf, ids, mask, eos, **kw)
    torch.manual_seed(123)
    out = generate(ours, ids, mask, max_new_tokens=NEW, eos_token_id=eos, **kw)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("kw", [dict(do_sample=True, top_p=0.8, temperature=1.2),
                                dict(penalty_alpha=0.6, top_k=4),
                                dict(num_beams=3, do_sample=True, top_k=20)])
def test_cached_equals_uncached(models, kw):
    ours, _, ids, eos = models
    ids, mask = left_padded(ids, eos)
    outs = [generate(ours, ids, mask, max_new_tokens=NEW, eos_token_id=eos, use_cache=c,
                     generator=torch.Generator().manual_seed(7), **kw) for c in (True, False)]
    assert torch.equal(outs[0], outs[1])


def test_left_padded_row_equals_row_alone(models):
    """Positions come from the mask: padding must not shift a prompt's continuation."""
    ours, _, ids, eos = models
    padded, mask = left_padded(ids, eos)
    batch = generate(ours, padded, mask, max_new_tokens=12)
    alone = generate(ours, ids[2:3, 5:], max_new_tokens=12)
    assert torch.equal(batch[2, 5:], alone[0])


def reference_contrastive(model, ids: torch.Tensor, k: int, alpha: float, steps: int) -> torch.Tensor:
    """Su et al. 2022 written naively: no cache, every candidate re-encoded from scratch."""
    seq = ids
    for _ in range(steps):
        h = model(seq)["last_hidden_state"][0]  # (T, d)
        probs, cand = model.hidden_state_to_token(h[-1]).softmax(-1).topk(k)
        scores = []
        for j in range(k):
            hj = model(torch.cat([seq, cand[j].view(1, 1)], 1))["last_hidden_state"][0, -1]
            sim = F.cosine_similarity(hj[None], h, dim=-1).max()
            scores.append((1 - alpha) * probs[j] - alpha * sim)
        best = int(torch.stack(scores).argmax())
        seq = torch.cat([seq, cand[best].view(1, 1)], 1)
    return seq


@torch.no_grad()
def test_contrastive_search_follows_su_et_al(models):
    ours, _, ids, eos = models
    padded, mask = left_padded(ids, eos)
    out = generate(ours, padded, mask, max_new_tokens=10, penalty_alpha=0.6, top_k=4)
    for row, start in ((0, 0), (2, 5)):
        ref = reference_contrastive(ours, ids[row : row + 1, start:], k=4, alpha=0.6, steps=10)
        assert torch.equal(out[row, start:], ref[0])
    # alpha = 0 is greedy
    greedy = generate(ours, padded, mask, max_new_tokens=10)
    assert torch.equal(generate(ours, padded, mask, max_new_tokens=10, penalty_alpha=1e-9, top_k=4), greedy)


def test_top_k_top_p_match_transformers_warpers():
    scores = torch.randn(5, 50, generator=torch.Generator().manual_seed(3)) * 3
    for p in (0.1, 0.5, 0.9, 1.0):
        assert torch.equal(top_p_filter(scores, p), TopPLogitsWarper(p)(None, scores))
    for k in (1, 7, 50):
        assert torch.equal(top_k_filter(scores, k), TopKLogitsWarper(k)(None, scores))


def test_sampling_limits_and_reproducibility(models):
    ours, _, ids, _ = models
    greedy = generate(ours, ids, max_new_tokens=15)
    assert torch.equal(generate(ours, ids, max_new_tokens=15, do_sample=True, top_k=1), greedy)
    assert torch.equal(generate(ours, ids, max_new_tokens=15, do_sample=True, top_p=1e-6), greedy)
    a = generate(ours, ids, max_new_tokens=15, do_sample=True, generator=torch.Generator().manual_seed(5))
    b = generate(ours, ids, max_new_tokens=15, do_sample=True, generator=torch.Generator().manual_seed(5))
    c = generate(ours, ids, max_new_tokens=15, do_sample=True, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_arguments_are_rejected(models):
    ours, _, ids, _ = models
    right = torch.ones_like(ids)
    right[0, -2:] = 0
    with pytest.raises(ValueError, match="left padding"):
        generate(ours, ids, right, max_new_tokens=3)
    with pytest.raises(ValueError, match="temperature"):
        generate(ours, ids, max_new_tokens=3, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="pad_token_id"):
        generate(ours, ids, max_new_tokens=3, stop=lambda t: t[:, -1] == 1)
    with pytest.raises(ValueError, match="early_stopping"):
        generate(ours, ids, max_new_tokens=3, num_beams=2, early_stopping="sometimes")
    with pytest.raises(ValueError, match="num_beams must be >= 1, got 0"):
        generate(ours, ids, max_new_tokens=3, num_beams=0)


@pytest.mark.parametrize("bad", [dict(num_beams=0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1),
                                 dict(max_new_tokens=0), dict(max_new_tokens=-3), dict(max_new_tokens=2.5),
                                 dict(do_sample=True, temperature=0.0), dict(do_sample=True, temperature=-1.0),
                                 dict(no_repeat_ngram_size=-1), dict(penalty_alpha=-0.1), dict(penalty_alpha=1.5),
                                 dict(repetition_penalty=0.0), dict(early_stopping="sometimes"),
                                 dict(eos_token_id=-1), dict(pad_token_id=1.0), dict(length_penalty="long")],
                         ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_generation_config_rejects_bad_values_by_name(bad):
    name = next(k for k in bad if k != "do_sample")
    with pytest.raises(ValueError, match=f"^{name} must"):
        GenerationConfig(**{"max_new_tokens": 5, **bad})
    GenerationConfig(**{"max_new_tokens": 5, **{k: v for k, v in bad.items() if k == "do_sample"}})  # the rest is fine
    assert GenerationConfig(max_new_tokens=5, temperature=0.0).strategy == "greedy"  # unused without sampling


def test_generate_takes_one_config_or_keywords(models, monkeypatch):
    ours, _, ids, eos = models
    cfg = GenerationConfig(max_new_tokens=8, num_beams=2, eos_token_id=eos)
    assert torch.equal(generate(ours, ids, config=cfg), generate(ours, ids, max_new_tokens=8, num_beams=2,
                                                                 eos_token_id=eos))
    with pytest.raises(TypeError, match="not both"):
        generate(ours, ids, config=cfg, top_k=3)
    with pytest.raises(TypeError, match="unknown settings \\['topk'\\]"):
        generate(ours, ids, max_new_tokens=3, topk=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.top_k = 3
    assert [GenerationConfig(max_new_tokens=1, **kw).strategy for kw in
            (dict(), dict(do_sample=True), dict(num_beams=2, penalty_alpha=0.5, top_k=3),
             dict(penalty_alpha=0.5, top_k=3), dict(penalty_alpha=0.5, top_k=1))] == [
        "greedy", "sample", "beam", "contrastive", "greedy"]
    seen = {}  # the strategy receives the validated config by name
    monkeypatch.setitem(STRATEGIES, "beam",
                        lambda model, input_ids, attention_mask, **kw: seen.update(kw) or input_ids)
    generate(ours, ids, config=cfg)
    assert seen["config"] is cfg and set(seen) == {"config", "generator"}


def test_line_stop_ends_rows_at_the_given_line_count(tokenizer):
    stop = LineStop(tokenizer, 3)
    texts = ["one\ntwo\nthree\n", "one\n\ntwo", "a\n\n\n"]
    ids = [torch.tensor([tokenizer.encode(t)]) for t in texts]
    assert [bool(stop(x)[0]) for x in ids] == [True, False, True]
    # with a model: the line count is reached and nothing follows it
    torch.manual_seed(0)
    from config import get_config

    model = GPT2Model(get_config("tiny")).eval()
    nl = tokenizer.encode("\n")[0]
    with torch.no_grad():  # make "\n" likely so that three lines arrive quickly
        model.wte.weight[nl] *= 40
    prompt = torch.tensor([tokenizer.encode("Shall I compare thee")])
    out = generate(model, prompt, max_new_tokens=40, stop=stop, eos_token_id=tokenizer.eos_token_id)
    text = tokenizer.decode(out[0])
    assert text.count("\n") == 3 and text.endswith("\n")


def test_mbr_picks_the_consensus_candidate(models):
    def overlap(a: str, b: str) -> float:
        return len(set(a.split()) & set(b.split())) / max(len(set(a.split()) | set(b.split())), 1)

    cands = ["the cat sat", "a dog ran far away", "the cat sat down", "the cat sat here"]
    assert mbr_select(cands, overlap) == 0
    assert mbr_select(["only"], overlap) == 0
    ours, _, ids, eos = models
    chosen = mbr_generate(ours, ids[:2], num_candidates=3, decode=lambda t: " ".join(map(str, t)),
                          utility=overlap, max_new_tokens=8, eos_token_id=eos,
                          generator=torch.Generator().manual_seed(0))
    assert len(chosen) == 2 and all(c[:PROMPT_LEN] == ids[i].tolist() for i, c in enumerate(chosen))


def test_trim_drops_padding_and_what_follows_eos():
    row = torch.tensor([9, 9, 1, 2, 3, 4, 9, 9])
    assert trim(row, prompt_len=4, num_pad=2, eos_token_id=9) == [1, 2, 3, 4]
    assert trim(torch.tensor([1, 2, 3, 4, 5]), prompt_len=2, num_pad=None, eos_token_id=9) == [1, 2, 3, 4, 5]
