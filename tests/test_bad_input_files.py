"""Data and prediction files that used to give silently wrong results or a traceback: each is now
read correctly or refused in one ``error: file:line: problem`` line with exit status 2, before
any training (issue 26). Each case runs the real command (``main`` under ``run_main``, as
``python script.py`` does) on a micro random model, so only the file named in the case is wrong.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from pathlib import Path

import pytest

import classifier
import paraphrase_detection
import prepare_submit
from cli.common import run_main
from engine.data import read_tsv
from tasks.course_data import read_sentiment
from tests.test_submission import fake_project
from tests.test_validation import MICRO, classifier_args, hf_folder

SST_HEADER = "\tid\tsentence\tsentiment\n"
QUORA_HEADER = "\tid\tsentence1\tsentence2\tis_duplicate\n"
LONG = 140_000  # characters: over the csv module's default field limit of 131,072


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))
    return path


def error_line(main: Callable[[list[str]], object], argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one line a user sees when ``main(argv)`` refuses its input (exit 2, no traceback, no training)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: main(argv))
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err and "epoch 1" not in out
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and err.strip().endswith(errors[0]), err
    return errors[0]


def sst_args(tmp: Path, **files: Path) -> list[str]:
    args = classifier_args(tmp, hf_folder(tmp / "micro", MICRO))
    for flag, path in files.items():
        args += [f"--{flag}", str(path)]
    return args


def para_args(tmp: Path, train: Path) -> list[str]:
    ok = write(tmp / "ok.tsv", QUORA_HEADER + "0\tq1\tIs it?\tIs it so?\t1\n1\tq2\tWhy?\tWhy not?\t0\n")
    return ["--model_size", str(hf_folder(tmp / "micro", MICRO)), "--random_init", "--epochs", "1",
            "--batch_size", "2", "--max_length", "32", "--no_progress", "--output_dir", str(tmp / "run"),
            "--para_train", str(train), "--para_dev", str(ok), "--para_test", str(ok),
            "--para_dev_out", str(tmp / "dev.csv"), "--para_test_out", str(tmp / "test.csv")]


# ----------------------------------------------------------- ids a prediction file cannot hold


def test_duplicate_ids_in_a_dev_file_are_refused_with_their_lines(tmp_path, capsys):
    dev = write(tmp_path / "dev.csv", SST_HEADER + "0\tdup\tgood\t3\n1\tok\tfine\t2\n2\tdup\tbad\t4\n3\tDUP\tmeh\t4\n")
    assert error_line(classifier.main, sst_args(tmp_path, sst_dev=dev), capsys) == (
        f"error: {dev}:2: id 'dup' is repeated on line(s) 4, 5; each id needs one prediction: "
        "remove or rename the repeats")


def test_an_id_holding_the_output_separator_is_refused(tmp_path, capsys):
    test = write(tmp_path / "test.csv", "\tid\tsentence\n0\tok\tgood\n1\ta, b0\tbad\n")
    assert error_line(classifier.main, sst_args(tmp_path, sst_test=test), capsys) == (
        f"error: {test}:3: id 'a, b0' contains ', ', the separator of the '<id>, <value> ' prediction lines, "
        "so no reader can tell where it ends: remove it from the id")


def test_prepare_submit_refuses_repeated_or_ambiguous_ids(tmp_path, capsys):
    root = fake_project(tmp_path / "proj")
    pred = root / "predictions"
    write(pred / "full-model-sst-dev-out.csv", "id \t Predicted_Sentiment \ndup, 3 \nx, 1 \ndup, 4 \n")
    write(pred / "full-model-sst-test-out.csv", "id \t Predicted_Sentiment \na, b0, 3 \n")
    out = tmp_path / "sub.zip"
    with pytest.raises(SystemExit) as exit_info:
        prepare_submit.main(["--root", str(root), "--output", str(out), "--no_import_check"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and not out.exists()
    assert (f"error: {pred}/full-model-sst-dev-out.csv:2: id 'dup' is repeated on line(s) 4; each id needs one "
            "prediction: remove or rename the repeats") in err.splitlines()
    assert (f"error: {pred}/full-model-sst-test-out.csv:2: id 'a, b0' contains ', ', the separator of the "
            "'<id>, <value> ' prediction lines, so no reader can tell where it ends: remove it from the id"
            ) in err.splitlines()


# ----------------------------------------------------------- rows read as written


@pytest.mark.parametrize("inside", ["\u2028", "\x85", "\x0c", "\x0b", "\u2029", "\x1e"])
def test_unicode_line_separators_inside_a_sentence_do_not_split_the_row(inside, tmp_path, capsys):
    """Only \\n, \\r\\n and \\r end a line: a sentence holding another separator is one row, and the
    line numbers after it stay right (the repeated id below is reported on its real lines)."""
    dev = write(tmp_path / "dev.csv", SST_HEADER + f"0\ta\tone{inside}two\t3\r\n1\tb\tfine\t2\r2\ta\tbad\t4\n")
    assert [(e.id, e.text, e.line) for e in read_sentiment(dev, limit=2)] == [("a", f"one{inside}two", 2),
                                                                                ("b", "fine", 3)]
    assert error_line(classifier.main, sst_args(tmp_path, sst_dev=dev), capsys) == (
        f"error: {dev}:2: id 'a' is repeated on line(s) 4; each id needs one prediction: remove or rename the repeats")


def test_a_bom_before_the_header_is_dropped(tmp_path):
    path = write(tmp_path / "bom.tsv", "\ufeffid\tsentence\nx1\tgood\n")
    assert [r.fields for r in read_tsv(path, required=("id", "sentence"))] == [{"id": "x1", "sentence": "good"}]


def test_a_field_over_the_csv_limit_is_read_whole_and_truncated_like_any_long_text(tmp_path, capsys):
    """Read, not refused: each line is parsed alone, so the csv module's guard against a stray
    quote swallowing the file does not apply, and a long review is a valid example."""
    long_text = "word " * (LONG // 5)
    rows = "".join(f"{i}\tid{i}\t{long_text if i == 3 else f'sentence {i}'}\t{i % 5}\n" for i in range(8))
    train = write(tmp_path / "train.csv", SST_HEADER + rows)
    limit = csv.field_size_limit()
    assert read_sentiment(train)[3].text == long_text.strip() and csv.field_size_limit() == limit
    result = classifier.main(sst_args(tmp_path, sst_train=train))
    assert "truncated 1 of 8 inputs to 32 tokens" in capsys.readouterr().out
    assert 0 <= result["sst"]["accuracy"] <= 1


# ----------------------------------------------------------- files with nothing to train on


def test_a_training_file_with_no_usable_rows_is_one_line(tmp_path, capsys):
    train = write(tmp_path / "train.tsv", QUORA_HEADER + "0\tq1\tIs it?\tIs it so?\tyes\n1\tq2\tWhy?\tWhy not?\t2\n")
    assert error_line(paraphrase_detection.main, para_args(tmp_path, train), capsys) == (
        f"error: {train}: no usable rows: none of its 2 row(s) has an is_duplicate label of 0 or 1 "
        "(first: line 2 (column 'is_duplicate': 'yes' is not an integer)); fix the labels")


def test_too_few_pairs_to_carve_offline_splits_is_one_line(tmp_path, capsys):
    source = write(tmp_path / "quora-minbert-dev.csv", QUORA_HEADER + "0\tq1\tIs it?\tIs it so?\t1\n")
    argv = para_args(tmp_path, tmp_path / "absent-train.tsv")
    assert error_line(paraphrase_detection.main, argv, capsys) == (
        f"error: {source}: 1 usable pair(s) are too few to carve train, dev and test splits from (each needs one); "
        "pass --para_train/--para_dev/--para_test")
