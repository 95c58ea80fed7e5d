"""The course's Quora files for the cloze paraphrase task: ``read_quora`` (twice-quoted questions
decoded), ``PARAPHRASE_PROMPT`` and its features, and ``load_quora_splits``, which carves
deterministic train/dev/test splits from ``quora-minbert-dev.csv`` when the course's files are not
there (offline). The sentiment and sonnet files, and the prediction-file format, are
``tasks.course_data``'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.data import DataFormatError, check_encoded, parse_int, read_tsv
from tasks.course_data import check_ids

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
