"""LoRA: zero-initialised adapters leave the model unchanged, merging does not change outputs,
and only adapters and the head train and are saved."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from config import GPT2Config
from models.gpt2 import GPT2Model
from models.heads import GPT2SentimentClassifier
from modules.lora import (
    LoRALinear,
    apply_lora,
    lora_state_dict,
    mark_only_lora_trainable,
    merge_lora,
    unmerge_lora,
    unwrap_lora,
)


def small_model() -> GPT2SentimentClassifier:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=100, max_position_embeddings=32, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return GPT2SentimentClassifier(GPT2Model(cfg), num_labels=3, hidden_dropout_prob=0.0).eval()


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 100, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # one right-padded row
    return ids, mask


def randomize_b(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.1)


def test_init_and_scaling():
    m = LoRALinear(nn.Linear(8, 5), r=4, alpha=12, dropout=0.1)
    assert m.scaling == 3.0
    assert m.lora_A.shape == (4, 8) and m.lora_B.shape == (5, 4)
    assert torch.count_nonzero(m.lora_B) == 0 and torch.count_nonzero(m.lora_A) == 32
    bound = 1 / 8**0.5  # kaiming_uniform(a=sqrt(5)) on fan_in 8
    assert m.lora_A.abs().max() <= bound


def test_fresh_wrap_equals_base():
    model = small_model()
    ids, mask = inputs()
    before = model(ids, mask)
    names = apply_lora(model, r=4, alpha=8)
    assert len(names) == 2 * 4 and all(isinstance(model.get_submodule(n), LoRALinear) for n in names)
    assert torch.equal(model(ids, mask), before)


def test_merge_equals_unmerged_and_unmerge_restores():
    model = small_model()
    apply_lora(model, ("attn.c_attn", "mlp.c_fc"), r=4, alpha=8)
    randomize_b(model)
    ids, mask = inputs()
    base_w = model.gpt.h[0].attn.c_attn.base.weight.clone()
    unmerged = model(ids, mask)
    merge_lora(model)
    assert not torch.equal(model.gpt.h[0].attn.c_attn.base.weight, base_w)
    torch.testing.assert_close(model(ids, mask), unmerged, rtol=1e-5, atol=1e-5)
    merge_lora(model)  # idempotent
    torch.testing.assert_close(model(ids, mask), unmerged, rtol=1e-5, atol=1e-5)
    unmerge_lora(model)
    torch.testing.assert_close(model.gpt.h[0].attn.c_attn.base.weight, base_w, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(ids, mask), unmerged, rtol=1e-5, atol=1e-5)


def test_unwrap_leaves_plain_linears_with_the_adapted_outputs():
    model = small_model()
    apply_lora(model, ("attn.c_attn", "mlp.c_fc"), r=4, alpha=8)
    randomize_b(model)
    ids, mask = inputs()
    adapted = model(ids, mask)
    unwrap_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert type(model.gpt.h[0].attn.c_attn) is nn.Linear
    assert not any("lora_" in k for k in model.state_dict())
    torch.testing.assert_close(model(ids, mask), adapted, rtol=1e-5, atol=1e-5)


def test_adapters_change_output():
    model = small_model()
    ids, mask = inputs()
    before = model(ids, mask)
    apply_lora(model, r=2, alpha=2)
    randomize_b(model)
    assert not torch.allclose(model(ids, mask), before)


def test_only_adapters_and_head_train_and_are_saved():
    model = small_model()
    apply_lora(model, r=4, alpha=8)
    n = mark_only_lora_trainable(model, extra_trainable=("classifier",))
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(k.startswith("classifier.") or k.endswith(("lora_A", "lora_B")) for k in trainable)
    assert "classifier.weight" in trainable and "gpt.h.0.attn.c_attn.base.weight" not in trainable
    assert n == sum(model.get_parameter(k).numel() for k in trainable)
    assert set(lora_state_dict(model, extra=("classifier",))) == trainable


def test_typo_in_targets_is_an_error():
    with pytest.raises(ValueError, match="no nn.Linear matches"):
        apply_lora(small_model(), ("attn.q_proj",))


def test_matches_peft():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 6))
    ours = nn.Sequential(nn.Linear(8, 6))
    ours.load_state_dict(base.state_dict())
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0"]), base)
    apply_lora(ours, ("0",), r=4, alpha=8)
    lin = theirs[0]
    with torch.no_grad():
        lin.lora_B["default"].weight.normal_()
        ours[0].lora_A.copy_(lin.lora_A["default"].weight)
        ours[0].lora_B.copy_(lin.lora_B["default"].weight)
    x = torch.randn(5, 8)
    torch.testing.assert_close(ours(x), theirs(x))
