"""Prefix tuning: a zero-length prefix is the base model, the prefix reaches every decoding
strategy with and without the cache, left padding, training only the prefix, folding."""

from __future__ import annotations

import pytest
import torch

from config import get_config
from decoding.inference import prepare_for_inference
from methods.prefix import (
    PrefixCausalSelfAttention,
    apply_prefix,
    mark_only_prefix_trainable,
    prefix_parameter_counts,
    remove_prefix,
)
from methods.sparse_attention import SparseAttention, apply_sparse_attention
from models.generation import generate
from models.gpt2 import GPT2Model
from models.sonnet_gpt import SonnetGPT

V = 200


def tiny(**kw) -> GPT2Model:
    torch.manual_seed(0)
    cfg = dict(vocab_size=V, initializer_range=0.2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return GPT2Model(get_config("tiny", **{**cfg, **kw})).eval()


def with_prefix(model: GPT2Model, length: int = 5, **kw):
    torch.manual_seed(1)
    enc = apply_prefix(model, length, hidden=32, **kw)
    with torch.no_grad():  # larger than the init so that the prefix really moves the outputs
        for p in enc.parameters():
            p.mul_(20)
    return enc


def ids_and_mask():
    ids = torch.randint(1, V, (3, 8), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :5] = 0
    return ids, mask


@torch.no_grad()
def test_zero_length_prefix_equals_the_base_model():
    model = tiny()
    ids, mask = ids_and_mask()
    base = [model(ids)["last_hidden_state"], model(ids, mask)["last_hidden_state"]]
    gen = generate(model, ids, mask, max_new_tokens=6, num_beams=2)
    apply_prefix(model, 0)
    assert isinstance(model.h[0].attn, PrefixCausalSelfAttention)  # the prefix class is in place, with nothing to add
    for out, ref in zip([model(ids)["last_hidden_state"], model(ids, mask)["last_hidden_state"]], base):
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert torch.equal(generate(model, ids, mask, max_new_tokens=6, num_beams=2), gen)


@torch.no_grad()
def test_a_prefix_changes_the_outputs_and_removing_it_restores_them():
    model = tiny()
    ids, _ = ids_and_mask()
    ref = model(ids)["last_hidden_state"]
    with_prefix(model)
    assert (model(ids)["last_hidden_state"] - ref).abs().max() > 1e-2
    remove_prefix(model)
    assert torch.equal(model(ids)["last_hidden_state"], ref) and not hasattr(model, "prefix_encoder")


STRATEGIES = [dict(), dict(num_beams=3), dict(penalty_alpha=0.6, top_k=4),
              dict(do_sample=True, top_k=20), dict(num_beams=2, num_return_sequences=2)]


@torch.no_grad()
@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("kw", STRATEGIES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "greedy")
def test_cached_decoding_equals_uncached_with_a_prefix(kw, padded):
    model = tiny()
    with_prefix(model)
    ids, mask = ids_and_mask()
    mask = mask if padded else None
    runs = [generate(model, ids, mask, max_new_tokens=10, eos_token_id=7, use_cache=c,
                     generator=torch.Generator().manual_seed(0), **kw) for c in (True, False)]
    assert torch.equal(*runs)
    fast = prepare_for_inference(model)  # the inference copy keeps the prefix hook
    assert torch.equal(generate(fast, ids, mask, max_new_tokens=10, eos_token_id=7,
                                generator=torch.Generator().manual_seed(0), **kw), runs[0])
    remove_prefix(model)  # and the prefix was used: without it the tokens differ
    assert not torch.equal(generate(model, ids, mask, max_new_tokens=10, eos_token_id=7,
                                    generator=torch.Generator().manual_seed(0), **kw), runs[0])


@torch.no_grad()
def test_left_padded_rows_equal_the_unpadded_rows():
    model = tiny()
    with_prefix(model)
    ids, mask = ids_and_mask()
    hidden = model(ids, mask)["last_hidden_state"]
    out = generate(model, ids, mask, max_new_tokens=8)
    for row, start in ((1, 3), (2, 5)):
        alone = ids[row : row + 1, start:]
        torch.testing.assert_close(hidden[row, start:], model(alone)["last_hidden_state"][0], rtol=0, atol=1e-5)
        assert torch.equal(out[row, start:], generate(model, alone, max_new_tokens=8)[0])


def test_gradients_reach_only_the_prefix_when_the_base_is_frozen():
    model = SonnetGPT(tiny())
    enc = with_prefix(model.gpt)
    mark_only_prefix_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("gpt.prefix_encoder.") for n in trainable)
    ids, mask = ids_and_mask()
    model.loss(ids, mask).backward()
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    # a few steps on one batch lower its loss: the prefix learns
    opt = torch.optim.Adam(enc.parameters(), lr=1e-2)
    first = float(model.loss(ids, mask).detach())
    for _ in range(15):
        opt.zero_grad()
        model.loss(ids, mask).backward()
        opt.step()
    assert float(model.loss(ids, mask).detach()) < first - 0.1


@torch.no_grad()
def test_folding_keeps_the_numbers_and_drops_the_mlp():
    model = tiny()
    enc = with_prefix(model, length=4)
    ids, mask = ids_and_mask()
    before = model(ids, mask)["last_hidden_state"]
    counts = prefix_parameter_counts(model)
    d, L = model.config.hidden_size, model.config.num_hidden_layers
    assert counts["training"] == 4 * d + (d * 32 + 32) + (32 * 2 * L * d + 2 * L * d)
    assert counts["inference"] == L * 2 * 4 * d
    enc.fold()
    assert enc.folded and [n for n, _ in enc.named_parameters()] == ["kv"]
    assert prefix_parameter_counts(model)["training"] == counts["inference"]
    torch.testing.assert_close(model(ids, mask)["last_hidden_state"], before, rtol=0, atol=1e-5)


def test_prefix_without_reparameterisation_and_refusals():
    model = tiny()
    enc = apply_prefix(model, 3, reparam=False)
    assert enc.folded and enc.kv.shape == (2, 2, 4, 3, 32)
    with pytest.raises(ValueError, match="already has a prefix"):
        apply_prefix(model, 3)
    with pytest.raises(ValueError, match="dense attention only"):
        apply_prefix(apply_sparse_attention(tiny(), SparseAttention("window", window=4)), 3)
    with pytest.raises(TypeError, match="GPT2Model"):
        apply_prefix(torch.nn.Linear(2, 2), 3)


def test_prefix_fine_tune_mode_and_restore():
    from methods.fine_tune import FineTuneConfig, PrefixConfig, set_fine_tune_mode
    from methods.prefix import restore_prefix

    model = SonnetGPT(tiny())
    assert set_fine_tune_mode(model, FineTuneConfig("prefix", PrefixConfig(length=3, hidden=16)), ()) is True
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "gpt.prefix_encoder.embedding", "gpt.prefix_encoder.mlp.0.weight", "gpt.prefix_encoder.mlp.0.bias",
        "gpt.prefix_encoder.mlp.2.weight", "gpt.prefix_encoder.mlp.2.bias"}
    for fold in (False, True):
        if fold:
            model.gpt.prefix_encoder.fold()
        state = model.gpt.state_dict()
        plain = tiny()
        assert restore_prefix(plain, state)
        plain.load_state_dict(state)  # strict: the restored prefix has the saved shapes
        ids, mask = ids_and_mask()
        with torch.no_grad():
            torch.testing.assert_close(plain(ids, mask)["last_hidden_state"],
                                       model.gpt(ids, mask)["last_hidden_state"], rtol=0, atol=1e-6)
    assert not restore_prefix(tiny(), tiny().state_dict())
    with pytest.raises(ValueError, match="must be >= 1"):
        PrefixConfig(length=0)


@torch.no_grad()
def test_eager_attention_sees_the_prefix_as_sdpa_does():
    ids, mask = ids_and_mask()
    outs = []
    for impl in ("sdpa", "eager"):
        model = tiny(attn_impl=impl)
        with_prefix(model)
        outs.append([model(ids, m)["last_hidden_state"] for m in (mask, None)])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@torch.no_grad()
def test_the_prefix_class_holds_the_layers_modules_with_lora_on_either_side():
    """``apply_prefix`` gives each layer a PrefixCausalSelfAttention holding the same linears, so
    LoRA wraps c_attn before or after it alike and the state-dict names are the plain model's plus
    ``prefix_encoder.*``; ``remove_prefix`` gives the plain class back."""
    from methods.lora import LoRALinear, apply_lora, lora_modules
    from modules.attention import CausalSelfAttention

    def lora(model: GPT2Model) -> None:
        torch.manual_seed(2)
        apply_lora(model, ("attn.c_attn",), r=2)
        for m in lora_modules(model):
            m.lora_B.fill_(0.05)  # adapters that act

    plain = tiny()
    lora(plain)
    ids, mask = ids_and_mask()
    outs = []
    for lora_first in (True, False):
        model = tiny()
        if lora_first:
            lora(model)
        with_prefix(model)
        if not lora_first:
            lora(model)
        attn = model.h[1].attn
        assert type(attn) is PrefixCausalSelfAttention and isinstance(attn.c_attn, LoRALinear)
        assert [k for k in model.state_dict() if not k.startswith("prefix_encoder.")] == list(plain.state_dict())
        outs.append(model(ids, mask)["last_hidden_state"])
        c_attn = attn.c_attn
        remove_prefix(model)
        assert type(model.h[1].attn) is CausalSelfAttention and model.h[1].attn.c_attn is c_attn
        torch.testing.assert_close(model(ids, mask)["last_hidden_state"], plain(ids, mask)["last_hidden_state"],
                                   rtol=0, atol=0)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    assert (outs[0] - plain(ids, mask)["last_hidden_state"]).abs().max() > 1e-2
    prefixed = tiny()
    with_prefix(prefixed)
    with pytest.raises(ValueError, match="prefix tuning supports dense attention only"):
        apply_sparse_attention(prefixed, SparseAttention("window", window=4))
