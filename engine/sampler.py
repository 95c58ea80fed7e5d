"""Length-grouped shuffling: batches of similar lengths, so less compute goes to padding.

A random batch of sentences is padded to its longest member; when lengths vary
a lot (sonnets, Quora questions, IMDB reviews) much of every step is spent on
pad tokens. Sorting the whole dataset would remove the padding but also the
randomness. The usual compromise (as in ``transformers``' ``group_by_length``):
shuffle, cut the shuffled order into "mega-batches" of ``batch_size *
mega_batch_mult`` examples, sort each mega-batch by length, and cut it into
batches. Batches stay random across an epoch, but their members are neighbours
in length.

The sampler yields single indices, so it is passed as ``sampler=`` next to
``batch_size=`` (consecutive runs of ``batch_size`` indices are the batches),
and it draws its permutation from ``self.generator`` at the first ``next()``,
like ``RandomSampler``: the trainer saves and restores that generator to resume
mid-epoch exactly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class LengthGroupedSampler(Sampler[int]):
    """Indices in a random order where each consecutive ``batch_size`` block has similar lengths.

    Args:
        lengths: length (e.g. token count) of every example, in dataset order.
        batch_size: the DataLoader's batch size.
        mega_batch_mult: mega-batch size in batches; larger groups lengths more tightly
            but makes the order less random.
        generator: source of randomness (default: one seeded from the global torch RNG
            at construction, so ``torch.manual_seed`` makes runs reproducible).
        longest_first: put the batch holding the longest example first, so that an
            out-of-memory error shows at step 1 rather than hours in.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        mega_batch_mult: int = 50,
        generator: torch.Generator | None = None,
        longest_first: bool = True,
    ) -> None:
        if batch_size < 1 or mega_batch_mult < 1:
            raise ValueError(f"batch_size ({batch_size}) and mega_batch_mult ({mega_batch_mult}) must be >= 1")
        self.lengths = [int(n) for n in lengths]
        self.batch_size = batch_size
        self.mega = batch_size * mega_batch_mult
        if generator is None:
            generator = torch.Generator()
            generator.manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        self.generator = generator
        self.longest_first = longest_first

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        batches: list[list[int]] = []
        for s in range(0, len(order), self.mega):
            group = sorted(order[s : s + self.mega], key=lambda i: -self.lengths[i])
            batches.extend(group[b : b + self.batch_size] for b in range(0, len(group), self.batch_size))
        if self.longest_first and batches:
            # Only full batches move, so every batch but the final one stays full.
            top = max(range(len(batches)), key=lambda b: self.lengths[batches[b][0]])
            if len(batches[top]) == self.batch_size and len(batches[0]) == self.batch_size:
                batches[0], batches[top] = batches[top], batches[0]
        for batch in batches:
            yield from batch
