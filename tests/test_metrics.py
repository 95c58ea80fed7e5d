"""Metrics against hand-computed values and the reference implementations."""

from __future__ import annotations

import pytest
from sacrebleu.metrics import CHRF

from tasks.metrics import (
    accuracy,
    chrf,
    classification_metrics,
    macro_f1,
    majority_baseline,
    matthews_corr,
    rouge_l,
)


def test_accuracy_and_macro_f1_by_hand():
    y_true = [0, 0, 1, 1, 2, 2]
    y_pred = [0, 1, 1, 1, 2, 0]
    assert accuracy(y_true, y_pred) == pytest.approx(4 / 6)
    # per-class F1: class 0: P 1/2 R 1/2 -> 0.5; class 1: P 2/3 R 1 -> 0.8; class 2: P 1 R 1/2 -> 2/3
    assert macro_f1(y_true, y_pred) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    metrics = classification_metrics(y_true, y_pred)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert metrics["matthews_corr"] == pytest.approx(matthews_corr(y_true, y_pred))


def test_matthews_correlation_by_hand():
    # TP 2, TN 1, FP 1, FN 1: (2*1 - 1*1) / sqrt(3 * 3 * 2 * 2) = 1/6
    assert matthews_corr([1, 1, 1, 0, 0], [1, 1, 0, 1, 0]) == pytest.approx(1 / 6)
    assert matthews_corr([1, 0, 1], [1, 0, 1]) == pytest.approx(1.0)
    assert matthews_corr([1, 0, 1], [0, 1, 0]) == pytest.approx(-1.0)
    assert matthews_corr([1, 0, 1, 1], [1, 1, 1, 1]) == 0.0  # a majority guess gets no credit
    with pytest.raises(ValueError, match="length mismatch"):
        matthews_corr([0, 1], [0])


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="length mismatch"):
        accuracy([0, 1], [0])
    with pytest.raises(ValueError, match="length mismatch"):
        chrf(["a"], ["a", "b"])


def test_majority_baseline():
    assert majority_baseline([1, 1, 0], [1, 0, 1, 1]) == 0.75


def test_chrf_matches_sacrebleu_defaults():
    hyps = ["shall i compare thee to a summer's day", "the cat sat on the mat"]
    refs = ["shall i compare thee to a summers day?", "a cat is on the mat"]
    assert chrf(hyps, refs) == pytest.approx(CHRF().corpus_score(hyps, [refs]).score)
    assert chrf(["same text"], ["same text"]) == pytest.approx(100.0)
    assert 0 < chrf(hyps, refs) < 100


def test_rouge_l_by_hand():
    # LCS("the cat sat on the mat", "the cat lay on a mat") = the cat on mat = 4
    s = rouge_l("The cat sat on the mat", "the cat lay on a mat")
    assert s.precision == pytest.approx(4 / 6) and s.recall == pytest.approx(4 / 6)
    assert s.fmeasure == pytest.approx(4 / 6)
    s = rouge_l("a b c d", "a c")  # LCS 2: P 2/4, R 2/2, F 2/3
    assert (s.precision, s.recall, s.fmeasure) == pytest.approx((0.5, 1.0, 2 / 3))
    assert rouge_l("x y", "z") == (0.0, 0.0, 0.0)
    assert rouge_l("", "a b").fmeasure == 0.0
