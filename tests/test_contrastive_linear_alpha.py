"""The reports' "dynamic alpha" (R2): contrastive search whose alpha rises linearly with the step,
against its schedule's math and a step-by-step direct computation; a constant schedule is plain
contrastive search token for token; the sonnet flags name the two schedules."""

from __future__ import annotations

import pytest
import torch

from cli.sonnet import generation_config, parse_args
from config import get_config
from models.contrastive import LinearAlpha
from models.generation import generate
from models.generation_config import GenerationConfig
from models.gpt2 import GPT2Model
from tests.test_contrastive_variants import naive_contrastive


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT2Model(get_config("tiny", vocab_size=200, initializer_range=0.2)).eval()


def test_the_schedule_rises_linearly_from_alpha_min_to_alpha_max():
    schedule = LinearAlpha(0.2, 0.6, steps=5)
    assert [schedule(None) for _ in range(7)] == pytest.approx([0.2, 0.3, 0.4, 0.5, 0.6, 0.6, 0.6])
    assert LinearAlpha(0.3, 0.9, steps=1)(None) == 0.3


@torch.no_grad()
@pytest.mark.parametrize("use_cache", [True, False])
def test_a_constant_schedule_is_plain_contrastive_search(model, use_cache):
    ids = torch.randint(0, 200, (3, 6), generator=torch.Generator().manual_seed(1))
    plain = GenerationConfig(max_new_tokens=12, penalty_alpha=0.6, top_k=4, use_cache=use_cache)
    flat = GenerationConfig(max_new_tokens=12, penalty_alpha=0.6, top_k=4, contrastive_alpha_min=0.6,
                            use_cache=use_cache)
    assert torch.equal(generate(model, ids, config=plain), generate(model, ids, config=flat))


@torch.no_grad()
@pytest.mark.parametrize("use_cache", [True, False])
def test_linear_alpha_follows_the_direct_computation(model, use_cache):
    ids = torch.randint(0, 200, (1, 5), generator=torch.Generator().manual_seed(2))
    steps, low, high = 8, 0.05, 0.9
    want = ids
    for t in range(steps):  # one step at a time, each with its own alpha
        want = naive_contrastive(model, want, 4, low + (high - low) * t / (steps - 1), 1)
    cfg = GenerationConfig(max_new_tokens=steps, penalty_alpha=high, top_k=4, contrastive_alpha_min=low,
                           use_cache=use_cache)
    got = generate(model, ids, config=cfg)
    assert torch.equal(got, want)
    plain = generate(model, ids, config=GenerationConfig(max_new_tokens=steps, penalty_alpha=high, top_k=4))
    assert not torch.equal(got, plain)  # the schedule changes the choice here


@pytest.mark.parametrize("bad, match", [
    (dict(contrastive_alpha_min=0.7), "must be in \\[0, penalty_alpha"),
    (dict(contrastive_alpha_min=-0.1), "must be in \\[0, penalty_alpha"),
    (dict(contrastive_alpha_min=0.1, contrastive_dynamic_alpha=True), "two alpha schedules"),
])
def test_schedule_settings_are_validated(bad, match):
    with pytest.raises(ValueError, match=match):
        GenerationConfig(max_new_tokens=4, penalty_alpha=0.6, top_k=4, **bad)


def test_the_sonnet_flags_name_both_schedules_and_keep_the_old_spelling(capsys):
    base = ["--decoding", "contrastive", "--penalty_alpha", "0.6"]
    linear = generation_config(parse_args([*base, "--contrastive_alpha", "linear", "--contrastive_alpha_min", "0.2"]),
                               "contrastive")
    assert linear.contrastive_alpha_min == 0.2 and not linear.contrastive_dynamic_alpha
    for flags in (["--contrastive_dynamic_alpha"], ["--contrastive_alpha", "entropy"]):
        cfg = generation_config(parse_args([*base, *flags]), "contrastive")
        assert cfg.contrastive_dynamic_alpha and cfg.contrastive_alpha_min is None
    default = generation_config(parse_args(base), "contrastive")
    assert not default.contrastive_dynamic_alpha and default.contrastive_alpha_min is None
    for bad in (["--contrastive_dynamic_alpha", "--contrastive_alpha", "linear"],
                ["--contrastive_alpha", "linear", "--contrastive_alpha_min", "0.8"]):
        with pytest.raises(SystemExit) as e:
            parse_args([*base, *bad])
        assert e.value.code == 2
    assert "contrastive_alpha_min must be in [0, penalty_alpha=0.6]" in capsys.readouterr().err
