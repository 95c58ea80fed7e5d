"""Data readers: columns found by name, clear errors with file and line, counted
truncation and dynamic padding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.data import (
    DataFormatError,
    PadCollator,
    encode,
    make_eval_loader,
    make_loader,
    read_tsv,
    restore_order,
    sample,
)
from models.loading import load_tokenizer
from tasks.course_data import read_sentiment, sentiment_features

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def write(tmp_path: Path, text: str, name: str = "f.csv") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_odd_test_header_read_by_name(tmp_path):
    p = write(tmp_path, "0\t\tid\tsentence\n1\t0.0\tabc\t Good film .\n2\t1.0\tDEF\t bad\n")
    rows = read_sentiment(p)
    assert [(r.id, r.text, r.label) for r in rows] == [("abc", "good film .", None), ("def", "bad", None)]


def test_train_file_labels_and_csv_quotes(tmp_path):
    # CFIMDB rows are CSV-quoted by pandas: '" """""" text "' means ' """ text '
    p = write(tmp_path, '\tid\tsentence\tsentiment\n0\ta1\t" """""" Fine ."\t1\n1\ta2\tplain "quote\t0\n')
    rows = read_sentiment(p, lowercase=False)
    assert [r.text for r in rows] == ['""" Fine .', 'plain "quote'] and [r.label for r in rows] == [1, 0]


def test_wrong_field_count_names_file_and_line(tmp_path):
    p = write(tmp_path, "\tid\tsentence\tsentiment\n0\ta\tok\t1\n\n1\tb\tno label here\n")
    with pytest.raises(DataFormatError, match=rf"{p}:4: expected 4 tab-separated fields.*found 3"):
        read_sentiment(p)


def test_bad_label_and_missing_column_and_empty_value(tmp_path):
    p = write(tmp_path, "\tid\tsentence\tsentiment\n0\ta\tok\tpositive\n")
    with pytest.raises(DataFormatError, match=rf"{p}:2: column 'sentiment': 'positive' is not an integer"):
        read_sentiment(p)
    p = write(tmp_path, "\tid\ttext\n0\ta\tok\n", "g.csv")
    with pytest.raises(DataFormatError, match=rf"{p}:1: header .* lacks column\(s\) \['sentence'\]"):
        read_sentiment(p)
    p = write(tmp_path, "\tid\tsentence\n0\t\tok\n", "h.csv")
    with pytest.raises(DataFormatError, match=rf"{p}:2: empty value in column\(s\) \['id'\]"):
        read_sentiment(p)
    with pytest.raises(DataFormatError, match="does not exist"):
        read_tsv(tmp_path / "nope.csv", ["id"])


def test_limit_and_real_files():
    assert len(read_sentiment(SHARED / "ids-sst-dev.csv")) == 1101
    test = read_sentiment(SHARED / "ids-cfimdb-test-student.csv", limit=5)
    assert len(test) == 5 and test[0].id == "c916d7750936543cf3a109be1" and test[0].label is None
    train = read_sentiment(SHARED / "ids-cfimdb-train.csv")
    assert len(train) == 1707 and {r.label for r in train} == {0, 1}


def test_truncation_is_counted(capsys):
    tok = load_tokenizer(verbose=False)
    ids = encode(tok, ["one two three four five six", "short"], max_length=3, name="toy")
    assert [len(x) for x in ids] == [3, 1]
    assert "toy: truncated 1 of 2 inputs to 3 tokens" in capsys.readouterr().out
    assert ids[0] == tok("one two three")["input_ids"]


def test_pad_collator_right_and_left():
    feats = [{"input_ids": [5, 6, 7], "labels": 1, "id": "a"}, {"input_ids": [8], "labels": 0, "id": "b"}]
    b = PadCollator(pad_id=0)(feats)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [1, 0] and b["id"] == ["a", "b"]
    left = PadCollator(pad_id=0, pad_values={"labels": -100}, padding_side="left")(
        [{"input_ids": [5, 6], "labels": [5, 6]}, {"input_ids": [8], "labels": [8]}])
    assert left["input_ids"].tolist() == [[5, 6], [0, 8]] and left["labels"].tolist() == [[5, 6], [-100, 8]]
    assert left["attention_mask"].tolist() == [[1, 1], [0, 1]]


def test_eval_loader_sorts_and_order_is_restored(tmp_path):
    tok = load_tokenizer(verbose=False)
    p = write(tmp_path, "\tid\tsentence\tsentiment\n0\ta\ta much longer sentence here\t1\n1\tb\tshort\t0\n"
                        "2\tc\tmedium one\t1\n")
    feats = sentiment_features(read_sentiment(p), tok, 16)
    batches = list(make_eval_loader(feats, PadCollator(tok.pad_token_id), batch_size=2))
    assert batches[0]["id"] == ["b", "c"] and batches[0]["input_ids"].shape[1] == 2  # padded to the batch only
    index = torch.cat([b["index"] for b in batches]).tolist()
    ids = [i for b in batches for i in b["id"]]
    assert restore_order(index, ids) == ["a", "b", "c"]
    with pytest.raises(ValueError):
        restore_order([0, 0], ["x", "y"])


def test_sample_is_seeded_and_keeps_order():
    items = list(range(100))
    a = sample(items, 10, seed=3)
    assert a == sorted(a) and len(set(a)) == 10 and a == sample(items, 10, seed=3) != sample(items, 10, seed=4)
    assert sample(items, 0, 1) == items and sample(items, 500, 1) == items


def test_group_by_length_cuts_padding_and_sees_every_example_once():
    tok = load_tokenizer(verbose=False)
    feats = sentiment_features(read_sentiment(SHARED / "ids-sst-train.csv", limit=400), tok, 128)
    collate = PadCollator(tok.pad_token_id)

    def epoch(group: bool) -> tuple[list[int], int]:
        torch.manual_seed(0)
        batches = list(make_loader(feats, collate, 8, shuffle=True, group_by_length=group))
        return torch.cat([b["index"] for b in batches]).tolist(), sum(b["input_ids"].numel() for b in batches)

    plain_order, plain_tokens = epoch(False)
    order, tokens = epoch(True)
    assert sorted(order) == list(range(len(feats))) and order != plain_order
    assert order == epoch(True)[0]  # seeded from the global torch RNG
    assert tokens < 0.75 * plain_tokens, (tokens, plain_tokens)
