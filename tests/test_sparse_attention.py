"""Sparse attention: blockwise kernels equal the mask reference, covering patterns
equal dense attention exactly, nothing sees the future, the KV cache (full and
ring) equals a full forward, and padding works under every pattern."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from config import GPT2Config
from methods.sparse_attention import (
    RingKVCache,
    SparseAttention,
    SparseCausalSelfAttention,
    apply_sparse_attention,
    build_sparse_mask,
    covers_all,
    far_offsets,
    pattern_mask,
    sparse_attention_of,
    sparse_blockwise_attention,
)
from models.gpt2 import GPT2Model
from modules.attention import CausalSelfAttention, eager_attention
from modules.kv_cache import KVCache

# Small windows so that sequences of ~40 tokens cross many blocks.
PATTERNS = {
    "window": SparseAttention("window", window=5),
    "strided-log": SparseAttention("strided", window=3),
    "strided-fixed": SparseAttention("strided", window=4, stride=3),
    "block_global": SparseAttention("block_global", block=6, num_global=2),
    "block_global-wide": SparseAttention("block_global", block=4, num_global=7),
}


def tiny(**kw) -> GPT2Config:
    base = dict(vocab_size=97, max_position_embeddings=64, hidden_size=32, num_hidden_layers=2,
                num_attention_heads=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return GPT2Config(**{**base, **kw})


def model_for(settings: SparseAttention, seed: int = 0) -> GPT2Model:
    torch.manual_seed(seed)
    return apply_sparse_attention(GPT2Model(tiny()).eval(), settings)


def with_pattern(model: GPT2Model, settings: SparseAttention) -> GPT2Model:
    """The same weights under another attention pattern."""
    other = apply_sparse_attention(GPT2Model(model.config).eval(), settings)
    other.load_state_dict(model.state_dict())
    return other


def padding(B: int, T: int, side: str) -> torch.Tensor:
    m = torch.ones(B, T, dtype=torch.long)
    for i in range(1, B):
        if side == "left":
            m[i, : 3 * i] = 0
        else:
            m[i, T - 3 * i :] = 0
    return m


def reference(q, k, v, settings, key_padding=None):
    mask = build_sparse_mask(replace(settings, impl="mask"), q.size(2), 0, key_padding, q.device)
    return eager_attention(q, k, v, mask, mask is None)  # None: the pattern covers everything (dense)


# block_global with padding counts blocks per row in real tokens and so runs the masked path
# (test_model_blockwise_equals_mask_path covers it); the kernel sees it only unpadded.
KERNEL_CASES = [(n, p) for n in sorted(PATTERNS) for p in (None, "left", "right")
                if p is None or not n.startswith("block_global")]


@pytest.mark.parametrize("name,pad", KERNEL_CASES)
@pytest.mark.parametrize("T", [7, 24, 37])
def test_blockwise_kernel_matches_mask_reference(name, pad, T):
    cfg = PATTERNS[name]
    torch.manual_seed(T)
    q, k, v = (torch.randn(3, 2, T, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    kp = padding(3, T, pad) if pad else None
    mask = build_sparse_mask(cfg, T, 0, kp, q.device)  # None without padding: the kernel builds its own
    fast = sparse_blockwise_attention(q, k, v, cfg, mask)
    ref = reference(q, k, v, cfg, kp)
    keep = torch.ones(3, T, dtype=torch.bool) if kp is None else kp.bool()  # pad rows are garbage by contract
    for b in range(3):
        torch.testing.assert_close(fast[b][:, keep[b]], ref[b][:, keep[b]], rtol=1e-12, atol=1e-12)
    w = torch.randn_like(ref) * keep[:, None, :, None]
    g_fast = torch.autograd.grad((fast * w).sum(), (q, k, v))
    g_ref = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_pattern_definitions():
    q = torch.arange(40)[:, None]
    k = torch.arange(40)[None, :]
    d = q - k
    win = pattern_mask(SparseAttention("window", window=5), q, k) & (d >= 0)
    assert win.sum(-1).max() == 5 and bool(win[20, 16]) and not bool(win[20, 15])
    log = pattern_mask(SparseAttention("strided", window=3), q, k) & (d >= 0)
    assert sorted((20 - k[0, log[20]]).tolist()) == [0, 1, 2, 4, 8, 16]
    assert far_offsets(SparseAttention("strided", window=3), 40) == [4, 8, 16, 32]
    assert far_offsets(SparseAttention("strided", window=4, stride=3), 20) == [6, 9, 12, 15, 18]
    bg = pattern_mask(SparseAttention("block_global", block=6, num_global=2), q, k) & (d >= 0)
    assert k[0, bg[20]].tolist() == [0, 1, 18, 19, 20]


@pytest.mark.parametrize("kw", [
    SparseAttention("window", window=40),
    SparseAttention("strided", window=64),
    SparseAttention("block_global", block=40, num_global=0),
    SparseAttention("block_global", block=2, num_global=40),
], ids=str)
@pytest.mark.parametrize("impl", ["blockwise", "mask"])
def test_covering_pattern_is_exactly_dense(kw, impl):
    dense = model_for(SparseAttention())
    sparse = with_pattern(dense, replace(kw, impl=impl))
    ids = torch.randint(0, 97, (3, 40))
    for am in (None, padding(3, 40, "left"), padding(3, 40, "right")):
        a = dense(ids, am)["last_hidden_state"]
        b = sparse(ids, am)["last_hidden_state"]
        assert torch.equal(a, b)
    # One position short of covering, the pattern changes the result.
    short = replace(kw, window=39) if kw.pattern != "block_global" else replace(kw, block=39, num_global=0)
    c = with_pattern(dense, short)(ids)["last_hidden_state"]
    assert not torch.allclose(dense(ids)["last_hidden_state"], c)


@pytest.mark.parametrize("name", sorted(PATTERNS))
@pytest.mark.parametrize("impl", ["blockwise", "mask"])
def test_no_position_sees_the_future(name, impl):
    model = model_for(replace(PATTERNS[name], impl=impl))
    ids = torch.randint(0, 97, (1, 40))
    base = model(ids)["last_hidden_state"]
    for j in (5, 17, 33):
        changed = ids.clone()
        changed[0, j] = (changed[0, j] + 1) % 97
        out = model(changed)["last_hidden_state"]
        torch.testing.assert_close(out[:, :j], base[:, :j], rtol=0, atol=1e-6)
        assert not torch.allclose(out[:, j], base[:, j])
    mask = build_sparse_mask(replace(PATTERNS[name], impl="mask"), 40, 0, None, ids.device)
    assert not mask[0, 0].triu(1).any()


@pytest.mark.parametrize("name", sorted(PATTERNS))
@pytest.mark.parametrize("impl", ["blockwise", "mask"])
def test_model_blockwise_equals_mask_path(name, impl):
    ref = model_for(replace(PATTERNS[name], impl="mask"))
    other = with_pattern(ref, replace(PATTERNS[name], impl=impl))
    ids = torch.randint(0, 97, (3, 37))
    for side in ("left", "right"):
        am = padding(3, 37, side)
        torch.testing.assert_close(other(ids, am)["last_hidden_state"] * am[..., None],
                                   ref(ids, am)["last_hidden_state"] * am[..., None], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_left_padding_matches_unpadded(name):
    """A left-padded row sees exactly what it would see alone (global tokens are real tokens)."""
    model = model_for(PATTERNS[name])
    ids = torch.randint(0, 97, (1, 30))
    alone = model(ids)["last_hidden_state"]
    padded = torch.cat([torch.zeros(1, 7, dtype=torch.long), ids], 1)
    am = torch.cat([torch.zeros(1, 7, dtype=torch.long), torch.ones(1, 30, dtype=torch.long)], 1)
    out = model(padded, am)["last_hidden_state"][:, 7:]
    torch.testing.assert_close(out, alone, rtol=1e-5, atol=1e-5)


def decode_incrementally(model: GPT2Model, ids: torch.Tensor, am: torch.Tensor | None, cache) -> torch.Tensor:
    """Prefill 10 tokens, then one chunk of 3, then one token at a time; returns all hidden states."""
    outs, t = [], 0
    for n in [10, 3] + [1] * (ids.size(1) - 13):
        pos = None
        if am is not None:
            pos = (am.cumsum(-1) - 1).clamp(min=0)[:, t : t + n]
        sub = am[:, : t + n] if am is not None else None
        outs.append(model(ids[:, t : t + n], sub, position_ids=pos, cache=cache)["last_hidden_state"])
        t += n
    return torch.cat(outs, 1)


@pytest.mark.parametrize("name", sorted(PATTERNS) + ["window-ring"])
@pytest.mark.parametrize("pad", [False, True])
def test_cache_equals_no_cache(name, pad):
    settings = PATTERNS[name.replace("-ring", "")]
    model = model_for(settings)
    ids = torch.randint(0, 97, (3, 34))
    am = padding(3, 34, "left") if pad else None
    full = model(ids, am)["last_hidden_state"]
    if name.endswith("ring"):
        cache = RingKVCache(tiny(), 3, 34, "cpu", torch.float32, settings)
    else:
        cache = KVCache(tiny(), 3, 34, "cpu", torch.float32)
    inc = decode_incrementally(model, ids, am, cache)
    keep = am.bool() if pad else torch.ones(3, 34, dtype=torch.bool)
    torch.testing.assert_close(inc[keep], full[keep], rtol=1e-5, atol=1e-5)
    if name.endswith("ring"):
        assert cache.capacity == settings.window  # bounded: w positions per layer, not 34


def test_window_decoding_attends_only_to_last_w_keys(monkeypatch):
    model = model_for(SparseAttention("window", window=5))
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, *a, **kw):
        seen.append(k.size(2))
        return sdpa(q, k, v, *a, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    cache = model.new_cache(1, 30)
    ids = torch.randint(0, 97, (1, 30))
    model(ids[:, :20], cache=cache)
    seen.clear()
    for t in range(20, 30):
        model(ids[:, t : t + 1], cache=cache)
    assert seen and max(seen) == 5


def test_strided_decoding_gathers_only_reachable_keys(monkeypatch):
    model = model_for(SparseAttention("strided", window=3))
    seen = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, k, v, *a, **kw: seen.append(k.size(2))
                        or sdpa(q, k, v, *a, **kw))
    cache = model.new_cache(1, 40)
    ids = torch.randint(0, 97, (1, 40))
    model(ids[:, :39], cache=cache)
    seen.clear()
    model(ids[:, 39:], cache=cache)  # query 39: keys 39, 38, 37 and 35, 31, 23, 7
    assert seen == [7, 7]


def test_new_cache_picks_ring_for_window():
    assert isinstance(model_for(SparseAttention("window", window=8)).new_cache(2, 64), RingKVCache)
    assert isinstance(model_for(SparseAttention("strided", window=8)).new_cache(2, 64), KVCache)
    with pytest.raises(ValueError, match="RingKVCache"):
        RingKVCache(tiny(), 1, 8, "cpu", torch.float32, SparseAttention())


def test_ring_cache_reorder_for_beams():
    settings = SparseAttention("window", window=4)
    model = model_for(settings)
    ids = torch.randint(0, 97, (2, 12))
    caches = [RingKVCache(tiny(), 2, 12, "cpu", torch.float32, settings), KVCache(tiny(), 2, 12, "cpu", torch.float32)]
    outs = []
    for c in caches:
        model(ids[:, :8], cache=c)
        c.reorder(torch.tensor([1, 1]))
        outs.append(model(ids[[1, 1], 8:], cache=c)["last_hidden_state"])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_pretrained_weights_load_unchanged_under_a_pattern(tmp_path):
    from tests.conftest import HF_CONFIGS, make_hf_folder

    folder = make_hf_folder(tmp_path / "hf", **HF_CONFIGS["small"])
    dense = GPT2Model.from_pretrained(folder).eval()
    sparse = apply_sparse_attention(GPT2Model.from_pretrained(folder), SparseAttention("window", window=8)).eval()
    assert list(dense.state_dict()) == list(sparse.state_dict())  # the same names: the layers hold the same modules
    for a, b in zip(dense.state_dict().values(), sparse.state_dict().values()):
        assert torch.equal(a, b)
    ids = torch.randint(0, 1000, (1, 30))
    assert sparse_attention_of(sparse).pattern == "window"
    assert not torch.allclose(dense(ids)["last_hidden_state"], sparse(ids)["last_hidden_state"])


def test_config_validation_and_covers_all():
    with pytest.raises(ValueError, match="attn_pattern"):
        SparseAttention(pattern="diagonal")
    with pytest.raises(ValueError, match="attn_window"):
        SparseAttention(window=0)
    with pytest.raises(ValueError, match="attn_sparse_impl"):
        SparseAttention(impl="fast")
    assert covers_all(SparseAttention("window", window=10), 10)
    assert not covers_all(SparseAttention("window", window=10), 11)


@pytest.mark.parametrize("name", sorted(PATTERNS))
@pytest.mark.parametrize("beams", [1, 3])
def test_generate_with_cache_equals_without_under_each_pattern(name, beams):
    from models.generation import generate

    model = model_for(PATTERNS[name])
    ids = torch.randint(1, 97, (2, 12))
    am = torch.ones_like(ids)
    am[1, :4] = 0  # left padding
    kw = dict(max_new_tokens=14, num_beams=beams, eos_token_id=0)
    assert torch.equal(generate(model, ids, am, use_cache=True, **kw), generate(model, ids, am, use_cache=False, **kw))


@pytest.mark.parametrize("kw", [dict(), dict(num_beams=3), dict(penalty_alpha=0.6, top_k=4)])
def test_generate_with_ring_cache_equals_without_cache(kw):
    """Greedy, beam and contrastive decoding on a w-position ring cache (the model's new_cache)."""
    from models.generation import generate

    model = model_for(SparseAttention("window", window=5))
    assert isinstance(model.new_cache(1, 40), RingKVCache)  # the model's own cache for this pattern
    ids = torch.randint(1, 97, (2, 12))
    am = torch.ones_like(ids)
    am[1, :4] = 0
    args = dict(max_new_tokens=14, eos_token_id=0, **kw)
    assert torch.equal(generate(model, ids, am, use_cache=True, **args),
                       generate(model, ids, am, use_cache=False, **args))


def test_the_sparse_class_holds_the_layers_modules_and_dense_puts_the_plain_class_back():
    """The pattern is chosen when the model is built: each layer becomes a SparseCausalSelfAttention
    holding the same linears (LoRA wrappers too), and ``dense`` gives the plain class back."""
    from methods.lora import LoRALinear, apply_lora

    model = model_for(SparseAttention())
    apply_lora(model, ("attn.c_attn",), r=2)
    c_attn = model.h[1].attn.c_attn
    ids = torch.randint(0, 97, (2, 30))
    dense = model(ids)["last_hidden_state"]
    keys = list(model.state_dict())
    apply_sparse_attention(model, PATTERNS["window"])
    assert type(model.h[1].attn) is SparseCausalSelfAttention and model.h[1].attn.c_attn is c_attn
    assert isinstance(c_attn, LoRALinear) and list(model.state_dict()) == keys
    assert sparse_attention_of(model) == PATTERNS["window"]
    assert not torch.allclose(model(ids)["last_hidden_state"], dense)
    apply_sparse_attention(model, SparseAttention())
    assert type(model.h[1].attn) is CausalSelfAttention and model.h[1].attn.c_attn is c_attn
    assert sparse_attention_of(model) is None and torch.equal(model(ids)["last_hidden_state"], dense)
