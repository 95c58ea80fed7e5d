"""MBR over a candidate pool: the pool specification, the pool's contents, the consensus
choice, and beam search's n best (``num_return_sequences``)."""

from __future__ import annotations

import pytest
import torch

from config import get_config
from decoding.mbr import CandidatePool, chrf_utility, mbr_pool_generate, mbr_select, pool_candidates
from models.generation import generate, trim
from models.generation_config import GenerationConfig
from models.gpt2 import GPT2Model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT2Model(get_config("tiny", vocab_size=200, initializer_range=0.2)).eval()


def test_pool_spec_parses_once():
    pool = CandidatePool.parse("beam:4, sample:8,contrastive")
    assert pool.members == (("beam", 4), ("sample", 8), ("contrastive", 1)) and pool.size == 13
    assert str(pool) == "beam:4,sample:8,contrastive:1" and CandidatePool.parse(str(pool)) == pool


@pytest.mark.parametrize("spec, problem", [
    ("", "empty entry"), ("beam:4,,sample:2", "empty entry"), ("nucleus:3", "unknown strategy 'nucleus'"),
    ("sample:x", "count 'x' of sample is not an integer"), ("sample:0", "count must be >= 1"),
    ("beam:2,beam:3", "beam is listed twice"), ("greedy:2", "greedy decoding is deterministic"),
    ("contrastive:3", "contrastive decoding is deterministic"), ("sample:2.5", "not an integer")])
def test_bad_pool_specs_are_refused_with_the_reason(spec, problem):
    with pytest.raises(ValueError, match=problem):
        CandidatePool.parse(spec)


def test_mbr_picks_the_consensus_candidate():
    cands = ["the cat sat on the mat", "a dog ran far away", "the cat sat on a mat", "the cat sat on the hat",
             "zzzz qqqq"]
    assert mbr_select(cands, chrf_utility) == 0  # closest to the others under chrF
    assert mbr_select(["only"], chrf_utility) == 0
    with pytest.raises(ValueError):
        mbr_select([], chrf_utility)


@torch.no_grad()
def test_pool_holds_each_strategys_outputs(model):
    ids = torch.randint(1, 200, (2, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    cfg = GenerationConfig(max_new_tokens=6, eos_token_id=5)
    groups = pool_candidates(model, ids, mask, CandidatePool.parse("greedy,beam:3,sample:2,contrastive"), cfg,
                             torch.Generator().manual_seed(0))
    assert [len(g) for g in groups] == [7, 7]
    for b, start in ((0, 0), (1, 2)):
        alone = ids[b : b + 1, start:]
        assert groups[b][0] == trim(generate(model, alone, max_new_tokens=6, eos_token_id=5)[0], 6 - start, 0, 5)
        beams = generate(model, alone, max_new_tokens=6, eos_token_id=5, num_beams=3, num_return_sequences=3)
        assert groups[b][1:4] == [trim(r, 6 - start, 0, 5) for r in beams]
        contrastive = generate(model, alone, max_new_tokens=6, eos_token_id=5, penalty_alpha=0.6, top_k=4)
        assert groups[b][6] == trim(contrastive[0], 6 - start, 0, 5)
        assert all(c[: 6 - start] == alone[0].tolist() for c in groups[b])


@torch.no_grad()
def test_mbr_pool_generate_returns_the_consensus_of_each_group(model):
    ids = torch.randint(1, 200, (2, 6), generator=torch.Generator().manual_seed(4))
    cfg = GenerationConfig(max_new_tokens=8)
    decode = lambda toks: " ".join(map(str, toks))  # noqa: E731
    chosen = mbr_pool_generate(model, ids, pool="beam:2,sample:3", config=cfg, decode=decode,
                               generator=torch.Generator().manual_seed(1))
    groups = pool_candidates(model, ids, None, CandidatePool.parse("beam:2,sample:3"), cfg,
                             torch.Generator().manual_seed(1))
    assert chosen == [g[mbr_select([decode(c) for c in g], chrf_utility)] for g in groups]


@torch.no_grad()
def test_beam_n_best_is_best_first_and_starts_with_the_single_best(model):
    ids = torch.randint(1, 200, (2, 6), generator=torch.Generator().manual_seed(5))
    one = generate(model, ids, max_new_tokens=7, num_beams=4)
    four = generate(model, ids, max_new_tokens=7, num_beams=4, num_return_sequences=4)
    assert four.shape == (8, one.size(1))
    assert torch.equal(four[0::4], one)
    assert len({tuple(r.tolist()) for r in four[:4]}) == 4  # distinct hypotheses
    # best first: summed log-probabilities decrease (same length, no EOS, length penalty irrelevant)
    logp = model.hidden_state_to_token(model(four)["last_hidden_state"][:, 5:-1]).log_softmax(-1)
    score = logp.gather(-1, four[:, 6:, None]).squeeze(-1).sum(-1).view(2, 4)
    assert bool((score[:, :-1] >= score[:, 1:] - 1e-5).all())


@pytest.mark.parametrize("kw, problem", [(dict(num_beams=2, num_return_sequences=3), "<= num_beams"),
                                         (dict(num_return_sequences=2), "1 for greedy"),
                                         (dict(penalty_alpha=0.5, top_k=3, num_return_sequences=2), "contrastive"),
                                         (dict(num_return_sequences=0), ">= 1")])
def test_num_return_sequences_is_validated(kw, problem):
    with pytest.raises(ValueError, match=f"^num_return_sequences must.*{problem}"):
        GenerationConfig(max_new_tokens=3, **kw)


def test_sampling_returns_n_rows_per_prompt(model):
    ids = torch.randint(1, 200, (2, 6), generator=torch.Generator().manual_seed(6))
    out = generate(model, ids, max_new_tokens=5, do_sample=True, num_return_sequences=3,
                   generator=torch.Generator().manual_seed(0))
    assert out.shape == (6, 11) and torch.equal(out[:, :6], ids.repeat_interleave(3, 0))
