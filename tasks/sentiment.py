"""Sentence classification with ``GPT2SentimentClassifier``: sentiment on SST (5 classes) and
CFIMDB (2), and grammatical acceptability on CoLA (2; ``tasks.cola``). The task behind
``classifier.py``, callable with its parsed flags (``run(args, dataset)``).

The training loss is ``methods.objectives.build_objective`` over the head's logits: plain
cross-entropy unless an objective flag (R-Drop, SimCSE, SMART) is set. ``--pooling`` picks the
head's sentence representation and is saved beside the weights (``extra["pooling"]``), so
``--load``, the KD teacher and ensembles rebuild the head the same way.

CoLA has no public test set (GLUE keeps its labels), so a CoLA run writes dev predictions only;
it selects its best epoch on Matthews correlation, GLUE's CoLA metric, and reports accuracy
beside it (every run's dev metrics, in ``metrics.jsonl`` too, include both).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from cli.common import build_from_args, default_output_dir, fine_tune_config, open_run, train_config_from_args
from engine import distributed
from engine.checkpoints import load_weights_into
from engine.data import PadCollator, make_eval_loader, sample
from engine.predict import predict_in_order
from methods.objectives import build_objective
from models.heads import GPT2SentimentClassifier, pooling_of
from tasks.cola import COLA_LABELS, read_cola
from tasks.common import fit_task, loader_settings, prepare_model, start
from tasks.course_data import (
    SENTIMENT_LABELS,
    SentimentExample,
    read_sentiment,
    sentiment_features,
    write_id_predictions,
)
from tasks.metrics import classification_metrics, majority_baseline

STARTER_DATASETS = ("sst", "cfimdb")  # --dataset both: the course starter's pair
DATASETS = (*STARTER_DATASETS, "cola")
SPLITS = {"sst": ("train", "dev", "test"), "cfimdb": ("train", "dev", "test"), "cola": ("train", "dev")}
NUM_LABELS = {**{ds: len(SENTIMENT_LABELS[ds]) for ds in STARTER_DATASETS}, "cola": COLA_LABELS}
FILE_NAMES = {"sst": "data/ids-sst-{}.csv", "cfimdb": "data/ids-cfimdb-{}.csv", "cola": "data/cola-{}.tsv"}
SELECTION_METRIC = {"sst": "accuracy", "cfimdb": "accuracy", "cola": "matthews_corr"}
PREDICTION_COLUMN = {"sst": "Predicted_Sentiment", "cfimdb": "Predicted_Sentiment", "cola": "Predicted_Acceptability"}


def default_path(dataset: str, split: str) -> str:
    """Where setup.sh puts a split of a dataset (the test files are the course's student versions)."""
    return FILE_NAMES[dataset].format("test-student" if split == "test" else split)


def read_split(dataset: str, path: str | Path, limit: int = 0) -> list[SentimentExample]:
    """The examples of one split file of ``dataset`` (labels checked against the dataset's)."""
    if dataset == "cola":
        return read_cola(path, limit=limit)
    return read_sentiment(path, limit=limit, labels=SENTIMENT_LABELS[dataset])


def logits(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """(B, num_labels) float logits of one batch."""
    return model(batch["input_ids"], batch["attention_mask"]).float()


def predict_labels(model: torch.nn.Module, loader: Any) -> list[int]:
    """Predicted labels in file order."""
    return predict_in_order(model, loader, lambda m, b: logits(m, b).argmax(-1))


def run(args: argparse.Namespace, dataset: str) -> dict[str, Any]:
    """Train on one dataset, write its dev (and test, where there is one) predictions; returns
    the dev metrics."""
    print(f"Training sentence classifier on {dataset} ({args.fine_tune_mode})...")
    splits = SPLITS[dataset]
    pred_paths = {s: Path(args.predictions_dir) / f"{args.fine_tune_mode}-{dataset}-{s}-out.csv"
                  for s in splits if s != "train"}
    out_dir = open_run(args, default_output_dir("classifier", f"{args.fine_tune_mode}-{dataset}"),
                       subdir=dataset if args.dataset == "both" else None, outputs=pred_paths.values())
    device = start(args)
    gpt, tokenizer = build_from_args(args)  # weights first: a bad --model_size fails before any data is read
    paths = {split: getattr(args, f"{dataset}_{split}") for split in splits}
    # --limit: a seeded sample of the training file (its rows are grouped by label), the first N of dev and test.
    data = {split: read_split(dataset, p, limit=0 if split == "train" else args.limit) for split, p in paths.items()}
    data["train"] = sample(data["train"], args.limit, args.seed)
    for split, rows in data.items():
        print(f"loaded {len(rows)} {split} examples from {paths[split]}")
    for split in ("train", "dev"):
        if any(e.label is None for e in data[split]):
            raise SystemExit(f"{paths[split]}: no 'sentiment' column; the {split} split needs labels")
    num_labels = NUM_LABELS[dataset]
    print(f"{num_labels} labels")
    pooling = getattr(args, "pooling", "last")
    model = GPT2SentimentClassifier(gpt, num_labels, args.hidden_dropout_prob, pooling)
    fine_tune = fine_tune_config(args)
    trainable_only = prepare_model(model, fine_tune)

    max_len = args.max_length or model.gpt.config.max_position_embeddings
    feats = {s: sentiment_features(rows, tokenizer, max_len, f"{dataset} {s}") for s, rows in data.items()}
    collate = PadCollator(tokenizer.pad_token_id)
    loaders = {s: make_eval_loader(feats[s], collate, args.batch_size, args.num_workers) for s in pred_paths}
    dev_labels = [e.label for e in data["dev"]]

    def eval_fn(m: torch.nn.Module) -> dict[str, float]:
        return classification_metrics(dev_labels, predict_labels(m, loaders["dev"]))

    if args.load:
        saved = pooling_of(load_weights_into(model, args.load).get("extra", {}))
        if saved != model.pooling:
            print(f"--pooling {saved}: the pooling {args.load} was trained with (not {model.pooling})")
            model.pooling = saved
        print(f"loaded {args.load}")
    if out_dir is not None:  # None: --epochs 0 only predicts with the --load model
        cfg = train_config_from_args(args, device, metric=SELECTION_METRIC[dataset], output_dir=str(out_dir),
                                     save_trainable_only=trainable_only)
        objective = build_objective(args, logits)
        fit_task(model, objective, feats["train"], collate, eval_fn, cfg, **loader_settings(args),
                 callbacks=objective.callbacks,
                 extra={"args": vars(args), "dataset": dataset, "num_labels": num_labels,
                        "fine_tune": fine_tune.to_dict(), "pooling": model.pooling})

    preds = {split: predict_labels(model, loader) for split, loader in loaders.items()}
    metrics = classification_metrics(dev_labels, preds["dev"])
    metrics["majority_baseline"] = majority_baseline([e.label for e in data["train"]], dev_labels)
    for split, path in pred_paths.items():
        if distributed.is_main():  # under torchrun: one writer
            write_id_predictions(path, PREDICTION_COLUMN[dataset], [e.id for e in data[split]], preds[split])
        print(f"wrote {path}")
    mcc = f", Matthews corr. {metrics['matthews_corr']:.3f}" if dataset == "cola" else ""
    print(f"{dataset} dev accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}{mcc} "
          f"(majority-class baseline accuracy {metrics['majority_baseline']:.3f})")
    return metrics


__all__ = ["DATASETS", "FILE_NAMES", "NUM_LABELS", "SELECTION_METRIC", "SPLITS", "STARTER_DATASETS", "default_path",
           "logits", "predict_labels", "read_split", "run"]
