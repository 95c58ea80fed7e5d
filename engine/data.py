"""Dataset readers, tokenisation with counted truncation, and dynamic padding.

Shared base for every task:

- ``read_tsv(path, required, optional)`` reads a tab-separated file with a header and finds
  columns by name (the course's test files have a stray index column and an odd header such as
  ``0\\t\\tid\\tsentence``). Each physical line is one record, CSV-unquoted on its own, so a stray
  quote cannot swallow the following lines; a row with the wrong number of fields or an empty
  required field, a file with no data rows, or bytes that are not UTF-8 raise ``DataFormatError``
  naming the file and line. A UTF-8 BOM before the header is dropped; a field may be of any length.
- ``encode(tokenizer, texts, max_length)`` tokenises and truncates to the context,
  printing how many inputs were cut. The tokenizer is always passed in, never loaded here.
- ``ListDataset`` + ``PadCollator``: examples are dicts; batches are padded to their
  own longest sequence (not the context), with an ``attention_mask``.
- ``make_loader`` / ``make_eval_loader`` / ``restore_order``: the DataLoaders every task uses,
  and the undoing of the eval loader's length sort.
- ``count_examples``: what a batch's loss averages over (the examples; an LM counts its target
  tokens, ``modules.losses.count_lm_targets``), so the Trainer weighs accumulated micro-batches
  by their counts.

The course's own files (sentiment, Quora, sonnets, prediction files) are read and written
on top of these in ``tasks.course_data``.

``LengthGroupedSampler`` (``--group_by_length``): batches of similar lengths, so less compute
goes to padding. A random batch of sentences is padded to its longest member; when lengths vary
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

import csv
import random
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from engine import ranks
from engine.launch import sharded_sampler
from errors import InputError


class DataFormatError(InputError, ValueError):
    """Malformed input data; the message starts with ``file:line:``."""

    def __init__(self, path: str | Path, line: int | None, problem: str) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {problem}")
        self.path, self.line, self.problem = str(path), line, problem


@dataclass
class Record:
    """One data row: its 1-based line number in the file and its fields by column name."""

    line: int
    fields: dict[str, str]

    def __getitem__(self, column: str) -> str:
        return self.fields[column]


def read_tsv(
    path: str | Path,
    required: Sequence[str],
    optional: Sequence[str] = (),
    limit: int = 0,
    quoting: int = csv.QUOTE_MINIMAL,
) -> list[Record]:
    """Rows of a headed TSV file as Records holding the ``required`` and present ``optional``
    columns (values stripped). ``limit`` > 0 keeps the first ``limit`` rows. Blank lines are skipped;
    a file with only a header is an error (it would otherwise fail later, far from its cause)."""
    path = Path(path)
    if not (lines := split_lines(read_text(path).removeprefix("\ufeff"))):
        raise DataFormatError(path, 1, "empty file; expected a header line")
    with _field_limit(max(map(len, lines))):
        return _records(path, lines, required, optional, limit, quoting)


def split_lines(text: str) -> list[str]:
    """Lines broken at ``\\n``, ``\\r\\n`` and ``\\r`` only: ``str.splitlines`` also breaks at the form
    feeds, U+0085 and U+2028 found inside sentences, splitting a row and shifting later line numbers."""
    lines = re.split(r"\r\n|\r|\n", text)
    return lines[:-1] if lines[-1] == "" else lines


@contextmanager
def _field_limit(longest: int) -> Iterator[None]:
    """The csv module refuses fields over 131,072 characters to stop a stray quote swallowing a file;
    each line is parsed alone here, so allow its longest line (a long review is read, then truncated
    to the context like any other) and put the process-wide limit back after."""
    previous = csv.field_size_limit()
    csv.field_size_limit(max(previous, longest))
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def _records(path: Path, lines: list[str], required: Sequence[str], optional: Sequence[str], limit: int,
             quoting: int) -> list[Record]:
    header = [h.strip() for h in _split(lines[0], quoting)]
    missing = [c for c in required if c not in header]
    if missing:
        raise DataFormatError(path, 1, f"header {header} lacks column(s) {missing}")
    wanted = [c for c in (*required, *optional) if c in header]
    index = {c: header.index(c) for c in wanted}
    records: list[Record] = []
    for lineno, text in enumerate(lines[1:], start=2):
        if not text.strip():
            continue
        values = _split(text, quoting)
        if len(values) != len(header):
            raise DataFormatError(path, lineno, f"expected {len(header)} tab-separated fields as in the header, "
                                                f"found {len(values)}")
        fields = {c: values[i].strip() for c, i in index.items()}
        empty = [c for c in required if not fields[c]]
        if empty:
            raise DataFormatError(path, lineno, f"empty value in column(s) {empty}")
        records.append(Record(lineno, fields))
        if limit and len(records) >= limit:
            break
    if not records:
        raise DataFormatError(path, 1, "a header but no data rows; the file needs at least one example")
    return records


def read_text(path: str | Path) -> str:
    """A data file's text (newlines as in the file), or a DataFormatError naming the file and the
    line of the first byte that is not UTF-8 (a bare UnicodeDecodeError gives only a byte offset)."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(path, None, "file does not exist (run setup.sh to download the data, or pass the path)")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataFormatError(path, line, f"not UTF-8 text (byte 0x{raw[e.start]:02x}: {e.reason}); "
                                          "save the file as UTF-8") from None


def _split(line: str, quoting: int) -> list[str]:
    return next(csv.reader([line], delimiter="\t", quoting=quoting))


def parse_int(record: Record, column: str, path: str | Path, allowed: Sequence[int] | None = None) -> int:
    """An integer field (``"3"`` or ``"3.0"``) or a DataFormatError naming file, line and value."""
    raw = record[column]
    try:
        value = float(raw)
        if not value.is_integer():
            raise ValueError
    except ValueError:
        raise DataFormatError(path, record.line, f"column {column!r}: {raw!r} is not an integer") from None
    if allowed is not None and int(value) not in allowed:
        raise DataFormatError(path, record.line, f"column {column!r}: {int(value)} is not one of {list(allowed)}; "
                                                 "fix the line or pass the file of the right task")
    return int(value)


def sample(items: Sequence[Any], n: int, seed: int) -> list[Any]:
    """``n`` items drawn without replacement by a seeded generator, kept in file order; all if
    ``n`` is 0 or too large. For ``--limit`` on training files, whose rows may be sorted by label
    (the first 3,000 SST training rows are 80% labels 3 and 4)."""
    if not n or n >= len(items):
        return list(items)
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in keep]


# ----------------------------------------------------------- tokenisation


def encode(
    tokenizer: Any,
    texts: Sequence[str],
    max_length: int,
    name: str = "",
    verbose: bool = True,
    origins: Sequence[tuple[str | Path, int | None]] | None = None,
) -> list[list[int]]:
    """Token ids of each text, cut to the first ``max_length`` tokens (as the starter's
    ``truncation=True``); prints how many were cut so long inputs are never lost silently.
    ``origins`` gives each text's (file, line) for ``check_encoded``'s errors."""
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
    check_encoded(texts, ids, origins or [(name or "data", None)] * len(ids))
    n_cut = sum(len(x) > max_length for x in ids)
    if n_cut and verbose:
        print(f"{name or 'data'}: truncated {n_cut} of {len(ids)} inputs to {max_length} tokens")
    return [x[:max_length] for x in ids]


def check_encoded(
    texts: Sequence[str], ids: Sequence[Sequence[int]], origins: Sequence[tuple[str | Path, int | None]]
) -> None:
    """An empty text, or a text that encodes to no tokens (a broken tokenizer), is an error
    naming its file and line: it is never trained on as nothing or silently replaced."""
    for text, x, (path, line) in zip(texts, ids, origins):
        if not text.strip():
            raise DataFormatError(path, line, "empty text; fill it in or remove the row")
        if not x:
            raise DataFormatError(path, line, f"{text[:40]!r} encodes to no tokens: the tokenizer is broken "
                                              "(pass --tokenizer DIR with GPT-2's vocab.json and merges.txt)")


class ListDataset(Dataset):
    """A list of example dicts; what every task's DataLoader wraps."""

    def __init__(self, examples: Sequence[Mapping[str, Any]]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Mapping[str, Any]:
        return self.examples[i]


class PadCollator:
    """Batch example dicts, padding each ``pad_values`` key (lists of ints) to the batch's longest.

    ``input_ids`` (pad with the tokenizer's pad id) also yields ``attention_mask`` (1 = real).
    Other int/float fields become tensors; anything else (ids, texts) stays a list.
    ``padding_side="left"`` suits generation, where new tokens follow the prompt.
    """

    def __init__(self, pad_id: int, pad_values: Mapping[str, int] | None = None, padding_side: str = "right") -> None:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.pad_values = {"input_ids": pad_id, **(pad_values or {})}
        self.padding_side = padding_side

    def _pad(self, seqs: Sequence[Sequence[int]], value: int) -> torch.Tensor:
        T = max(len(s) for s in seqs)
        out = torch.full((len(seqs), T), value, dtype=torch.long)  # (B, T)
        for i, s in enumerate(seqs):
            if s:
                if self.padding_side == "right":
                    out[i, : len(s)] = torch.as_tensor(s)
                else:
                    out[i, T - len(s):] = torch.as_tensor(s)
        return out

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {}
        for key in examples[0]:
            values = [ex[key] for ex in examples]
            if key in self.pad_values:
                batch[key] = self._pad(values, self.pad_values[key])
                if key == "input_ids":
                    batch["attention_mask"] = self._pad([[1] * len(v) for v in values], 0)
            elif all(isinstance(v, (int, float, bool)) for v in values):
                batch[key] = torch.tensor(values)
            else:
                batch[key] = values
        return batch


def make_loader(
    examples: Sequence[Mapping[str, Any]],
    collate: Callable[[Sequence[Mapping[str, Any]]], Any],
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    group_by_length: bool = False,
    persistent_workers: bool = False,
) -> torch.utils.data.DataLoader:
    """The DataLoader every task uses. Shuffling draws from the global torch RNG (or, with
    ``group_by_length``, from the sampler's generator, seeded from it); the Trainer saves and
    restores both, so resumed runs see the same batches. ``group_by_length`` (with ``shuffle``)
    batches neighbours in length from a shuffled order (``engine.data``): less padding.
    Under torchrun a shuffled loader yields this rank's share of the batches one process of
    batch ``world x batch_size`` would see (``engine.launch.sharded_sampler``)."""
    dataset = ListDataset(examples)
    workers = dict(num_workers=num_workers, persistent_workers=persistent_workers)  # kept between epochs if set
    if shuffle and ranks.active():  # under torchrun: this rank's share of each global batch
        return torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, collate_fn=collate, **workers,
            sampler=sharded_sampler(_shuffled(examples, batch_size * ranks.world_size(), dataset, group_by_length),
                                    batch_size))
    if shuffle and group_by_length:
        sampler = LengthGroupedSampler([len(e["input_ids"]) for e in examples], batch_size)
        return torch.utils.data.DataLoader(dataset, batch_size, sampler=sampler, collate_fn=collate, **workers)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, collate_fn=collate, **workers)


def _shuffled(examples: Sequence[Mapping[str, Any]], global_batch: int, dataset: Dataset,
              group_by_length: bool) -> torch.utils.data.Sampler[int]:
    """The order one process with batch ``global_batch`` would draw: a RandomSampler, or a
    LengthGroupedSampler whose generator seed is rank 0's (drawn as the sampler draws it)."""
    if not group_by_length:
        return torch.utils.data.RandomSampler(dataset)
    seed = ranks.broadcast_object(int(torch.randint(0, 2**62, (1,)).item()))
    return LengthGroupedSampler([len(e["input_ids"]) for e in examples], global_batch,
                                generator=torch.Generator().manual_seed(seed))


def make_eval_loader(
    examples: Sequence[Mapping[str, Any]],
    collate: Callable[[Sequence[Mapping[str, Any]]], Any],
    batch_size: int,
    num_workers: int = 0,
) -> torch.utils.data.DataLoader:
    """Unshuffled batches of similar length (far less padding on long reviews). Examples should
    carry an ``index`` so that predictions can be put back in file order (``restore_order``)."""
    ordered = sorted(examples, key=lambda e: len(e["input_ids"]))
    return make_loader(ordered, collate, batch_size, shuffle=False, num_workers=num_workers)


def restore_order(indices: Sequence[int], values: Sequence[Any]) -> list[Any]:
    """``values`` listed in the order of their ``indices`` (undoes make_eval_loader's sort)."""
    if len(indices) != len(values) or sorted(indices) != list(range(len(indices))):
        raise ValueError("indices must be a permutation of range(len(values))")
    out: list[Any] = [None] * len(values)
    for i, v in zip(indices, values):
        out[i] = v
    return out


def count_examples(batch: Any) -> int:
    """Examples in a batch: the default ``count_fn`` (classification losses are means over examples)."""
    if isinstance(batch, torch.Tensor):
        return batch.size(0)
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    for v in batch if isinstance(batch, (list, tuple)) else ():
        if isinstance(v, (torch.Tensor, list, tuple)):
            return count_examples(v) if isinstance(v, torch.Tensor) else len(v)
    return 0


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
