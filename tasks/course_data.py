"""The course's task files: what each holds, read into plain dataclasses, and the
prediction files written back byte-for-byte in the starter's format.

- Sentiment (SST, CFIMDB): ``SENTIMENT_LABELS``, ``read_sentiment``, ``sentiment_features``.
- Paraphrase (Quora as cloze prompts): ``tasks.quora_data``, which only the paraphrase task loads.
- Sonnets: ``read_sonnets`` / ``write_sonnets``.
- ``write_id_predictions``: the starter's ``id, value`` output of the classification tasks, and
  ``check_ids``: ids that this output can hold (unique, without its ``, `` separator).

Generic reading, tokenisation and batching live in ``engine.data``; this module holds
only what is particular to the course's files.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.data import DataFormatError, encode, parse_int, read_text, read_tsv

# ----------------------------------------------------------- sentiment (SST, CFIMDB)


@dataclass
class SentimentExample:
    id: str
    text: str
    label: int | None  # None in the test files
    line: int = 0  # where it was read, for messages
    path: str = ""


# The label set of each sentiment task: a label outside it is an error naming its line, not a
# wider head (an SST file with a stray label 7 used to train an 8-way classifier).
SENTIMENT_LABELS: dict[str, tuple[int, ...]] = {"sst": (0, 1, 2, 3, 4), "cfimdb": (0, 1)}


def read_sentiment(
    path: str | Path, limit: int = 0, lowercase: bool = True, labels: Sequence[int] | None = None
) -> list[SentimentExample]:
    """SST / CFIMDB rows. The ``sentiment`` column is read when the file has one (train, dev)
    and absent in test files; with ``labels`` (e.g. ``SENTIMENT_LABELS["sst"]``) every label must
    be one of them. Text is stripped and, as in the starter, lowercased."""
    records = read_tsv(path, required=("id", "sentence"), optional=("sentiment",), limit=limit)
    out = []
    for r in records:
        label = parse_int(r, "sentiment", path, allowed=labels) if "sentiment" in r.fields else None
        if label is not None and label < 0:
            raise DataFormatError(path, r.line, f"column 'sentiment': negative label {label}")
        text = r["sentence"].lower() if lowercase else r["sentence"]
        out.append(SentimentExample(id=r["id"].lower(), text=text, label=label, line=r.line, path=str(path)))
    check_ids(path, [(e.id, e.line) for e in out])
    return out


def sentiment_features(
    examples: Sequence[SentimentExample],
    tokenizer: Any,
    max_length: int,
    name: str = "",
) -> list[dict[str, Any]]:
    """Example dicts for PadCollator: ``input_ids``, ``id``, ``index`` (position in the file, to
    restore order after length-sorted evaluation) and ``labels`` when known."""
    ids = encode(tokenizer, [e.text for e in examples], max_length, name,
                 origins=[(e.path or name or "data", e.line or None) for e in examples])
    feats = []
    for i, (e, x) in enumerate(zip(examples, ids)):
        f: dict[str, Any] = {"input_ids": x, "id": e.id, "index": i}
        if e.label is not None:
            f["labels"] = e.label
        feats.append(f)
    return feats


# ----------------------------------------------------------- sonnets

SONNETS_HEADER = "--Generated Sonnets-- "


@dataclass
class Sonnet:
    number: int  # the number on the separator line above it in the file
    text: str  # stripped; lines joined by "\n"
    line: int = 0  # line of the separator in the source file, for messages


def read_sonnets(path: str | Path, limit: int = 0) -> list[Sonnet]:
    """Sonnets of a course file: a header, then sonnets each preceded by a line holding
    only its number. Splits exactly where the starter's ``re.split(r'\\n\\s*\\d+\\s*\\n')``
    does on these files (CRLF or LF), and reads prediction files back the same way."""
    path = Path(path)
    lines = read_text(path).replace("\r\n", "\n").replace("\r", "\n").split("\n")  # as universal newlines
    sonnets: list[Sonnet] = []
    current: Sonnet | None = None
    body: list[str] = []
    for lineno, text in enumerate(lines, start=1):
        if text.strip().isdigit() and lineno > 1:
            if current is not None:
                sonnets.append(Sonnet(current.number, "\n".join(body).strip(), current.line))
            current, body = Sonnet(int(text.strip()), "", lineno), []
        elif current is not None:
            body.append(text)
    if current is None:
        raise DataFormatError(path, None, "no sonnets found: expected a header, then each sonnet after a line "
                                          "holding only its number")
    sonnets.append(Sonnet(current.number, "\n".join(body).strip(), current.line))
    for s in sonnets:
        if not s.text:
            raise DataFormatError(path, s.line, f"sonnet {s.number} is empty")
    return sonnets[:limit] if limit else sonnets


def write_sonnets(path: str | Path, sonnets: Sequence[tuple[int | str, str]]) -> None:
    """The starter's prediction file: ``--Generated Sonnets-- ``, a blank line, then for each
    (id, text) a blank line, the id on its own line, the text and two newlines. The starter
    writes each sonnet's position in the prompt file as its id; ``read_sonnets`` reads it back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{SONNETS_HEADER}\n\n")
        for sid, text in sonnets:
            f.write(f"\n{sid}\n")
            f.write(f"{text}\n\n")


# ----------------------------------------------------------- prediction files (sentiment, paraphrase)


def write_id_predictions(path: str | Path, column: str, ids: Sequence[str], values: Sequence[Any]) -> None:
    """The starter's classification output, byte for byte: a header ``id \\t <column> `` and one
    line ``<id>, <value> `` per example (e.g. ``Predicted_Sentiment``, ``Predicted_Is_Paraphrase``)."""
    if len(ids) != len(values):
        raise ValueError(f"{path}: {len(ids)} ids but {len(values)} predictions")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.write(f"id \t {column} \n")
        for i, v in zip(ids, values):
            f.write(f"{i}, {v} \n")


ID_SEPARATOR = ", "  # between id and value on each line of a prediction file


def check_ids(path: str | Path, ids: Sequence[tuple[str, int]]) -> None:
    """Refuse (id, line) pairs that a prediction file cannot hold unambiguously: an id given twice
    gets two predictions that no grader can tell apart, and an id containing ``, `` cannot be
    split from its value. The error names the file, the first such line and the others."""
    seen: dict[str, list[int]] = {}
    for ident, line in ids:
        if ID_SEPARATOR in ident:
            raise DataFormatError(path, line, f"id {ident!r} contains {ID_SEPARATOR!r}, the separator of the "
                                              "'<id>, <value> ' prediction lines, so no reader can tell where it "
                                              "ends: remove it from the id")
        seen.setdefault(ident, []).append(line)
    repeated = [(ident, lines) for ident, lines in seen.items() if len(lines) > 1]
    if repeated:
        ident, lines = min(repeated, key=lambda x: x[1][1])
        more = f" ({len(repeated) - 1} more id(s) repeated)" if len(repeated) > 1 else ""
        raise DataFormatError(path, lines[0], f"id {ident!r} is repeated on line(s) {', '.join(map(str, lines[1:]))}"
                                              f"{more}; each id needs one prediction: remove or rename the repeats")
