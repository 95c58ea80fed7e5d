"""The CoLA reader: the shared files, and file:line errors for bad rows."""

from __future__ import annotations

import pytest

from engine.data import DataFormatError
from tasks.course_data import SentimentExample, sentiment_features
from tasks.sentiment import read_cola
from tests.conftest import SHARED_DATA


def test_reads_the_shared_files():
    train, dev = read_cola(SHARED_DATA / "cola-train.tsv"), read_cola(SHARED_DATA / "cola-dev.tsv")
    assert (len(train), len(dev)) == (8551, 516)
    assert sum(e.label for e in train) == 6023 and sum(e.label for e in dev) == 354
    assert dev[0] == SentimentExample("cola-dev-1", "somebody just left guess who", 1, line=1,
                                      path=str(SHARED_DATA / "cola-dev.tsv"))
    assert train[0].text.startswith("our friends wo n't buy")  # lower-cased like the sentiment reader
    assert len({e.id for e in train}) == len(train)
    assert len(read_cola(SHARED_DATA / "cola-dev.tsv", limit=5)) == 5


def test_examples_feed_the_sentiment_features(tokenizer):
    feats = sentiment_features(read_cola(SHARED_DATA / "cola-dev.tsv", limit=3), tokenizer, 64)
    assert [f["labels"] for f in feats] == [1, 1, 1] and feats[0]["id"] == "cola-dev-1"


@pytest.mark.parametrize("text, line, problem", [
    ("good one\t1\n\nbad one\n", 3, "expected 2 tab-separated fields"),
    ("good one\t1\nbad\t1\textra\n", 2, "expected 2 tab-separated fields"),
    ("good one\t1\n \t0\n", 2, "empty sentence"),
    ("good one\t1\nbad one\tyes\n", 2, "'yes' is not an integer"),
    ("good one\t2\n", 1, r"2 is not one of \[0, 1\]"),
])
def test_bad_rows_name_file_and_line(tmp_path, text, line, problem):
    p = tmp_path / "cola.tsv"
    p.write_text(text)
    with pytest.raises(DataFormatError, match=rf"{p}:{line}: .*{problem}"):
        read_cola(p)


def test_missing_or_empty_file(tmp_path):
    with pytest.raises(DataFormatError, match="does not exist.*setup.sh"):
        read_cola(tmp_path / "nope.tsv")
    (tmp_path / "empty.tsv").write_text("\n")
    with pytest.raises(DataFormatError, match="no sentences found"):
        read_cola(tmp_path / "empty.tsv")
