"""DPO pairs by corruption (``--dpo_rejected shuffled|truncated``): the true continuation against its
lines shuffled or cut, deterministic under a seed, and a run through the real CLI."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

import sonnet_generation
from config import get_config
from methods.restore import save_model
from models.gpt2 import GPT2Model
from tasks.course_data import read_sonnets
from tasks.lm import EOS_TEXT
from tasks.sonnet_dpo import corrupt, corruption_pairs, prompts_and_continuations
from tests.conftest import SHARED_DATA, sonnet_data_flags


@pytest.fixture(scope="module")
def sonnets() -> tuple[list[str], list[str]]:
    return prompts_and_continuations([s.text for s in read_sonnets(SHARED_DATA / "sonnets.txt", 20)])


def lines(text: str) -> list[str]:
    return text.removesuffix(EOS_TEXT).strip("\n").split("\n")


def test_shuffled_is_the_same_lines_in_another_order(sonnets):
    prompts, rest = sonnets
    pairs = corruption_pairs(prompts, rest, "shuffled", seed=3)
    assert len(pairs) == len(prompts)
    for p, r in zip(pairs, rest):
        assert p.chosen == r + EOS_TEXT and p.rejected.endswith(EOS_TEXT) and p.rejected != p.chosen
        assert p.rejected.startswith("\n") and sorted(lines(p.rejected)) == sorted(lines(p.chosen))
        assert (p.chosen_score, p.rejected_score) == (1.0, 0.0)


def test_truncated_is_a_proper_prefix_of_whole_lines(sonnets):
    prompts, rest = sonnets
    pairs = corruption_pairs(prompts, rest, "truncated", seed=3)
    kept = set()
    for p in pairs:
        whole, cut = lines(p.chosen), lines(p.rejected)
        assert 1 <= len(cut) < len(whole) and cut == whole[:len(cut)]
        kept.add(len(cut))
    assert len(kept) > 1  # the cut point is drawn, not fixed


@pytest.mark.parametrize("kind", ["shuffled", "truncated"])
def test_the_same_seed_gives_the_same_pairs_another_seed_others(sonnets, kind):
    prompts, rest = sonnets
    assert corruption_pairs(prompts, rest, kind, 5) == corruption_pairs(prompts, rest, kind, 5)
    assert corruption_pairs(prompts, rest, kind, 5) != corruption_pairs(prompts, rest, kind, 6)


def test_what_cannot_be_corrupted_is_skipped():
    rng = random.Random(0)
    assert corrupt("\nonly one line", "shuffled", rng) is None
    assert corrupt("\nsame\nsame", "shuffled", rng) is None and corrupt("\nsame\nsame", "truncated", rng) == "\nsame"
    assert corrupt("\na\nb", "shuffled", rng) == "\nb\na"
    assert [p.prompt_index for p in corruption_pairs(["p", "q"], ["\none", "\nx\ny"], "shuffled", 0)] == [1]
    with pytest.raises(ValueError, match="kind must be one of"):
        corrupt("\na\nb", "sampled", rng)


def test_dpo_cli_with_corrupted_pairs_starts_at_log_2_and_samples_nothing(tmp_path, monkeypatch):
    torch.manual_seed(0)
    save_model(GPT2Model(get_config("tiny")), tmp_path / "sonnet-model.pt")
    monkeypatch.setattr("tasks.sonnet_dpo.sample_completions", lambda *a: pytest.fail("sampled"))
    sonnet_generation.main([
        "--dpo", "--dpo_rejected", "truncated", "--checkpoint", str(tmp_path / "sonnet-model.pt"), "--epochs", "1",
        "--limit", "3", "--batch_size", "8", "--lr", "1e-3", "--max_new_tokens", "4", "--max_length", "64",
        "--seed", "7", "--device", "cpu", *sonnet_data_flags(tmp_path)])
    run = tmp_path / "run"
    steps = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == "step"]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    pairs = [json.loads(x) for x in (run / "dpo_pairs.jsonl").read_text().splitlines()]
    prompts, rest = prompts_and_continuations([s.text for s in read_sonnets(SHARED_DATA / "sonnets.txt", 3)])
    assert pairs == [p.__dict__ for p in corruption_pairs(prompts, rest, "truncated", 7)]
