"""The cache protocol (``modules.kv_cache.BaseKVCache``): both caches answer batch size,
length and capacity, append in position order, select and repeat rows, and copy one
position between rows, so decoding loops never index their tensors."""

from __future__ import annotations

import pytest
import torch

from config import GPT2Config
from methods.sparse_attention import RingKVCache, SparseAttention
from modules.kv_cache import BaseKVCache, KVCache

WINDOW = SparseAttention("window", window=4)


def config() -> GPT2Config:
    return GPT2Config(vocab_size=50, max_position_embeddings=32, hidden_size=8, num_hidden_layers=2,
                      num_attention_heads=2)


def fill(cache: BaseKVCache, steps: int) -> list[torch.Tensor]:
    """Append ``steps`` positions one at a time (keys = values = random); return each step's keys."""
    new = []
    for _ in range(steps):
        k = torch.randn(cache.batch_size, 2, 1, 4)
        for layer in range(2):
            cache.append(layer, k, k)
        cache.advance(1)
        new.append(k)
    return new


@pytest.mark.parametrize("cls", [KVCache, RingKVCache])
def test_both_caches_follow_the_protocol(cls) -> None:
    cache = cls(config(), 2, 10, "cpu", torch.float32, *([WINDOW] if cls is RingKVCache else []))
    assert isinstance(cache, BaseKVCache)
    keys = fill(cache, 6)
    assert (cache.batch_size, cache.length, cache.capacity) == (2, 6, 10 if cls is KVCache else 4)
    cache.repeat_rows(3)  # rows 0,0,0,1,1,1
    assert cache.batch_size == 6
    cache.copy_last_position(torch.tensor([3, 0, 0, 0, 0, 5]))  # position 5 of row 0 <- row 1's, row 3 <- row 0's
    probe = torch.zeros(6, 2, 1, 4)
    k, _ = cache.append(0, probe, probe)  # (6, nh, S, hs): what a new query sees, in position order
    first = 0 if cls is KVCache else 6 - 3  # the ring shows the last w - 1 = 3 cached positions
    assert k.size(2) == 7 - first and torch.equal(k[:, :, -1:], probe)
    last = k[:, :, 5 - first]  # position 5 of every row
    expected = keys[5][[1, 0, 0, 0, 0, 1]][:, :, 0]
    assert torch.equal(last, expected)
    assert torch.equal(k[:, :, 4 - first], keys[4][[0, 0, 0, 1, 1, 1]][:, :, 0])  # other positions untouched
    cache.reorder(torch.tensor([5, 0]))
    assert cache.batch_size == 2


def test_the_ring_only_holds_its_last_positions() -> None:
    cache = RingKVCache(config(), 1, 10, "cpu", torch.float32, WINDOW)
    fill(cache, 6)
    assert cache.slot(5) == 1 and cache.slot(2) == 2
    with pytest.raises(IndexError, match="not in the ring"):
        cache.slot(1)
    with pytest.raises(ValueError, match="KV cache full"):
        fill(cache, 5)
