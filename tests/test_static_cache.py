"""The static-shape KV cache (``decoding.static_cache``): every strategy decodes the tokens the
dynamic cache gives (greedy, sampling under one generator, beam, contrastive), with left
padding, prefix tuning and int8 weights; its rows are reordered in place; it refuses
attention that brings its own cache."""

from __future__ import annotations

import pytest
import torch

from config import GPT2Config
from decoding.inference import prepare_for_inference
from decoding.static_cache import StaticDecoder, StaticKVCache
from methods.prefix import apply_prefix
from methods.sparse_attention import SparseAttention, apply_sparse_attention
from models.generation import generate
from models.gpt2 import GPT2Model
from modules.attention import build_attention_mask

STRATEGIES = {
    "greedy": {},
    "sample": {"do_sample": True, "top_k": 20, "temperature": 1.3},
    "beam": {"num_beams": 3, "num_return_sequences": 2},
    "contrastive": {"penalty_alpha": 0.6, "top_k": 4},
}


def tiny(seed: int = 0, **kw) -> GPT2Model:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=101, max_position_embeddings=64, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, initializer_range=0.3, **kw)
    return GPT2Model(cfg).eval()


def prompts(padded: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    ids = torch.randint(0, 101, (3, 6), generator=torch.Generator().manual_seed(1))
    if not padded:
        return ids, None
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :1] = 0
    return ids, mask


def both(model, padded: bool, **settings) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens with the dynamic cache, then with the static one (the same sampling stream)."""
    ids, mask = prompts(padded)
    out = [generate(m, ids, mask, max_new_tokens=9, generator=torch.Generator().manual_seed(5), **settings)
           for m in (model, StaticDecoder(model))]
    return out[0], out[1]


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_decodes_the_dynamic_caches_tokens(strategy, padded) -> None:
    dynamic, static = both(tiny(), padded, **STRATEGIES[strategy])
    assert torch.equal(dynamic, static)


def test_prefix_tuning_and_int8_weights_decode_alike() -> None:
    model = tiny()
    encoder = apply_prefix(model, length=3, hidden=16)
    encoder.fold()
    for strategy in ("greedy", "beam"):
        dynamic, static = both(model, True, **STRATEGIES[strategy])
        assert torch.equal(dynamic, static), strategy
    int8 = prepare_for_inference(tiny(), quantize="int8")
    dynamic, static = both(int8, True)
    assert torch.equal(dynamic, static)


def test_the_key_mask_is_the_dynamic_mask_over_every_slot() -> None:
    """Prompt and step masks equal ``build_attention_mask``'s on the written slots and hide the rest."""
    model = tiny()
    _, mask = prompts(True)
    cache = StaticDecoder(model).new_cache(3, 10)
    cache.start(mask)
    want = build_attention_mask(6, 0, mask, "cpu")  # (B, 1, 6, 6)
    got = cache.key_mask(6)  # (B, 1, 6, 10)
    assert torch.equal(got[..., :6], want) and not got[..., 6:].any()
    cache.advance(6)
    step_mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1)
    want = build_attention_mask(1, 6, step_mask, "cpu")  # (B, 1, 1, 7)
    got = cache.key_mask(1)
    assert torch.equal(got[..., :7], want) and not got[..., 7:].any()


def test_storage_starts_zeroed_and_rows_are_reordered_in_place() -> None:
    """Unwritten slots are read and masked: zeros, never garbage (0 * NaN would leak through).
    Reordering keeps the storage's address (a CUDA graph replays on it); repeating rows may not."""
    cfg = tiny().config
    cache = StaticKVCache(cfg, 2, 8, "cpu", torch.float32)
    assert all(not t.any() for t in cache.step_tensors()[:2])
    k = torch.randn(2, 2, 3, 16)
    for layer in range(2):
        cache.append(layer, k, k)
    cache.advance(3)
    cache.repeat_rows(2)  # rows 0, 0, 1, 1
    ptr = cache.step_tensors()[0].data_ptr()
    cache.reorder(torch.tensor([3, 2, 1, 0]))
    keys, _ = cache.append(0, torch.zeros(4, 2, 1, 16), torch.zeros(4, 2, 1, 16))
    assert cache.step_tensors()[0].data_ptr() == ptr and keys.size(2) == 8
    assert torch.equal(keys[:, :, :3], k[[1, 1, 0, 0]])
    cache.advance(1)
    with pytest.raises(ValueError, match="KV cache full"):
        cache.check_room(5)


def test_attention_with_its_own_cache_is_refused() -> None:
    model = apply_sparse_attention(tiny(), SparseAttention("window", window=4))
    with pytest.raises(ValueError, match="dense attention"):
        StaticDecoder(model)


def test_a_decoder_reuses_its_cache_for_the_same_shape() -> None:
    """The second call decodes on the first call's storage (stale keys, the old padding) unharmed."""
    model = tiny()
    decoder = StaticDecoder(model)
    caches = []
    for padded in (True, False, True):
        ids, mask = prompts(padded)
        assert torch.equal(generate(decoder, ids, mask, max_new_tokens=5), generate(model, ids, mask, max_new_tokens=5))
        caches.append(decoder.cache)
    cache = caches[0]
    assert all(c is cache for c in caches)
    generate(decoder, ids[:2], mask[:2], max_new_tokens=5)
    assert decoder.cache is not cache and decoder.cache.batch_size == 2
