"""Evaluation metrics shared by every task, computed the way the course grades them.

Classification uses scikit-learn (as the starter's ``model_eval`` does), chrF uses
sacrebleu's ``CHRF()`` with default settings at corpus level (as the starter's
sonnet evaluation does). ROUGE-L is written out here because it is twenty lines
and its tokenisation should be explicit rather than hidden in a dependency.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Fraction of exact matches."""
    _check_lengths(y_true, y_pred)
    return float(accuracy_score(y_true, y_pred))


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Unweighted mean of per-class F1 over the classes present in either list
    (sklearn ``average='macro'``, as in the course starter)."""
    _check_lengths(y_true, y_pred)
    return float(f1_score(y_true, y_pred, average="macro", zero_division=0))


def matthews_corr(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Matthews correlation coefficient (sklearn ``matthews_corrcoef``; its multiclass form beyond
    two classes), in [-1, 1] with 0 for any constant or chance prediction: GLUE's CoLA metric,
    which unlike accuracy gives a majority-class guess no credit on unbalanced labels."""
    _check_lengths(y_true, y_pred)
    return float(matthews_corrcoef(y_true, y_pred))


def classification_metrics(y_true: Sequence[int], y_pred: Sequence[int]) -> dict[str, float]:
    """The numbers every classification task reports: accuracy, macro-F1 and Matthews correlation."""
    return {"accuracy": accuracy(y_true, y_pred), "macro_f1": macro_f1(y_true, y_pred),
            "matthews_corr": matthews_corr(y_true, y_pred)}


def majority_baseline(train_labels: Sequence[int], eval_labels: Sequence[int]) -> float:
    """Accuracy of always predicting the most frequent training label: the bar a model must clear."""
    if not train_labels:
        raise ValueError("majority_baseline needs at least one training label")
    majority = max(set(train_labels), key=list(train_labels).count)
    return accuracy(eval_labels, [majority] * len(eval_labels))


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus-level chrF (sacrebleu ``CHRF()`` defaults: char order 6, beta 2, no word n-grams),
    one reference per hypothesis, on a 0-100 scale."""
    from sacrebleu.metrics import CHRF

    _check_lengths(references, hypotheses)
    return float(CHRF().corpus_score(list(hypotheses), [list(references)]).score)


class RougeScore(NamedTuple):
    precision: float
    recall: float
    fmeasure: float


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Longest common subsequence length, O(len(a) * len(b)) time, O(len(b)) memory."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(hypothesis: str, reference: str) -> RougeScore:
    """Sentence-level ROUGE-L (Lin 2004) on lowercased whitespace tokens:
    P = LCS/|hyp|, R = LCS/|ref|, F = 2PR/(P+R) (beta = 1)."""
    hyp, ref = hypothesis.lower().split(), reference.lower().split()
    lcs = _lcs_length(hyp, ref)
    if lcs == 0:
        return RougeScore(0.0, 0.0, 0.0)
    p, r = lcs / len(hyp), lcs / len(ref)
    return RougeScore(p, r, 2 * p * r / (p + r))


def _check_lengths(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"length mismatch: {len(a)} references/labels vs {len(b)} predictions")
