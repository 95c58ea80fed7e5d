"""LoRA and DoRA on a frozen int8 base (``apply_lora(base_layer=decoding.quant.Int8Linear.from_linear)``):
gradients reach the adapters only, the output is close to LoRA on the float base, and the base
holds a quarter of the float bytes."""

from __future__ import annotations

import copy

import pytest
import torch

from config import GPT2Config
from decoding.quant import Int8Linear
from methods.lora import LoRALinear, apply_lora, mark_only_lora_trainable
from models.gpt2 import GPT2Model


def model_of(seed: int = 0) -> GPT2Model:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=100, max_position_embeddings=32, hidden_size=64, num_hidden_layers=2,
                     num_attention_heads=4, initializer_range=0.05, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return GPT2Model(cfg)


def loss_of(model: GPT2Model, ids: torch.Tensor) -> torch.Tensor:
    h = model(ids)["last_hidden_state"]
    return model.hidden_state_to_token(h).float().logsumexp(-1).mean()


@pytest.mark.parametrize("use_dora", [False, True])
def test_int8_base_trains_the_adapters_only_and_stays_close_to_float_lora(use_dora: bool) -> None:
    ids = torch.randint(0, 100, (2, 10))
    float_lora = model_of()
    quant_lora = copy.deepcopy(float_lora)
    apply_lora(float_lora, r=4, use_dora=use_dora)
    apply_lora(quant_lora, r=4, use_dora=use_dora, base_layer=Int8Linear.from_linear)
    n_float = mark_only_lora_trainable(float_lora)
    n_quant = mark_only_lora_trainable(quant_lora)
    assert n_quant == n_float > 0
    bases = [m.base for m in quant_lora.modules() if isinstance(m, LoRALinear)]
    assert len(bases) == 8 and all(isinstance(b, Int8Linear) and b.q.dtype == torch.int8 for b in bases)
    with torch.no_grad():  # B is zero at the start: both are their base model, int8 rounding apart
        for a, b in zip(float_lora.modules(), quant_lora.modules()):
            if isinstance(a, LoRALinear):
                torch.nn.init.normal_(a.lora_B, std=0.02)
                b.lora_B.copy_(a.lora_B)
                b.lora_A.copy_(a.lora_A)
        ref = float_lora(ids)["last_hidden_state"]
        got = quant_lora(ids)["last_hidden_state"]
    assert (got - ref).norm() / ref.norm() < 0.02
    loss_of(quant_lora, ids).backward()
    for name, p in quant_lora.named_parameters():
        if "lora_" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    assert all(b.q.grad is None and not b.q.requires_grad for b in bases)
    opt = torch.optim.SGD([p for p in quant_lora.parameters() if p.requires_grad], lr=0.5)
    q_before = [b.q.clone() for b in bases]
    before = loss_of(quant_lora, ids).item()
    for _ in range(5):
        opt.zero_grad()
        loss_of(quant_lora, ids).backward()
        opt.step()
    assert loss_of(quant_lora, ids).item() < before  # the adapters learn
    assert all(torch.equal(a, b.q) for a, b in zip(q_before, bases))  # the base does not move


def test_int8_base_holds_a_quarter_of_the_bytes_and_cannot_merge() -> None:
    lin = torch.nn.Linear(64, 96)
    base = Int8Linear.from_linear(lin)
    assert base.q.numel() * base.q.element_size() * 4 == lin.weight.numel() * lin.weight.element_size()
    x = torch.randn(3, 64, requires_grad=True)
    base(x).sum().backward()
    torch.testing.assert_close(x.grad, base.weight.sum(0).expand(3, -1))  # d(sum(xW^T))/dx through the int8 weight
    wrapped = LoRALinear(base, r=2)
    with pytest.raises(TypeError, match="cannot merge"):
        wrapped.merge()
