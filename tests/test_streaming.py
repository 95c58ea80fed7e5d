"""Streaming a completion (``GenerationConfig.on_token``, ``decoding.streaming``): the hook sees every step
and changes no token, and the text pieces join to exactly the text of the finished row."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from config import get_config
from decoding.mbr import member_config
from decoding.streaming import TextStream, stream_pieces
from models.generation import generate, trim
from models.generation_config import GenerationConfig
from models.gpt2 import GPT2Model
from models.loading import load_tokenizer

CONFIGS = {"greedy": GenerationConfig(max_new_tokens=24),
           "sample": GenerationConfig(max_new_tokens=24, do_sample=True, temperature=0.9, top_p=0.9),
           "contrastive": GenerationConfig(max_new_tokens=24, penalty_alpha=0.6, top_k=4)}


@pytest.fixture(scope="module")
def model() -> GPT2Model:
    torch.manual_seed(0)
    return GPT2Model(get_config("tiny")).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None, verbose=False)


@pytest.mark.parametrize("strategy", CONFIGS)
def test_the_hook_sees_each_step_and_changes_no_token(strategy, model):
    ids = torch.tensor([[464, 3290, 318], [50256, 1212, 318]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    config = CONFIGS[strategy]
    plain = generate(model, ids, mask, config=config, generator=torch.Generator().manual_seed(3))
    seen = []
    hooked = dataclasses.replace(config, on_token=lambda seqs: seen.append(seqs.clone()))
    streamed = generate(model, ids, mask, config=hooked, generator=torch.Generator().manual_seed(3))
    assert torch.equal(plain, streamed)
    assert [s.size(1) for s in seen] == list(range(ids.size(1) + 1, streamed.size(1) + 1))  # one call a step
    assert torch.equal(seen[-1], streamed)


def test_beam_search_and_speculative_decoding_refuse_the_hook(model):
    with pytest.raises(ValueError, match="beam search reorders"):
        GenerationConfig(max_new_tokens=4, num_beams=2, on_token=print)
    assert member_config(GenerationConfig(max_new_tokens=4, on_token=print), "beam", 2).on_token is None  # MBR


@pytest.mark.parametrize("strategy", CONFIGS)
def test_the_pieces_join_to_the_final_text(strategy, model, tokenizer):
    prompt = "Shall I compare thee to a summer’s day?\n"  # a curly quote: one character, several byte tokens
    ids = torch.tensor([tokenizer.encode(prompt)])
    eos = tokenizer.eos_token_id
    text = TextStream(tokenizer.decode, eos)
    config = dataclasses.replace(CONFIGS[strategy], eos_token_id=eos, on_token=text)

    def run(config: GenerationConfig) -> str:
        rows = generate(model, ids, config=config, generator=torch.Generator().manual_seed(5))
        return tokenizer.decode(trim(rows[0], ids.size(1), 0, eos))

    pieces = list(stream_pieces(text, lambda: run(config)))
    assert len(pieces) > 2 and pieces[0].startswith(prompt)
    assert "".join(pieces) == run(dataclasses.replace(config, on_token=None))


def test_the_decoding_error_reaches_the_reader(tokenizer):
    text = TextStream(tokenizer.decode, None)

    def fail() -> str:
        raise ValueError("bad setting")

    with pytest.raises(ValueError, match="bad setting"):
        list(stream_pieces(text, fail))


def test_closing_the_reader_stops_the_decoding(model, tokenizer):
    ids = torch.tensor([tokenizer.encode("Shall I compare thee")])
    text = TextStream(tokenizer.decode, None)
    steps = []

    def hook(seqs: torch.Tensor) -> None:
        steps.append(seqs.size(1))
        text(seqs)

    config = GenerationConfig(max_new_tokens=400, on_token=hook)
    reader = stream_pieces(text, lambda: tokenizer.decode(generate(model, ids, config=config)[0].tolist()))
    next(reader)
    reader.close()
    text.thread.join(timeout=10)
    assert not text.thread.is_alive()
    assert len(steps) < 400  # stopped at the step after the close, not at max_new_tokens
