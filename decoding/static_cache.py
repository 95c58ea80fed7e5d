"""A static-shape key/value cache and the decoder that drives it: the shapes of a decoding
step never change with the position, so a compiler (``decoding.compiled``) can capture the
step once per (rows, maximum length) instead of once per position.

``StaticKVCache`` keeps ``KVCache``'s storage, (L, B, nh, max_length, hs) allocated once, but
``append`` writes at a position held in a tensor (``index_copy_``, as gpt-fast's ``KVCache``)
and returns every slot, written or not; what a query may see is the boolean key mask
``key_mask`` builds from that tensor position and the left padding it recorded: the slots
written so far, itself, no pad key. Rows are reordered in place (beam search), so the storage
keeps its address from step to step (CUDA graphs replay on fixed addresses).

``StaticDecoder`` wraps a model (``GPT2Model`` or ``decoding.inference.InferenceModel``) as
the ``models.decoding.DecoderLM`` every strategy uses: its ``new_cache`` is a
``StaticKVCache`` and its forward runs embeddings, blocks and final LayerNorm with that
cache's mask (``GPT2Model.forward`` builds masks over the written positions only). The
attention layers are the model's own and read the cache through the ``BaseKVCache``
protocol, so greedy, sampling, beam and contrastive search, left padding and prefix tuning
give the tokens the dynamic cache gives.

    out = generate(StaticDecoder(model), ids, mask, max_new_tokens=64)   # same tokens
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from config import GPT2Config
from modules.attention import CausalSelfAttention
from modules.kv_cache import KVCache

# (body, ids (B, T), position ids (B or 1, T), key mask (B or 1, 1, T, S), cache) -> hidden (B, T, d)
Forward = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, "StaticKVCache"], torch.Tensor]


class StaticKVCache(KVCache):
    """``KVCache``'s storage written at a tensor position; ``append`` returns all
    ``max_length`` slots and ``key_mask`` says which of them a query may see."""

    def __init__(self, config: GPT2Config, batch_size: int, max_length: int, device: torch.device | str,
                 dtype: torch.dtype) -> None:
        super().__init__(config, batch_size, max_length, device, dtype)
        self._k.zero_()  # unwritten slots are read (and masked): NaN garbage would leak through 0 * NaN
        self._v.zero_()
        self.position = torch.zeros(1, dtype=torch.long, device=device)  # ``length`` on the device
        self.slots = torch.arange(max_length, device=device)  # (S,)
        self.real = torch.ones(batch_size, max_length, dtype=torch.bool, device=device)  # False on left padding

    def start(self, attention_mask: torch.Tensor | None) -> None:
        """Before the prompt: empty again, and the prompt's left padding (B, P) recorded."""
        self.length = 0
        self.position.zero_()
        self.real.fill_(True)
        if attention_mask is not None:
            self.real[:, : attention_mask.size(1)] = attention_mask.bool()

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        at = self.position + self.slots[: k.size(2)]  # (T,) the new positions
        keys, values = self._k.select(0, layer), self._v.select(0, layer)  # (B, nh, S, hs)
        keys.index_copy_(2, at, k)
        values.index_copy_(2, at, v)
        return keys, values

    def advance(self, n: int) -> None:
        super().advance(n)
        self.position += n

    def key_mask(self, query_len: int) -> torch.Tensor:
        """(B, 1, T, S) True where each of the next ``query_len`` queries may attend: written or
        new slots up to its own position, pad keys excepted, itself always (as
        ``modules.attention.build_attention_mask`` does, so no row is fully masked)."""
        q_pos = (self.position + self.slots[:query_len])[:, None]  # (T, 1)
        k_pos = self.slots[None, :]  # (1, S)
        return ((k_pos <= q_pos)[None] & self.real[:, None, :] | (k_pos == q_pos)[None])[:, None]

    def step_tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensors a step reads or writes besides the weights (a compiler may pin their addresses)."""
        return self._k, self._v, self.position, self.slots, self.real

    def check_room(self, new: int) -> None:
        self._check_room(new)

    def reorder(self, index: torch.Tensor) -> None:
        """Row i becomes old row index[i]: in place when the row count stays (the storage keeps its
        address), in new storage when it changes (``repeat_rows``)."""
        if index.numel() != self.batch_size:
            self._k, self._v = self._k.index_select(1, index), self._v.index_select(1, index)
            self.real = self.real.index_select(0, index)
            return
        self._k.copy_(self._k.index_select(1, index))
        self._v.copy_(self._v.index_select(1, index))
        self.real.copy_(self.real.index_select(0, index))


def static_forward(body: nn.Module, ids: torch.Tensor, position_ids: torch.Tensor | None, mask: torch.Tensor,
                   cache: StaticKVCache, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Hidden states (B, T, d) of ``ids`` after the cached positions, in eval mode: the embeddings
    and blocks of ``GPT2Model.forward`` under an explicit mask over every slot, and no Python value
    that changes with the position (attention reads the cache's ``length`` but, given a mask, never
    uses it: tests/test_compiled_decode.py counts one graph for every position). Without
    ``position_ids``, ``attention_mask`` counts the prompt's positions over its real tokens."""
    x = body.embed(ids, attention_mask, position_ids)  # (B, T, d)
    for block in body.h:
        x = block(x, mask, cache)
    return body.ln_f(x)


class StaticDecoder:
    """A ``DecoderLM`` over ``model`` that decodes with a ``StaticKVCache``. ``step`` runs the
    one-token steps (``static_forward``, or a compiled form of it: ``decoding.compiled``); the
    prompt always runs eagerly. Without a cache (``use_cache=False``) it is ``model`` itself.
    Decoding only: ``model`` is put in eval mode and stays there; one ``generate`` at a time (the
    cache is reused from call to call)."""

    training = False

    def __init__(self, model: nn.Module, step: Forward = static_forward) -> None:
        body = getattr(model, "body", model)  # an InferenceModel's GPT2Model, or the GPT2Model
        if any(type(b.attn).new_cache is not CausalSelfAttention.new_cache for b in body.h):
            raise ValueError("a static cache needs dense attention (every position cached); "
                             f"{type(body.h[0].attn).__name__} brings its own cache")
        self.model, self.body, self.step = model, body, step
        self.cache: StaticKVCache | None = None  # the last one, handed out again for the same shape

    @property
    def config(self):
        return self.body.config

    @property
    def device(self) -> torch.device:
        return self.body.wpe.weight.device

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: StaticKVCache | None = None,
                ) -> dict[str, torch.Tensor]:
        """``last_hidden_state`` (B, T, d) as ``GPT2Model.forward`` gives it. With the cache,
        ``attention_mask`` is read once, at the prompt (its left padding, its positions); later
        steps take their positions from ``position_ids`` or the cache."""
        if cache is None:
            return self.model(input_ids, attention_mask, position_ids)
        T = input_ids.size(1)
        if cache.length == 0:
            cache.start(attention_mask)
        cache.check_room(T)
        if position_ids is None and attention_mask is None:  # from the cache's tensor, not its Python length:
            position_ids = (cache.position + cache.slots[:T])[None]  # (1, T), the step compiles once
        mask = cache.key_mask(T)
        if T == 1 and position_ids is not None:
            hidden = self.step(self.body, input_ids, position_ids, mask, cache)
        else:  # the prompt, eagerly (GPT2Model.embed counts its positions over the real tokens)
            hidden = static_forward(self.body, input_ids, position_ids, mask, cache, attention_mask)
        cache.advance(T)
        return {"last_hidden_state": hidden}

    def hidden_state_to_token(self, hidden_state: torch.Tensor) -> torch.Tensor:
        return self.model.hidden_state_to_token(hidden_state)

    def new_cache(self, batch_size: int, max_length: int, dtype: torch.dtype | None = None) -> StaticKVCache:
        """The previous cache, emptied, when it has this shape (a CUDA graph keeps replaying on the
        same storage), else a new one."""
        wpe = self.body.wpe.weight  # an inference copy's wte may be a layout without a weight
        c, dtype = self.cache, dtype or wpe.dtype
        if c is None or (c.batch_size, c.max_length, c.step_tensors()[0].dtype) != (batch_size, max_length, dtype):
            self.cache = StaticKVCache(self.config, batch_size, max_length, wpe.device, dtype)
        self.cache.start(None)
        return self.cache

    def train(self, mode: bool = True) -> StaticDecoder:
        if mode:
            raise RuntimeError("a StaticDecoder only decodes: train the model it wraps")
        self.model.train(False)
        return self
