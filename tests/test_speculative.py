"""Speculative decoding (``decoding.speculative``): greedy tokens identical to the target's own
greedy decoding, samples distributed as the target's (a chi-square test against the exact
distribution), and the KV cache rolled back to the accepted length."""

from __future__ import annotations

import copy
import itertools
import runpy
import sys
from pathlib import Path

import pytest
import torch

import generate as cli
from config import GPT2Config, get_config
from decoding.inference import prepare_for_inference
from decoding.speculative import PrunedDraft, SpeculativeStats, frequent_tokens, speculative_generate, truncate_cache
from methods.restore import save_model
from methods.sparse_attention import RingKVCache, SparseAttention
from models.decoding import logits_processors
from models.generation import generate
from models.generation_config import GenerationConfig
from models.gpt2 import GPT2Model


def tiny(seed: int, vocab: int = 300, d: int = 64, layers: int = 2, init: float = 0.2) -> GPT2Model:
    """A large init range makes next-token distributions peaked, so argmax never hinges on float noise."""
    torch.manual_seed(seed)
    return GPT2Model(GPT2Config(vocab_size=vocab, max_position_embeddings=64, hidden_size=d, num_hidden_layers=layers,
                                num_attention_heads=4, initializer_range=init)).eval()


def noisy_copy(model: GPT2Model, scale: float, seed: int) -> GPT2Model:
    """A draft that agrees with the target often but not always."""
    draft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(scale * p.std() * torch.randn(p.shape, generator=g))
    return draft


@pytest.fixture(scope="module")
def target() -> GPT2Model:
    return tiny(0)


PROMPTS = [torch.randint(1, 300, (1, n), generator=torch.Generator().manual_seed(n)) for n in (1, 5, 9)]


@pytest.mark.parametrize("settings", [{}, {"repetition_penalty": 1.3}, {"no_repeat_ngram_size": 2}])
def test_greedy_tokens_are_the_targets_own(target, settings):
    noisy = noisy_copy(target, 0.5, 1)
    drafts = {"noisy": noisy, "other": tiny(7, d=32, layers=1),
              "pruned": PrunedDraft(noisy, noisy.wte.weight, torch.arange(0, 300, 2))}  # proposes even ids only
    config = GenerationConfig(max_new_tokens=24, **settings)
    stats = {name: SpeculativeStats() for name in drafts}
    for (name, draft), k, ids in itertools.product(drafts.items(), (1, 4), PROMPTS[1:]):
        out = speculative_generate(target, draft, ids, config=config, k=k, stats=stats[name])
        assert torch.equal(out, generate(target, ids, config=config)), (name, k)
    assert stats["noisy"].generated == 4 * 24 and 0 < stats["noisy"].acceptance_rate < 1  # both paths taken
    assert 0 < stats["pruned"].acceptance_rate < 1
    assert frequent_tokens(torch.tensor([[5, 3, 5], [3, 5, 1]]), 2, 300).tolist() == [3, 5]


def test_the_target_as_its_own_draft_accepts_everything(target):
    for do_sample in (False, True):
        stats = SpeculativeStats()
        config = GenerationConfig(max_new_tokens=20, do_sample=do_sample, top_k=50 if do_sample else 0)
        out = speculative_generate(target, copy.deepcopy(target), PROMPTS[1], config=config, k=4, stats=stats,
                                   generator=torch.Generator().manual_seed(0))
        assert stats.acceptance_rate == 1.0 and stats.target_forwards == 4 and out.shape == (1, 25)
        if not do_sample:
            assert torch.equal(out, generate(target, PROMPTS[1], config=config))


def test_eos_left_padding_and_prepared_models(target):
    ids = PROMPTS[2]
    free = generate(target, ids, max_new_tokens=30)[0, 9:]
    eos = int(free[free.unique(return_counts=True)[1].argmax()])  # a token greedy decoding emits
    config = GenerationConfig(max_new_tokens=30, eos_token_id=eos)
    draft = noisy_copy(target, 0.5, 2)
    expected = generate(target, ids, config=config)
    assert expected.size(1) < 39  # the row really ends at EOS
    assert torch.equal(speculative_generate(target, draft, ids, config=config, k=3), expected)
    padded = torch.cat([torch.full((1, 3), eos), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], 1)
    out = speculative_generate(target, draft, padded, mask, config=config, k=3)
    assert torch.equal(out, generate(target, padded, mask, config=config))
    fast = speculative_generate(prepare_for_inference(target), prepare_for_inference(draft), ids, config=config, k=3)
    assert torch.equal(fast, expected)
    pruned = PrunedDraft(prepare_for_inference(draft), draft.wte.weight, torch.arange(0, 300, 2))  # stays in eval
    assert torch.equal(speculative_generate(target, pruned, ids, config=config, k=3), expected)


def test_refusals(target):
    config = GenerationConfig(max_new_tokens=4)
    with pytest.raises(ValueError, match="batch 1"):
        speculative_generate(target, target, torch.ones(2, 3, dtype=torch.long), config=config)
    with pytest.raises(ValueError, match="target's tokenizer"):
        speculative_generate(target, tiny(1, vocab=299), PROMPTS[0], config=config)
    with pytest.raises(ValueError, match="not beam"):
        speculative_generate(target, target, PROMPTS[0], config=GenerationConfig(max_new_tokens=4, num_beams=2))
    with pytest.raises(ValueError, match="KV cache"):
        speculative_generate(target, target, PROMPTS[0], config=GenerationConfig(max_new_tokens=4, use_cache=False))


def test_rolled_back_cache_continues_like_a_fresh_one(target):
    """Positions cut off by a rejection leave no trace: feeding other tokens after the cut gives
    the logits of a fresh forward over the new sequence."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 300, (1, 10), generator=g)
    cache = target.new_cache(1, 16)
    with torch.no_grad():
        target(ids, cache=cache)
        truncate_cache(cache, 6)
        assert cache.length == 6
        other = torch.randint(0, 300, (1, 5), generator=g)
        h = target(other, cache=cache)["last_hidden_state"]
        fresh = target(torch.cat([ids[:, :6], other], 1))["last_hidden_state"][:, 6:]
    torch.testing.assert_close(h, fresh, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="cannot truncate"):
        truncate_cache(cache, 12)
    ring = RingKVCache(target.config, 1, 16, "cpu", torch.float32, SparseAttention("window", window=4))
    with pytest.raises(ValueError, match="cannot be rolled back"):
        truncate_cache(ring, 0)


def exact_distribution(model: GPT2Model, prompt: torch.Tensor, new: int, config: GenerationConfig) -> torch.Tensor:
    """P(x_1 .. x_new | prompt) under ``model`` and the processed scores, for every continuation
    (V ** new,), by one forward over all of them."""
    V = model.config.vocab_size
    conts = torch.tensor(list(itertools.product(range(V), repeat=new)))  # (V ** new, new), lexicographic
    seqs = torch.cat([prompt.expand(conts.size(0), -1), conts], 1)
    P = prompt.size(1)
    process = logits_processors(config, None)
    with torch.no_grad():
        logits = model.hidden_state_to_token(model(seqs)["last_hidden_state"][:, P - 1 : -1]).float()  # (N, new, V)
    probs = torch.ones(conts.size(0))
    for t in range(new):
        scores = logits[:, t] if process is None else process(logits[:, t], seqs[:, : P + t])
        probs *= scores.softmax(-1).gather(1, conts[:, t : t + 1])[:, 0]
    return probs


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's goodness-of-fit p-value, cells expecting fewer than 5 draws pooled into one."""
    expected = probs.double() * counts.sum()
    assert counts[expected == 0].sum() == 0  # no draw where the target puts no mass (top-k)
    small = expected < 5
    obs = torch.cat([counts[~small].double(), counts[small].double().sum(0, keepdim=True)])
    exp = torch.cat([expected[~small], expected[small].sum(0, keepdim=True)])
    obs, exp = obs[exp > 0], exp[exp > 0]
    stat = ((obs - exp) ** 2 / exp).sum()
    return float(torch.special.gammaincc(torch.tensor((obs.numel() - 1) / 2.0, dtype=torch.float64), stat / 2))


@pytest.mark.parametrize("settings, pruned", [({}, False), ({"temperature": 0.7, "top_k": 3}, False), ({}, True)])
def test_sampling_follows_the_targets_distribution(settings, pruned):
    """Three tokens on a 4-token vocabulary with k = 2, so the draws go through rejections at each
    position, full acceptance with the target's bonus token, and a shorter second round; pruned: a
    draft that never proposes token 3, which the target still samples (through the residual). The
    p-value threshold is 0.001 (seeds fixed, so the outcome is too); sampling the draft itself
    instead fails the same test, so the test can tell the two distributions apart."""
    V, new, draws = 4, 3, 1500
    target, draft = tiny(0, vocab=V, d=16, layers=1, init=0.5), tiny(5, vocab=V, d=8, layers=1, init=0.5)
    if pruned:
        draft = PrunedDraft(draft, draft.wte.weight, torch.tensor([0, 1, 2]))
    prompt = torch.tensor([[1, 2]])
    config = GenerationConfig(max_new_tokens=new, do_sample=True, **settings)
    probs = exact_distribution(target, prompt, new, config)
    g = torch.Generator().manual_seed(0)
    codes = torch.zeros(V ** new, dtype=torch.long)
    for _ in range(draws):
        out = speculative_generate(target, draft, prompt, config=config, k=2, generator=g)[0, 2:]
        codes[int((out * V ** torch.arange(new - 1, -1, -1)).sum())] += 1
    assert chi_square_p(codes, probs) > 1e-3
    plain = generate(tiny(5, vocab=V, d=8, layers=1, init=0.5), prompt.expand(draws, -1), config=config,
                     generator=g)[:, 2:]
    draft_counts = torch.bincount((plain * V ** torch.arange(new - 1, -1, -1)).sum(1), minlength=V ** new)
    with pytest.raises(AssertionError):  # the draft's own samples: another distribution
        assert chi_square_p(draft_counts, probs) > 1e-3


def test_generate_cli_with_a_draft_model(tmp_path, capsys):
    """``--draft_model``: the completions of the target alone (greedy), one acceptance line on
    stderr; the combinations it cannot run, and a draft with another vocabulary, are refused."""
    torch.manual_seed(0)
    target = GPT2Model(get_config("tiny", initializer_range=0.2)).eval()
    paths = {name: tmp_path / f"{name}.pt" for name in ("target", "draft", "other")}
    save_model(target, paths["target"], task="test")
    save_model(noisy_copy(target, 0.5, 1), paths["draft"], task="test")
    save_model(GPT2Model(get_config("tiny", vocab_size=1000)), paths["other"], task="test")
    argv = ["--model", str(paths["target"]), "--prompt", "Shall I compare thee", "--prompt", "The rose",
            "--max_new_tokens", "12", "--no_eos"]
    plain = cli.main(argv)
    capsys.readouterr()
    assert cli.main(argv + ["--draft_model", str(paths["draft"]), "--draft_k", "3"]) == plain
    err = capsys.readouterr().err
    assert "speculative decoding:" in err and "acceptance rate" in err
    for flags in (["--num_beams", "2"], ["--draft_k", "0"], ["--no_cache"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv + ["--draft_model", str(paths["draft"]), *flags])
        assert e.value.code == 2 and "--draft" in capsys.readouterr().err
    with pytest.raises(ValueError, match="target's tokenizer"):
        cli.main(argv + ["--draft_model", str(paths["other"])])


def test_speed_benchmark_runs(tmp_path, capsys, monkeypatch):
    """``benchmarks/speculative_speed.py`` on a tiny random target and its first layer as the draft."""
    path = tmp_path / "target.pt"
    save_model(tiny(0, vocab=50257, d=32, layers=2), path, task="test")
    text = tmp_path / "prompts.txt"
    text.write_text("Shall I compare thee to a summer's day?\nThou art more lovely and more temperate.\n")
    monkeypatch.setattr(sys, "argv", ["speculative_speed.py", "--target", str(path), "--draft_layers", "1",
                                      "--prompts_file", str(text), "--num_prompts", "2", "--new_tokens", "4",
                                      "--ks", "2", "--repeats", "1", "--draft_vocab", "20", "--clock", "cpu"])
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "benchmarks" / "speculative_speed.py"),
                   run_name="__main__")
    out = capsys.readouterr().out
    assert out.count("| yes |") == 2 and "| NO |" not in out and "draft head 20 tokens" in out
