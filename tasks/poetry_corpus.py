"""Pretraining corpora of poems: the Poetry Foundation CSV layout, or plain text.

Sonnet fine-tuning starts better from a model that has read verse. The corpus
users most often have is the Poetry Foundation collection as published on Kaggle
("Poetry Foundation Poems", about 13.9k poems): a CSV with the columns
``Title,Poem,Poet,Tags`` (in the Kaggle file after a leading unnamed index
column), where each poem is one quoted, multi-line field whose lines end in
``\\r\\r\\n`` and carry stray indentation. ``read_poems`` reads that layout (any
column order, extra columns ignored, names matched without regard to case or
surrounding spaces) and ``read_documents`` turns a corpus file -- that CSV, or any
plain text file such as ``tinyshakespeare.txt`` -- into the list of documents an
LM pretraining run tokenises (e.g. each followed by the end-of-text token, so that
no poem runs into the next).

A malformed file fails before any work starts, with ``DataFormatError`` and its
``file:line`` (the line where the offending record starts): a missing file, an
empty one, a header without a ``Poem`` column, a record with the wrong number of
fields, an unterminated quote, bytes that are not UTF-8, or no poem at all.
Records whose poem is empty are skipped and counted.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from engine.data import DataFormatError

POEM_COLUMN = "poem"
OPTIONAL_COLUMNS = ("title", "poet", "tags")
FORMATS = ("auto", "csv", "text")


@dataclass(frozen=True)
class Poem:
    """One record of a Poetry Foundation CSV, its text normalised by ``clean_poem``."""

    text: str
    title: str = ""
    poet: str = ""
    tags: str = ""
    line: int = 0  # line of the file where the record starts, for messages


def clean_poem(text: str) -> str:
    """The poem with its line structure kept and the Kaggle file's noise removed: every kind
    of line break (``\\r\\r\\n``, ``\\r\\n``, ``\\r``) becomes ``\\n``, each line loses its
    surrounding spaces (non-breaking ones too), runs of blank lines become one blank line
    (stanza breaks stay), and the whole is stripped."""
    text = text.replace("\r\r\n", "\n").replace("\r\n", "\n").replace("\r", "\n")
    lines = [ln.replace("\u00a0", " ").strip() for ln in text.split("\n")]
    out: list[str] = []
    for ln in lines:
        if ln or (out and out[-1]):
            out.append(ln)
    return "\n".join(out).strip()


def _read_text(path: Path) -> str:
    """The file as UTF-8 text (a BOM is dropped), or a DataFormatError naming the line of the
    first bad byte."""
    if not path.is_file():
        raise DataFormatError(path, None, "file does not exist; pass the path of a poetry CSV or a plain text corpus")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataFormatError(path, line, f"not UTF-8 text ({e.reason}); convert the file to UTF-8") from e
    if not text.strip():
        raise DataFormatError(path, 1, "the file is empty; expected a corpus")
    return text


def _records(path: Path, text: str) -> Iterator[tuple[int, list[str]]]:
    """(start line, fields) of each CSV record; csv errors (an unterminated quote) become
    DataFormatErrors at the line where the record starts. Lines are counted at ``\n`` only, as
    ``grep -n`` and ``sed`` count them (the Kaggle file's ``\r\r\n`` is one line end, not two)."""
    reader = csv.reader(io.StringIO(text, newline="\n"), strict=True)
    start = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise DataFormatError(path, start, f"malformed CSV record ({e}); check its quotes") from e
        yield start, row
        start = reader.line_num + 1


def read_poems(path: str | Path, limit: int = 0, verbose: bool = False) -> list[Poem]:
    """Poems of a CSV in the Poetry Foundation layout (``Title,Poem,Poet,Tags``; only ``Poem``
    is required), in file order; ``limit`` > 0 keeps the first ``limit`` poems. Blank records
    are skipped; records with an empty poem are skipped and, with ``verbose``, counted aloud."""
    path = Path(path)
    text = _read_text(path)
    field_limit = csv.field_size_limit()
    csv.field_size_limit(max(field_limit, 1 << 28))  # one poem can exceed the default 128 KiB field limit
    try:
        return _parse_poems(path, _records(path, text), limit, verbose)
    finally:
        csv.field_size_limit(field_limit)


def _parse_poems(path: Path, records: Iterator[tuple[int, list[str]]], limit: int, verbose: bool) -> list[Poem]:
    _, header = next(records)
    names = [h.strip().lower() for h in header]
    if POEM_COLUMN not in names:
        raise DataFormatError(path, 1, f"header {header} has no Poem column; expected the Poetry Foundation "
                                       "layout Title,Poem,Poet,Tags (or pass a plain text corpus)")
    index = {c: names.index(c) for c in (POEM_COLUMN, *OPTIONAL_COLUMNS) if c in names}
    poems: list[Poem] = []
    empty = 0
    for line, row in records:
        if not row or all(not f.strip() for f in row):
            continue
        if len(row) != len(header):
            raise DataFormatError(path, line, f"record has {len(row)} fields, the header has {len(header)}; "
                                              "check the quoting of this poem")
        text = clean_poem(row[index[POEM_COLUMN]])
        if not text:
            empty += 1
            continue
        extra = {c: " ".join(row[i].split()) for c, i in index.items() if c != POEM_COLUMN}
        poems.append(Poem(text=text, line=line, **extra))
        if limit and len(poems) == limit:
            break
    if not poems:
        raise DataFormatError(path, None, "no poem found: every record's Poem field is empty")
    if verbose and empty:
        print(f"{path}: skipped {empty} record(s) with an empty poem")
    return poems


def is_poetry_csv(path: str | Path) -> bool:
    """Whether ``read_documents(path, "auto")`` reads the file as a poetry CSV: by its suffix."""
    return Path(path).suffix.lower() == ".csv"


def read_documents(path: str | Path, fmt: str = "auto", *, with_title: bool = False, limit: int = 0,
                   verbose: bool = False) -> list[str]:
    """The documents of a pretraining corpus: one per poem of a Poetry Foundation CSV (its title
    and a blank line first, with ``with_title``), or the whole text of a plain text file as one
    document. ``fmt`` is ``csv``, ``text``, or ``auto`` (CSV for a ``.csv`` suffix)."""
    if fmt not in FORMATS:
        raise ValueError(f"corpus format must be one of {FORMATS}, got {fmt!r}")
    path = Path(path)
    if fmt == "csv" or (fmt == "auto" and is_poetry_csv(path)):
        poems = read_poems(path, limit=limit, verbose=verbose)
        return [f"{p.title}\n\n{p.text}" if with_title and p.title else p.text for p in poems]
    return [_read_text(path)]
