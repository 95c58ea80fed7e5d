"""Sparse attention: blockwise kernels equal the mask reference, covering patterns
equal dense attention exactly, nothing sees the future, the KV cache (full and
ring) equals a full forward, and padding works under every pattern."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from config import GPT2Config
from methods.sparse_attention import far_offsets, sparse_blockwise_attention
from models.gpt2 import GPT2Model
from modules.attention import build_attention_mask, covers_all, eager_attention, pattern_mask
from modules.kv_cache import KVCache, RingKVCache, new_kv_cache

# Small windows so that sequences of ~40 tokens cross many blocks.
PATTERNS = {
    "window": dict(attn_pattern="window", attn_window=5),
    "strided-log": dict(attn_pattern="strided", attn_window=3),
    "strided-fixed": dict(attn_pattern="strided", attn_window=4, attn_stride=3),
    "block_global": dict(attn_pattern="block_global", attn_block=6, attn_num_global=2),
    "block_global-wide": dict(attn_pattern="block_global", attn_block=4, attn_num_global=7),
}


def tiny(**kw) -> GPT2Config:
    base = dict(vocab_size=97, max_position_embeddings=64, hidden_size=32, num_hidden_layers=2,
                num_attention_heads=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return GPT2Config(**{**base, **kw})


def model_for(cfg: GPT2Config, seed: int = 0) -> GPT2Model:
    torch.manual_seed(seed)
    return GPT2Model(cfg).eval()


def with_pattern(model: GPT2Model, **kw) -> GPT2Model:
    """The same weights under another attention pattern (config is shared by all layers)."""
    other = GPT2Model(dataclasses.replace(model.config, **kw)).eval()
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


def reference(q, k, v, cfg, key_padding=None):
    mask = build_attention_mask(dataclasses.replace(cfg, attn_sparse_impl="mask"), q.size(2), 0, key_padding, q.device)
    return eager_attention(q, k, v, mask, mask is None)  # None: the pattern covers everything (dense)


# block_global with padding counts blocks per row in real tokens and so runs the masked path
# (test_model_blockwise_equals_mask_path covers it); the kernel sees it only unpadded.
KERNEL_CASES = [(n, p) for n in sorted(PATTERNS) for p in (None, "left", "right")
                if p is None or not n.startswith("block_global")]


@pytest.mark.parametrize("name,pad", KERNEL_CASES)
@pytest.mark.parametrize("T", [7, 24, 37])
def test_blockwise_kernel_matches_mask_reference(name, pad, T):
    cfg = tiny(**PATTERNS[name])
    torch.manual_seed(T)
    q, k, v = (torch.randn(3, 2, T, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    kp = padding(3, T, pad) if pad else None
    mask = build_attention_mask(cfg, T, 0, kp, q.device)  # None without padding: the kernel builds its own
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
    win = pattern_mask(tiny(attn_pattern="window", attn_window=5), q, k) & (d >= 0)
    assert win.sum(-1).max() == 5 and bool(win[20, 16]) and not bool(win[20, 15])
    log = pattern_mask(tiny(attn_pattern="strided", attn_window=3), q, k) & (d >= 0)
    assert sorted((20 - k[0, log[20]]).tolist()) == [0, 1, 2, 4, 8, 16]
    assert far_offsets(tiny(attn_pattern="strided", attn_window=3), 40) == [4, 8, 16, 32]
    assert far_offsets(tiny(attn_pattern="strided", attn_window=4, attn_stride=3), 20) == [6, 9, 12, 15, 18]
    bg = pattern_mask(tiny(attn_pattern="block_global", attn_block=6, attn_num_global=2), q, k) & (d >= 0)
    assert k[0, bg[20]].tolist() == [0, 1, 18, 19, 20]


@pytest.mark.parametrize("kw", [
    dict(attn_pattern="window", attn_window=40),
    dict(attn_pattern="strided", attn_window=64),
    dict(attn_pattern="block_global", attn_block=40, attn_num_global=0),
    dict(attn_pattern="block_global", attn_block=2, attn_num_global=40),
])
@pytest.mark.parametrize("impl", ["blockwise", "mask"])
def test_covering_pattern_is_exactly_dense(kw, impl):
    dense = model_for(tiny())
    sparse = with_pattern(dense, attn_sparse_impl=impl, **kw)
    ids = torch.randint(0, 97, (3, 40))
    for am in (None, padding(3, 40, "left"), padding(3, 40, "right")):
        a = dense(ids, am)["last_hidden_state"]
        b = sparse(ids, am)["last_hidden_state"]
        assert torch.equal(a, b)
    # One position short of covering, the pattern changes the result.
    short = {**kw, "attn_window": 39} if kw["attn_pattern"] != "block_global" else {**kw, "attn_block": 39,
                                                                                     "attn_num_global": 0}
    c = with_pattern(dense, **short)(ids)["last_hidden_state"]
    assert not torch.allclose(dense(ids)["last_hidden_state"], c)


@pytest.mark.parametrize("name", sorted(PATTERNS))
@pytest.mark.parametrize("impl", ["blockwise", "mask"])
def test_no_position_sees_the_future(name, impl):
    model = model_for(tiny(attn_sparse_impl=impl, **PATTERNS[name]))
    ids = torch.randint(0, 97, (1, 40))
    base = model(ids)["last_hidden_state"]
    for j in (5, 17, 33):
        changed = ids.clone()
        changed[0, j] = (changed[0, j] + 1) % 97
        out = model(changed)["last_hidden_state"]
        torch.testing.assert_close(out[:, :j], base[:, :j], rtol=0, atol=1e-6)
        assert not torch.allclose(out[:, j], base[:, j])
    mask = build_attention_mask(tiny(attn_sparse_impl="mask", **PATTERNS[name]), 40, 0, None, ids.device)
    assert not mask[0, 0].triu(1).any()


@pytest.mark.parametrize("name", sorted(PATTERNS))
@pytest.mark.parametrize("impl", ["blockwise", "mask"])
def test_model_blockwise_equals_mask_path(name, impl):
    ref = model_for(tiny(attn_sparse_impl="mask", **PATTERNS[name]))
    other = with_pattern(ref, attn_sparse_impl=impl)
    ids = torch.randint(0, 97, (3, 37))
    for side in ("left", "right"):
        am = padding(3, 37, side)
        torch.testing.assert_close(other(ids, am)["last_hidden_state"] * am[..., None],
                                   ref(ids, am)["last_hidden_state"] * am[..., None], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_left_padding_matches_unpadded(name):
    """A left-padded row sees exactly what it would see alone (global tokens are real tokens)."""
    model = model_for(tiny(**PATTERNS[name]))
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
    cfg = tiny(**PATTERNS[name.replace("-ring", "")])
    model = model_for(cfg)
    ids = torch.randint(0, 97, (3, 34))
    am = padding(3, 34, "left") if pad else None
    full = model(ids, am)["last_hidden_state"]
    cache_cls = RingKVCache if name.endswith("ring") else KVCache
    cache = cache_cls(cfg, 3, 34, "cpu", torch.float32)
    inc = decode_incrementally(model, ids, am, cache)
    keep = am.bool() if pad else torch.ones(3, 34, dtype=torch.bool)
    torch.testing.assert_close(inc[keep], full[keep], rtol=1e-5, atol=1e-5)
    if name.endswith("ring"):
        assert cache.capacity == cfg.attn_window  # bounded: w positions per layer, not 34


def test_window_decoding_attends_only_to_last_w_keys(monkeypatch):
    cfg = tiny(attn_pattern="window", attn_window=5)
    model = model_for(cfg)
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
    cfg = tiny(attn_pattern="strided", attn_window=3)
    model = model_for(cfg)
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


def test_new_kv_cache_picks_ring_for_window():
    assert isinstance(new_kv_cache(tiny(attn_pattern="window", attn_window=8), 2, 64, "cpu", torch.float32),
                      RingKVCache)
    assert isinstance(new_kv_cache(tiny(attn_pattern="strided", attn_window=8), 2, 64, "cpu", torch.float32),
                      KVCache)
    with pytest.raises(ValueError, match="RingKVCache"):
        RingKVCache(tiny(), 1, 8, "cpu", torch.float32)


def test_ring_cache_reorder_for_beams():
    cfg = tiny(attn_pattern="window", attn_window=4)
    model = model_for(cfg)
    ids = torch.randint(0, 97, (2, 12))
    caches = [RingKVCache(cfg, 2, 12, "cpu", torch.float32), KVCache(cfg, 2, 12, "cpu", torch.float32)]
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
    sparse = GPT2Model.from_pretrained(folder, attn_pattern="window", attn_window=8).eval()
    for a, b in zip(dense.state_dict().values(), sparse.state_dict().values()):
        assert torch.equal(a, b)
    ids = torch.randint(0, 1000, (1, 30))
    assert sparse.config.attn_pattern == "window"
    assert not torch.allclose(dense(ids)["last_hidden_state"], sparse(ids)["last_hidden_state"])


def test_config_validation_and_covers_all():
    with pytest.raises(ValueError, match="attn_pattern"):
        tiny(attn_pattern="diagonal")
    with pytest.raises(ValueError, match="attn_window"):
        tiny(attn_window=0)
    with pytest.raises(ValueError, match="attn_sparse_impl"):
        tiny(attn_sparse_impl="fast")
    assert covers_all(tiny(attn_pattern="window", attn_window=10), 10)
    assert not covers_all(tiny(attn_pattern="window", attn_window=10), 11)


@pytest.mark.parametrize("name", sorted(PATTERNS))
@pytest.mark.parametrize("beams", [1, 3])
def test_generate_with_cache_equals_without_under_each_pattern(name, beams):
    from models.generation import generate

    model = model_for(tiny(**PATTERNS[name]))
    ids = torch.randint(1, 97, (2, 12))
    am = torch.ones_like(ids)
    am[1, :4] = 0  # left padding
    kw = dict(max_new_tokens=14, num_beams=beams, eos_token_id=0)
    assert torch.equal(generate(model, ids, am, use_cache=True, **kw), generate(model, ids, am, use_cache=False, **kw))


@pytest.mark.parametrize("kw", [dict(), dict(num_beams=3), dict(penalty_alpha=0.6, top_k=4)])
def test_generate_with_ring_cache_equals_without_cache(kw):
    """Greedy, beam and contrastive decoding on a w-position ring cache (new_kv_cache)."""
    from models.generation import generate

    model = model_for(tiny(attn_pattern="window", attn_window=5))
    assert isinstance(model.new_cache(1, 40), RingKVCache)  # the model's own cache for this pattern
    ids = torch.randint(1, 97, (2, 12))
    am = torch.ones_like(ids)
    am[1, :4] = 0
    args = dict(max_new_tokens=14, eos_token_id=0, **kw)
    assert torch.equal(generate(model, ids, am, use_cache=True, **args),
                       generate(model, ids, am, use_cache=False, **args))
