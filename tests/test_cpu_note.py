"""The CPU cost note says what full fine-tuning of gpt2 costs on the CPU: it is printed where that
is true and useful (a sentiment run fully fine-tuning a gpt2-size model on the CPU), and nowhere
else (tiny models, head-only and LoRA runs, a GPU, a run already short, other tasks)."""

from __future__ import annotations

import pytest
import torch

import classifier
from engine.device import cpu_hint

GPT2_PARAMETERS = 124_443_648  # gpt2's body; a full-model classifier trains all of it and its head
TINY_PARAMETERS = 6_961_413  # what a full-model tiny classifier run prints


def test_the_note_for_full_fine_tuning_of_gpt2_on_the_cpu():
    note = cpu_hint(torch.device("cpu"), trainable_parameters=GPT2_PARAMETERS, train_examples=8544)
    assert note is not None and "\n" not in note
    assert "full fine-tuning of gpt2 takes about 0.35 s" in note
    assert "~50 min per epoch for 8,544 sentences" in note
    assert "--limit 64 --epochs 1" in note


@pytest.mark.parametrize("device,trainable,examples", [
    ("cpu", TINY_PARAMETERS, 8544),  # a tiny model: the estimate would be false
    ("cpu", 1_179_648, 8544),  # LoRA on gpt2
    ("cpu", 3_845, 8544),  # last-linear-layer on gpt2
    ("cpu", GPT2_PARAMETERS, 64),  # already a quick run (--limit 64): the advice is moot
    ("cuda", GPT2_PARAMETERS, 8544),  # on a GPU
    ("mps", GPT2_PARAMETERS, 8544),
])
def test_no_note_where_it_is_false_or_useless(device, trainable, examples):
    assert cpu_hint(torch.device(device), trainable_parameters=trainable, train_examples=examples) is None


def test_a_tiny_classifier_run_on_the_cpu_prints_no_note(classifier_cli, capsys, monkeypatch):
    """Through the real command, device auto on a machine without CUDA: the note used to be printed
    by every run that picked the CPU, a tiny random model's included."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    classifier.main(classifier_cli("full-model", "--dataset", "sst"))
    assert "running on the CPU" not in capsys.readouterr().err
