"""Speed features must not change results: compile fallback, gradient checkpointing,
length-grouped batching, and the chunked loss inside a real training step."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from config import GPT2Config
from engine.data import LengthGroupedSampler
from engine.device import maybe_compile
from methods.gradient_checkpointing import enable_gradient_checkpointing
from models.gpt2 import GPT2Model
from modules.losses import lm_loss


def padded_tokens(lengths: list[int], batch_order: list[int], batch_size: int) -> int:
    """Tokens a DataLoader would compute, padding each batch to its longest member;
    compare with ``sum(lengths)`` to see the padding a sampler costs."""
    total = 0
    for s in range(0, len(batch_order), batch_size):
        chunk = batch_order[s : s + batch_size]
        total += max(lengths[i] for i in chunk) * len(chunk)
    return total

def small_config(**kw) -> GPT2Config:
    base = dict(vocab_size=101, max_position_embeddings=32, hidden_size=32, num_hidden_layers=2,
                num_attention_heads=4)
    base.update(kw)
    return GPT2Config(**base)


def loss_and_grads(model: GPT2Model, ids: torch.Tensor, mask: torch.Tensor | None = None):
    model.zero_grad(set_to_none=True)
    h = model(ids, mask)["last_hidden_state"]
    loss = lm_loss(h[:, :-1], model.wte.weight, ids[:, 1:], chunk_size=7)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradient_checkpointing_changes_nothing(dropout: float) -> None:
    """Same loss and gradients with and without checkpointing, dropout included
    (checkpointing replays the RNG state when it recomputes a block)."""
    torch.manual_seed(0)
    cfg = small_config(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    model = GPT2Model(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    torch.manual_seed(1)
    loss_a, grads_a = loss_and_grads(model, ids, mask)
    enable_gradient_checkpointing(model)
    torch.manual_seed(1)
    loss_b, grads_b = loss_and_grads(model, ids, mask)
    assert torch.equal(loss_a, loss_b)
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, rtol=1e-6, atol=1e-7, msg=name)


def test_lm_loss_in_model_equals_full_logits_loss() -> None:
    torch.manual_seed(0)
    model = GPT2Model(small_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    ids = torch.randint(0, 101, (2, 10))
    loss, grads = loss_and_grads(model, ids)
    model.zero_grad(set_to_none=True)
    logits = model.hidden_state_to_token(model(ids)["last_hidden_state"])  # (B, T, V)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 101), ids[:, 1:].reshape(-1))
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-6, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-6, msg=n)


def failing_backend(gm, example_inputs):
    raise RuntimeError("no compiler here")


def test_compile_falls_back_to_eager_with_a_warning() -> None:
    torch.manual_seed(0)
    model = GPT2Model(small_config()).eval()
    ids = torch.randint(0, 101, (2, 6))
    with torch.no_grad():
        ref = model(ids)["last_hidden_state"]
        assert maybe_compile(model, backend=failing_backend) is model
        with pytest.warns(RuntimeWarning, match="torch.compile failed"):
            out = model(ids)["last_hidden_state"]
        torch.testing.assert_close(out, ref)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # later calls are eager and silent
            torch.testing.assert_close(model(ids)["last_hidden_state"], ref)
    assert "wte.weight" in model.state_dict()  # the module is untouched


def test_compile_disabled_is_a_no_op_and_caller_errors_propagate() -> None:
    model = GPT2Model(small_config())
    forward = model.forward
    assert maybe_compile(model, enabled=False).forward == forward
    maybe_compile(model, backend=failing_backend)
    too_long = torch.zeros(1, 40, dtype=torch.long)  # longer than max_position_embeddings
    with pytest.raises(ValueError, match="longer than the model's context"):
        model(too_long)


@pytest.mark.parametrize("n,batch_size,mult", [(103, 8, 4), (64, 8, 2), (5, 8, 50), (1, 1, 1)])
def test_length_grouped_sampler_covers_every_example_once(n: int, batch_size: int, mult: int) -> None:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 200, (n,), generator=g).tolist()
    sampler = LengthGroupedSampler(lengths, batch_size, mega_batch_mult=mult, generator=g)
    for _ in range(2):  # two epochs, two different orders
        order = list(sampler)
        assert sorted(order) == list(range(n))
        assert len(sampler) == n


def test_length_grouped_sampler_cuts_padding_and_puts_longest_first() -> None:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 300, (800,), generator=g).tolist()
    grouped = list(LengthGroupedSampler(lengths, 16, mega_batch_mult=10, generator=g))
    shuffled = torch.randperm(800, generator=g).tolist()
    assert padded_tokens(lengths, grouped, 16) < 0.8 * padded_tokens(lengths, shuffled, 16)
    assert max(lengths[i] for i in grouped[:16]) == max(lengths)


def test_length_grouped_sampler_resumes_from_its_generator() -> None:
    """The trainer restores ``sampler.generator`` to replay an interrupted epoch."""
    lengths = list(range(50))
    sampler = LengthGroupedSampler(lengths, 4, generator=torch.Generator().manual_seed(3))
    state = sampler.generator.get_state()
    first = list(sampler)
    sampler.generator.set_state(state)
    assert list(sampler) == first
    with pytest.raises(ValueError, match="batch_size"):
        LengthGroupedSampler(lengths, 0)
