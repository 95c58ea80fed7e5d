"""Contrastive search's variants (mean similarity, dynamic alpha) against a naive
step-by-step computation on a tiny model; the max-similarity variant keeps its
reference test in tests/test_generation.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from config import get_config
from models.generation import generate
from models.generation_config import GenerationConfig
from models.gpt2 import GPT2Model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = GPT2Model(get_config("tiny", vocab_size=200, initializer_range=0.2)).eval()
    return m


def naive_contrastive(model, ids, k, alpha, steps, mean=False, dynamic_q=None):
    """Su et al. 2022 without a cache, every candidate re-encoded; ``mean`` averages the
    similarities, ``dynamic_q`` uses alpha_t = sigmoid(logit(alpha) + q * u_t)."""
    seq, entropies = ids, []
    for _ in range(steps):
        h = model(seq)["last_hidden_state"][0]  # (T, d)
        p = model.hidden_state_to_token(h[-1]).softmax(-1)
        a = alpha
        if dynamic_q is not None:
            H = float(-(p * p.log()).sum())
            u = 0.0 if not entropies else (H - float(torch.tensor(entropies).median())) / math.log(p.numel())
            entropies.append(H)
            a = 1 / (1 + math.exp(-(math.log(alpha / (1 - alpha)) + dynamic_q * u)))
        probs, cand = p.topk(k)
        scores = []
        for j in range(k):
            hj = model(torch.cat([seq, cand[j].view(1, 1)], 1))["last_hidden_state"][0, -1]
            sims = F.cosine_similarity(hj[None], h, dim=-1)
            scores.append((1 - a) * probs[j] - a * (sims.mean() if mean else sims.max()))
        best = int(torch.stack(scores).argmax())
        seq = torch.cat([seq, cand[best].view(1, 1)], 1)
    return seq


@torch.no_grad()
@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("variant", ["mean", "dynamic", "both"])
def test_variants_follow_the_direct_computation(model, variant, use_cache):
    ids = torch.randint(1, 200, (3, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # row 1 is left padded: its real prompt is ids[1, 3:]
    mean, dyn = variant in ("mean", "both"), variant in ("dynamic", "both")
    out = generate(model, ids, mask, max_new_tokens=8, penalty_alpha=0.6, top_k=4, use_cache=use_cache,
                   contrastive_mean_sim=mean, contrastive_dynamic_alpha=dyn, contrastive_alpha_sensitivity=30.0)
    for row, start in ((0, 0), (1, 3)):
        ref = naive_contrastive(model, ids[row : row + 1, start:], 4, 0.6, 8, mean=mean,
                                dynamic_q=30.0 if dyn else None)
        assert torch.equal(out[row, start:], ref[0])


@torch.no_grad()
def test_variants_change_the_choice(model):
    """The tests above could pass with the variant ignored if it never changed a choice."""
    ids = torch.randint(1, 200, (4, 7), generator=torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=12, penalty_alpha=0.6, top_k=4)
    base = generate(model, ids, **kw)
    assert not torch.equal(base, generate(model, ids, **kw, contrastive_mean_sim=True))
    assert not torch.equal(base, generate(model, ids, **kw, contrastive_dynamic_alpha=True,
                                          contrastive_alpha_sensitivity=30.0))
    # sensitivity 0: alpha is penalty_alpha at every step, i.e. plain contrastive search
    assert torch.equal(base, generate(model, ids, **kw, contrastive_dynamic_alpha=True,
                                      contrastive_alpha_sensitivity=0.0))


@pytest.mark.parametrize("bad, name", [(dict(contrastive_mean_sim=1), "contrastive_mean_sim"),
                                       (dict(contrastive_dynamic_alpha="yes"), "contrastive_dynamic_alpha"),
                                       (dict(contrastive_alpha_sensitivity=-1.0), "contrastive_alpha_sensitivity"),
                                       (dict(contrastive_dynamic_alpha=True, penalty_alpha=1.0), "penalty_alpha")])
def test_variant_settings_are_validated(bad, name):
    with pytest.raises(ValueError, match=f"^{name} must"):
        GenerationConfig(max_new_tokens=3, **bad)
