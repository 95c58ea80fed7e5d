"""CoLA (Warstadt, Singh and Bowman 2019, "Neural Network Acceptability Judgments"; the GLUE
grammatical-acceptability task): is an English sentence grammatical (1) or not (0)?

The files setup.sh fetches (``data/cola-train.tsv``, ``data/cola-dev.tsv``: the in-domain
training set and the out-of-domain development set, tokenized and lower-cased) have no header
and no ids: each line is ``sentence \\t label``. They are read into the sentiment reader's
``SentimentExample`` so that the classifier's features, loaders and prediction files serve
CoLA unchanged; each example's id is the file's name and its line (``cola-dev-12``), stable
across runs. GLUE scores CoLA by Matthews correlation (``tasks.metrics.matthews_corr``),
since 70% of the sentences are grammatical and accuracy flatters a majority guess.
"""

from __future__ import annotations

from pathlib import Path

from engine.data import DataFormatError, Record, parse_int
from tasks.course_data import SentimentExample

COLA_FILES = {"train": "cola-train.tsv", "dev": "cola-dev.tsv"}
COLA_LABELS = 2


def read_cola(path: str | Path, limit: int = 0, lowercase: bool = True) -> list[SentimentExample]:
    """Labelled CoLA sentences of a ``sentence \\t label`` file (first ``limit`` when > 0).
    Blank lines are skipped; a line without exactly two tab-separated fields, with an empty
    sentence, or with a label other than 0/1 raises ``DataFormatError`` naming file and line."""
    path = Path(path)
    if not path.exists():
        raise DataFormatError(path, None, "file does not exist (run setup.sh to download the data, or pass the path)")
    with open(path, encoding="utf-8", newline="") as f:
        lines = f.read().splitlines()
    out: list[SentimentExample] = []
    for lineno, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        fields = text.split("\t")
        if len(fields) != 2:
            raise DataFormatError(path, lineno, f"expected 2 tab-separated fields (sentence, label), found "
                                                f"{len(fields)}")
        sentence = fields[0].strip()
        if not sentence:
            raise DataFormatError(path, lineno, "empty sentence")
        label = parse_int(Record(lineno, {"label": fields[1].strip()}), "label", path, allowed=(0, 1))
        out.append(SentimentExample(id=f"{path.stem}-{lineno}", text=sentence.lower() if lowercase else sentence,
                                    label=label, line=lineno, path=str(path)))
        if limit and len(out) >= limit:
            break
    if not out:
        raise DataFormatError(path, None, "no sentences found; expected lines 'sentence<TAB>label'")
    return out
