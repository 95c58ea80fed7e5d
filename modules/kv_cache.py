"""Key/value caches for decoding, behind one interface that attention layers and
decoding loops use instead of the tensors.

``BaseKVCache`` holds what every cache shares: preallocated (L, B, nh, slots, hs)
keys and values, the number of positions written (``length``, a Python int, so
decoding never synchronises with the device to index it), row selection for
beams and candidates, and copying one position between rows. A subclass says
only where a position is stored (``slot``) and what a new query may see
(``append``). ``KVCache`` keeps one slot per position, filled left to right; an
attention class that sees fewer keys may bring its own, smaller cache (its
``new_cache``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from config import GPT2Config


class BaseKVCache(ABC):
    """Keys and values of every layer for a batch of rows.

    The protocol: a forward pass calls ``append`` once per layer with that step's
    keys/values, then ``advance`` once with the number of new positions; decoding
    loops use ``batch_size``, ``length``, ``reorder``, ``repeat_rows`` and
    ``copy_last_position``, never the storage itself.
    """

    def __init__(self, config: GPT2Config, batch_size: int, max_length: int, slots: int,
                 device: torch.device | str, dtype: torch.dtype) -> None:
        shape = (config.num_hidden_layers, batch_size, config.num_attention_heads, slots, config.head_dim)
        self._k = torch.empty(shape, device=device, dtype=dtype)
        self._v = torch.empty(shape, device=device, dtype=dtype)
        self.max_length = max_length
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self._k.size(1)

    @property
    def capacity(self) -> int:
        """Positions held in memory per row and layer."""
        return self._k.size(3)

    @abstractmethod
    def slot(self, position: int) -> int:
        """Where ``position`` is stored (it must be one of the positions still held)."""

    @abstractmethod
    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's (B, nh, T, hs) keys/values of ``layer`` after the ``length``
        cached positions; return, in position order, every key/value a new query may
        attend to: (B, nh, S, hs), the new ones last."""

    def _check_room(self, new: int) -> None:
        if self.length + new > self.max_length:
            raise ValueError(f"KV cache full: {self.length + new} positions > max_length {self.max_length}")

    def advance(self, n: int) -> None:
        """The forward pass has appended ``n`` positions to every layer."""
        self.length += n

    def reorder(self, index: torch.Tensor) -> None:
        """Select rows (beam search): row i becomes old row index[i]."""
        self._k = self._k.index_select(1, index)
        self._v = self._v.index_select(1, index)

    def repeat_rows(self, k: int) -> None:
        """Repeat every row k times (row b -> rows b*k .. b*k+k-1): beams or candidates of one prompt."""
        self.reorder(torch.arange(self.batch_size, device=self._k.device).repeat_interleave(k))

    def copy_last_position(self, index: torch.Tensor) -> None:
        """At the last written position only, row i takes the keys/values of row index[i]
        (contrastive search: siblings adopt the chosen candidate's step, one position
        instead of the whole cache)."""
        t = self.slot(self.length - 1)
        self._k[:, :, :, t] = self._k[:, :, :, t].index_select(1, index)
        self._v[:, :, :, t] = self._v[:, :, :, t].index_select(1, index)


class KVCache(BaseKVCache):
    """One slot per position, filled left to right: preallocation avoids a ``torch.cat``
    per layer per step."""

    def __init__(self, config: GPT2Config, batch_size: int, max_length: int, device: torch.device | str,
                 dtype: torch.dtype) -> None:
        super().__init__(config, batch_size, max_length, max_length, device, dtype)

    def slot(self, position: int) -> int:
        return position

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = k.size(2)
        self._check_room(T)
        keys, values = self._k.select(0, layer), self._v.select(0, layer)  # narrow, not tuple indexing
        keys.narrow(2, self.length, T).copy_(k)
        values.narrow(2, self.length, T).copy_(v)
        return keys.narrow(2, 0, self.length + T), values.narrow(2, 0, self.length + T)
