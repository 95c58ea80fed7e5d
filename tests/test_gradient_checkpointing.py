"""Gradient checkpointing (``methods.gradient_checkpointing``): the same loss and gradients as
without it, the blocks really recomputed in the backward pass, and only while training without
a cache; the weights and their names are the model's own."""

from __future__ import annotations

import pytest
import torch

from config import GPT2Config
from methods.gradient_checkpointing import CheckpointedLayer, enable_gradient_checkpointing
from methods.lora import LoRALinear, apply_lora
from methods.sparse_attention import SparseAttention, SparseCausalSelfAttention, apply_sparse_attention
from models.gpt2 import GPT2Model
from models.sonnet_gpt import SonnetGPT


def model(dropout: float = 0.1) -> GPT2Model:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=101, max_position_embeddings=32, hidden_size=32, num_hidden_layers=3,
                     num_attention_heads=4, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return GPT2Model(cfg).train()


def count_block_calls(gpt: GPT2Model) -> list[int]:
    """One counter of the blocks' forward calls: a pre-hook on each block's first LayerNorm, which
    fires again when a block is recomputed (recomputation stops once the tensors it needs exist)."""
    calls = [0]
    for block in gpt.h:
        block.ln_1.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def loss_and_grads(lm: SonnetGPT, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
    lm.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout draws on both sides
    loss = lm.loss(ids, mask)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in lm.named_parameters()}


@pytest.mark.parametrize("sparse", [False, True])
def test_same_gradients_and_blocks_really_recomputed(sparse: bool) -> None:
    gpt = model()
    if sparse:
        apply_sparse_attention(gpt, SparseAttention("window", window=4))
    lm = SonnetGPT(gpt)
    ids = torch.randint(0, 101, (3, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    keys = list(lm.state_dict())
    loss_a, grads_a = loss_and_grads(lm, ids, mask)

    assert enable_gradient_checkpointing(lm) is lm
    assert all(type(b) is CheckpointedLayer for b in gpt.h) and list(lm.state_dict()) == keys
    assert all(isinstance(b.attn, SparseCausalSelfAttention) == sparse for b in gpt.h)
    calls = count_block_calls(gpt)
    torch.manual_seed(1)
    loss = lm.loss(ids, mask)
    assert calls[0] == 3  # the forward pass: once per block
    lm.zero_grad(set_to_none=True)
    loss.backward()
    assert calls[0] == 6  # the backward pass ran every block again

    loss_b, grads_b = loss_and_grads(lm, ids, mask)
    assert torch.equal(loss_a, loss_b)
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, rtol=1e-6, atol=1e-7, msg=name)


def test_only_while_training_without_a_cache_and_lora_still_wraps(monkeypatch) -> None:
    import methods.gradient_checkpointing as gc

    used = []
    real = gc.checkpoint
    monkeypatch.setattr(gc, "checkpoint", lambda fn, *a, **kw: used.append(kw) or real(fn, *a, **kw))
    gpt = enable_gradient_checkpointing(model(dropout=0.0))
    apply_lora(gpt, ("attn.c_attn",), r=2)
    assert isinstance(gpt.h[0].attn.c_attn, LoRALinear)
    ids = torch.randint(0, 101, (2, 6))
    with torch.no_grad():
        gpt(ids, cache=gpt.new_cache(2, 6))  # decoding while training: no checkpoint
    assert used == []
    gpt(ids)["last_hidden_state"].sum().backward()
    assert used == [{"use_reentrant": False}] * 3
    gpt.eval()
    gpt(ids)
    assert len(used) == 3
    with pytest.raises(TypeError, match="gradient checkpointing needs a GPT2Model"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))
