"""sonnet_generation.py --dpo: prompts from training sonnets, sampling, ranking, and a run end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch

import sonnet_generation
import tasks.sonnet
from config import get_config
from methods.dpo import PreferencePair, disable_dropout, encode_pair
from methods.restore import load_model, save_model
from models.generation import LineStop
from models.generation_config import GenerationConfig
from models.gpt2 import GPT2Model
from models.sonnet_gpt import SonnetGPT
from tasks.course_data import read_sonnets
from tasks.lm import EOS_TEXT
from tasks.sonnet_dpo import (
    RANKINGS,
    prompts_and_continuations,
    sample_completions,
    score_completions,
)
from tests.conftest import SHARED_DATA, sonnet_data_flags


def test_prompts_are_the_first_three_lines_and_the_rest_is_the_reference():
    texts = [s.text for s in read_sonnets(SHARED_DATA / "sonnets.txt", 3)] + ["Only\ntwo lines"]
    prompts, rest = prompts_and_continuations(texts)
    assert len(prompts) == 3  # a sonnet with nothing after its prompt gives no prompt
    for t, p, r in zip(texts, prompts, rest):
        assert p.count("\n") == 2 and p + r == t and r.startswith("\n")


def test_samples_are_grouped_per_prompt_and_empty_ones_dropped():
    calls = []

    def complete(prompts):
        calls.append(list(prompts))
        return [p + ("" if i == 3 else f" take {i}") for i, p in enumerate(prompts)]

    got = sample_completions(complete, ["A", "B"], 2)
    assert calls == [["A", "A", "B", "B"]]  # one batched decode
    assert got == [[" take 0", " take 1"], [" take 2"]]


def test_ranking_by_chrf_and_by_form():
    prompts, rest = prompts_and_continuations([s.text for s in read_sonnets(SHARED_DATA / "sonnets.txt", 1)])
    junk = "\nthe the the the the the"
    (chrf_scores,) = score_completions(prompts, rest, [[junk, rest[0]]], "chrf")
    assert chrf_scores[1] == pytest.approx(100.0) and chrf_scores[0] < 20
    (form,) = score_completions(prompts, rest, [[junk, rest[0]]], "form")
    assert form[1] > 0.8 > form[0]  # the true sonnet has the form, three lines and junk do not
    (nothing,) = score_completions(prompts, rest, [["\n"]], "form")
    assert nothing == [0.0]  # the prompt alone earns no form: only the generated lines are scored
    with pytest.raises(ValueError, match="rank"):
        score_completions(prompts, rest, [[junk]], "bleu")


def test_continuations_keep_the_eos_the_model_ended_with_and_only_that(tokenizer, monkeypatch):
    """A row ended with EOS keeps it; one cut at max_new_tokens, or ended by the stop rule (then
    padded with EOS, the pad token), has none; without ``keep_eos`` every row is cut as before."""
    eos, nl = tokenizer.eos_token_id, tokenizer.encode("\n")[0]
    a, b = tokenizer.encode(" rose")[0], tokenizer.encode(" thee")[0]
    new = [[a, b, eos, eos], [a, b, a, b], [a, nl, eos, eos], [b, eos, eos, eos]]

    def fake_generate(gpt, x, mask, config, generator):
        assert config.max_new_tokens == 4
        return torch.cat([x, torch.tensor(new[: x.size(0)])], 1)

    monkeypatch.setattr(tasks.sonnet, "generate", fake_generate)
    gpt = GPT2Model(get_config("tiny"))
    config = GenerationConfig(max_new_tokens=4, eos_token_id=eos, stop=LineStop(tokenizer, 1))
    prompts = ["Shall I compare thee", "Thou art", "Rough winds do shake", "So long"]
    got = tasks.sonnet.continue_prompts(gpt, tokenizer, prompts, config, batch_size=4, keep_eos=True)
    assert [p for p, _ in got] == [tokenizer.encode(p) for p in prompts]
    assert [c for _, c in got] == [[a, b, eos], [a, b, a, b], [a, nl], [b, eos]]
    plain = tasks.sonnet.continue_prompts(gpt, tokenizer, prompts, config, batch_size=4)
    assert [c for _, c in plain] == [[a, b], [a, b, a, b], [a, nl], [b]]
    # Through the DPO pipeline: the ended completion is scored with its EOS, the cut one without.
    text = tokenizer.decode(got[0][0] + got[0][1])
    assert text.endswith(tokenizer.eos_token)
    pair = PreferencePair(0, prompts[0], text[len(prompts[0]):], tokenizer.decode(got[1][1]), 1.0, 0.0)
    ex = encode_pair(tokenizer, pair, 64)
    assert ex["chosen_input_ids"][-3:] == [a, b, eos] and ex["chosen_completion_mask"][-3:] == [1, 1, 1]
    assert eos not in ex["rejected_input_ids"]


def test_ranking_ignores_the_eos_that_marks_a_finished_completion():
    prompts, rest = prompts_and_continuations([s.text for s in read_sonnets(SHARED_DATA / "sonnets.txt", 1)])
    for rank in RANKINGS:
        (scores,) = score_completions(prompts, rest, [[rest[0] + EOS_TEXT, rest[0]]], rank)
        assert scores[0] == scores[1], rank
    calls = [p + x for p, x in (("A", EOS_TEXT), ("A", " end" + EOS_TEXT))]
    assert sample_completions(lambda ps: calls, ["A"], 2) == [[" end" + EOS_TEXT]]  # nothing generated: dropped


def test_disable_dropout_makes_training_mode_deterministic():
    torch.manual_seed(0)
    model = SonnetGPT(GPT2Model(get_config("tiny", hidden_dropout_prob=0.5, attention_probs_dropout_prob=0.5)))
    x = torch.randint(0, 1000, (2, 8))
    model.train()
    assert not torch.equal(model(x, torch.ones_like(x)), model(x, torch.ones_like(x)))
    disable_dropout(model)
    assert torch.equal(model(x, torch.ones_like(x)), model(x, torch.ones_like(x)))


def test_dpo_cli_starts_at_log_2_trains_and_writes_the_files(tmp_path):
    torch.manual_seed(0)
    start = GPT2Model(get_config("tiny"))  # dropout 0.1: --dpo must switch it off for the log 2 start
    save_model(start, tmp_path / "sonnet-model.pt")
    result = sonnet_generation.main([
        "--dpo", "--checkpoint", str(tmp_path / "sonnet-model.pt"), "--dpo_samples", "2", "--epochs", "1",
        "--limit", "3", "--batch_size", "8", "--lr", "1e-3", "--max_new_tokens", "8", "--max_length", "64",
        "--device", "cpu", *sonnet_data_flags(tmp_path)])
    run = tmp_path / "run"
    steps = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == "step"]
    assert steps[0]["step"] == 1 and steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    pairs = [json.loads(x) for x in (run / "dpo_pairs.jsonl").read_text().splitlines()]
    assert 1 <= len(pairs) <= 3 and all(p["chosen_score"] > p["rejected_score"] for p in pairs)
    assert all(p["prompt"].count("\n") == 2 and p["chosen"] != p["rejected"] for p in pairs)
    tuned = load_model(run / "sonnet-model.pt")
    assert not torch.equal(tuned.wte.weight, start.wte.weight)  # the policy moved
    for name in ("generated_sonnets.txt", "generated_sonnets_dev.txt"):
        assert len(read_sonnets(tmp_path / "pred" / name)) == 3
    assert (run / "form.json").exists() and result["dev"] and "loss" in result["best"]


@pytest.mark.parametrize("bad", [["--dpo"], ["--dpo", "--checkpoint", "m.pt", "--dpo_samples", "1"],
                                 ["--dpo", "--checkpoint", "m.pt", "--dpo_beta", "0"],
                                 ["--dpo", "--checkpoint", "m.pt", "--dpo_rank", "bleu"],
                                 ["--dpo", "--checkpoint", "m.pt", "--random_init"],
                                 ["--dpo", "--checkpoint", "m.pt", "--generate_only"],
                                 ["--dpo", "--checkpoint", "m.pt", "--epochs", "0"]])
def test_dpo_flags_are_checked_while_parsing(bad):
    with pytest.raises(SystemExit):
        sonnet_generation.get_args(bad)


def test_dpo_with_prompts_longer_than_max_length_is_a_clear_error(tmp_path):
    from engine.data import DataFormatError

    torch.manual_seed(0)
    save_model(GPT2Model(get_config("tiny")), tmp_path / "sonnet-model.pt")
    with pytest.raises(DataFormatError, match="no room for a completion.*raise --max_length"):
        sonnet_generation.main(["--dpo", "--checkpoint", str(tmp_path / "sonnet-model.pt"), "--dpo_samples", "2",
                                "--epochs", "1", "--limit", "2", "--max_new_tokens", "4", "--max_length", "8",
                                "--device", "cpu", *sonnet_data_flags(tmp_path)])
