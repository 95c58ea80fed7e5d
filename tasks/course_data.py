"""The course's task files: what each holds, read into plain dataclasses, and the
prediction files written back byte-for-byte in the starter's format.

- Sentiment (SST, CFIMDB): ``SENTIMENT_LABELS``, ``read_sentiment``, ``sentiment_features``.
- Paraphrase (Quora as cloze prompts): ``read_quora`` (twice-quoted questions decoded),
  ``PARAPHRASE_PROMPT`` and its features, and ``load_quora_splits``, which carves
  deterministic train/dev/test splits from ``quora-minbert-dev.csv`` when the course's
  files are not there (offline).
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

import torch

from engine.data import DataFormatError, check_encoded, encode, parse_int, read_text, read_tsv

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


# ----------------------------------------------------------- paraphrase (Quora, cloze prompts)

# One template for train, dev and test (the course starter used two different ones, so its
# test prompts were never seen in training). It ends with a newline so that the answer is
# the line-initial token "yes" / "no" (8505 / 3919) that GPT-2 writes after a question.
PARAPHRASE_PROMPT = 'Question 1: "{s1}"\nQuestion 2: "{s2}"\nAre these questions asking the same thing?\n'
QUORA_CARVE_SOURCE = "quora-minbert-dev.csv"  # the only Quora file available offline
QUORA_CARVE_FRACTIONS = (0.8, 0.1, 0.1)  # train / dev / test
QUORA_CARVE_SEED = 11711  # fixed apart from --seed, so the offline splits never move
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@dataclass
class ParaphrasePair:
    id: str
    sentence1: str
    sentence2: str
    label: int | None  # 1 = same question, 0 = not; None in test files
    line: int = 0  # line in the source file, for messages
    path: str = ""  # the source file, for messages


def unquote_twice_quoted(field: str) -> str:
    """Undo the second CSV quoting of the course's Quora files.

    Their questions with quotes were CSV-escaped twice (``\"\"\"Do I need \"\"\"\"the\"\"\"\" here?\"\"\"``
    in the file); the csv module removes one layer and leaves ``\"Do I need \"\"the\"\" here?\"``.
    A value that is still a well-formed quoted CSV field loses that layer too; anything else
    (such as the lone leading quote of a row the dataset's authors cut short) is kept as is."""
    if len(field) >= 2 and field[0] == '"' and field[-1] == '"':
        inner = field[1:-1]
        if '"' not in inner.replace('""', ""):
            return inner.replace('""', '"')
    return field


def read_quora(
    path: str | Path, labeled: bool | None = None, limit: int = 0, verbose: bool = True
) -> list[ParaphrasePair]:
    """Quora pairs from a course TSV (header ``\\tid\\tsentence1\\tsentence2[\\tis_duplicate]``).

    ``labeled=None`` follows the header (the course's test file has no ``is_duplicate``);
    ``labeled=True`` demands the column. Quoted questions are decoded fully (see
    ``unquote_twice_quoted``). A labeled row whose label is empty or not 0/1 cannot be used:
    it is left out and reported with its line (the starter dropped such rows silently). An
    empty question is kept, since the test file needs a prediction for every id, and reported.
    A row with the wrong number of fields raises ``DataFormatError`` with its line, and so does a
    labeled file none of whose rows has a usable label (it would train on nothing)."""
    records = read_tsv(path, required=("id",), optional=("sentence1", "sentence2", "is_duplicate"), limit=limit)
    check_ids(path, [(r["id"].lower(), r.line) for r in records])
    if records:
        absent = [c for c in ("sentence1", "sentence2") if c not in records[0].fields]
        if absent:
            raise DataFormatError(path, 1, f"header lacks column(s) {absent}")
        has_label = "is_duplicate" in records[0].fields
        if labeled and not has_label:
            raise DataFormatError(path, 1, "header lacks column 'is_duplicate' (a train or dev file needs labels)")
        labeled = has_label if labeled is None else labeled
    pairs: list[ParaphrasePair] = []
    unlabeled: list[str] = []
    empty: list[int] = []
    for r in records:
        label = None
        if labeled:
            try:
                label = parse_int(r, "is_duplicate", path, allowed=(0, 1))
            except DataFormatError as e:
                unlabeled.append(f"line {r.line} ({e.problem})")
                continue
        s1, s2 = unquote_twice_quoted(r["sentence1"]), unquote_twice_quoted(r["sentence2"])
        if not s1 or not s2:
            empty.append(r.line)
        pairs.append(ParaphrasePair(r["id"].lower(), s1, s2, label, r.line, str(path)))
    if not pairs:
        raise DataFormatError(path, None, f"no usable rows: none of its {len(records)} row(s) has an is_duplicate "
                                          f"label of 0 or 1 (first: {unlabeled[0]}); fix the labels")
    if verbose and unlabeled:
        print(f"warning: {path}: left out {len(unlabeled)} row(s) without a usable is_duplicate label: "
              + "; ".join(unlabeled))
    if verbose and empty:
        print(f"warning: {path}: empty question on line(s) {empty} (kept)")
    return pairs


def carve_quora_splits(
    source: str | Path,
    fractions: tuple[float, float, float] = QUORA_CARVE_FRACTIONS,
    seed: int = QUORA_CARVE_SEED,
    verbose: bool = True,
) -> dict[str, list[ParaphrasePair]]:
    """Deterministic ``train``/``dev``/``test`` splits of one labeled Quora file (a seeded
    shuffle cut by ``fractions``), for offline runs. Test pairs keep their labels."""
    pairs = read_quora(source, labeled=True, verbose=verbose)
    n_train, n_dev = int(fractions[0] * len(pairs)), int(fractions[1] * len(pairs))
    if min(n_train, n_dev, len(pairs) - n_train - n_dev) == 0:
        raise DataFormatError(source, None, f"{len(pairs)} usable pair(s) are too few to carve train, dev and test "
                                            "splits from (each needs one); pass --para_train/--para_dev/--para_test")
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    cuts = {"train": order[:n_train], "dev": order[n_train:n_train + n_dev], "test": order[n_train + n_dev:]}
    return {split: [pairs[i] for i in idx] for split, idx in cuts.items()}


def load_quora_splits(
    train: str | Path,
    dev: str | Path,
    test: str | Path,
    limit: int = 0,
    fallback: str | Path | None = None,
) -> dict[str, list[ParaphrasePair]]:
    """The ``train``/``dev``/``test`` Quora pairs (first ``limit`` of each when > 0).

    A split whose file does not exist is taken from deterministic 80/10/10 splits carved
    from ``fallback`` (default: ``quora-minbert-dev.csv`` beside the missing file, else in
    ../shared/data), with a one-line notice. Offline, setup.sh copies only that file into
    data/, so the default paths end up here; a custom ``--para_train`` still pairs with
    carved dev and test splits."""
    paths = {"train": Path(train), "dev": Path(dev), "test": Path(test)}
    missing = [s for s, p in paths.items() if not p.exists()]
    out: dict[str, list[ParaphrasePair]] = {}
    if missing:
        looked = [Path(fallback)] if fallback else [paths[missing[0]].parent / QUORA_CARVE_SOURCE,
                                                    SHARED_DATA / QUORA_CARVE_SOURCE]
        source = next((p for p in looked if p.exists()), None)
        if source is None:
            raise DataFormatError(paths[missing[0]], None,
                                  f"file does not exist, and there is no {QUORA_CARVE_SOURCE} to carve offline "
                                  f"splits from (looked at {', '.join(map(str, looked))}); run setup.sh or pass "
                                  "--para_train/--para_dev/--para_test")
        carved = carve_quora_splits(source)
        pct = "/".join(str(round(100 * f)) for f in QUORA_CARVE_FRACTIONS)
        print(f"note: {', '.join(str(paths[s]) for s in missing)} not found: {', '.join(missing)} carved "
              f"({pct} train/dev/test, seed {QUORA_CARVE_SEED}) from {source}; offline stand-in, "
              "not the course's splits")
        out = {s: carved[s][:limit] if limit else carved[s] for s in missing}
    for split, p in paths.items():
        if split not in out:
            out[split] = read_quora(p, labeled=True if split != "test" else None, limit=limit)
    return out


def encode_paraphrase_prompt(tokenizer: Any, sentence1: str, sentence2: str, max_length: int) -> tuple[list[int], bool]:
    """Token ids of ``PARAPHRASE_PROMPT`` for one pair, at most ``max_length`` long, and
    whether it had to be cut. The questions are cut (the longer first), never the answer
    cue. The prompt is always tokenized whole, as GPT-2 read text in pretraining, so cut
    questions are decoded and the prompt re-encoded."""
    ids = tokenizer.encode(PARAPHRASE_PROMPT.format(s1=sentence1, s2=sentence2))
    if len(ids) <= max_length:
        return ids, False
    q = [tokenizer.encode(sentence1), tokenizer.encode(sentence2)]
    budget = max_length - (len(ids) - len(q[0]) - len(q[1]))  # tokens left for the questions
    while budget > 0:
        while len(q[0]) + len(q[1]) > budget:
            longer = 0 if len(q[0]) >= len(q[1]) else 1
            q[longer] = q[longer][:-1]
        ids = tokenizer.encode(PARAPHRASE_PROMPT.format(s1=tokenizer.decode(q[0]), s2=tokenizer.decode(q[1])))
        if len(ids) <= max_length:
            return ids, True
        budget -= len(ids) - max_length  # tokens merged differently at a cut; cut a little more
    raise ValueError(f"max_length {max_length} leaves no room for the questions in the paraphrase prompt")


def paraphrase_features(
    pairs: Sequence[ParaphrasePair], tokenizer: Any, max_length: int, name: str = "", verbose: bool = True
) -> list[dict[str, Any]]:
    """Example dicts for PadCollator, built the same way for every split: ``input_ids`` (the
    cloze prompt), ``id``, ``index`` (position in ``pairs``) and ``labels`` (0/1) when known.
    Prints how many prompts had their questions cut to fit ``max_length``."""
    prompts = [PARAPHRASE_PROMPT.format(s1=p.sentence1, s2=p.sentence2) for p in pairs]
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"] if prompts else []  # one fast batch call
    check_encoded(prompts, encoded, [(p.path or name or "paraphrase", p.line or None) for p in pairs])
    feats, n_cut = [], 0
    for i, (p, ids) in enumerate(zip(pairs, encoded)):
        if len(ids) > max_length:
            ids, _ = encode_paraphrase_prompt(tokenizer, p.sentence1, p.sentence2, max_length)
            n_cut += 1
        f: dict[str, Any] = {"input_ids": ids, "id": p.id, "index": i}
        if p.label is not None:
            f["labels"] = p.label
        feats.append(f)
    if n_cut and verbose:
        print(f"{name or 'paraphrase'}: cut the questions of {n_cut} of {len(pairs)} prompts to fit "
              f"{max_length} tokens")
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
