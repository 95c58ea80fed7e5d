"""Sentiment classification (SST, CFIMDB) with ``GPT2SentimentClassifier``: the task behind
``classifier.py``, callable with its parsed flags (``run(args, dataset)``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from models.heads import GPT2SentimentClassifier
from tasks.common import fit_task, loader_settings, prepare_model, start
from training.checkpoints import load_weights_into
from training.cli import build_from_args, default_output_dir, fine_tune_config, open_run, train_config_from_args
from training.course_data import SENTIMENT_LABELS, read_sentiment, sentiment_features, write_id_predictions
from training.data import PadCollator, make_eval_loader, sample
from training.metrics import classification_metrics, majority_baseline
from training.predict import predict_in_order

DATASETS = ("sst", "cfimdb")


def logits(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """(B, num_labels) float logits of one batch."""
    return model(batch["input_ids"], batch["attention_mask"]).float()


def predict_labels(model: torch.nn.Module, loader: Any) -> list[int]:
    """Predicted labels in file order."""
    return predict_in_order(model, loader, lambda m, b: logits(m, b).argmax(-1))


def run(args: argparse.Namespace, dataset: str) -> dict[str, Any]:
    """Train on one dataset, write its dev and test predictions; returns the dev metrics."""
    print(f"Training sentiment classifier on {dataset} ({args.fine_tune_mode})...")
    pred_paths = {s: Path(args.predictions_dir) / f"{args.fine_tune_mode}-{dataset}-{s}-out.csv"
                  for s in ("dev", "test")}
    out_dir = open_run(args, default_output_dir("classifier", f"{args.fine_tune_mode}-{dataset}"),
                       subdir=dataset if args.dataset == "both" else None, outputs=pred_paths.values())
    device = start(args)
    gpt, tokenizer = build_from_args(args)  # weights first: a bad --model_size fails before any data is read
    paths = {split: getattr(args, f"{dataset}_{split}") for split in ("train", "dev", "test")}
    # --limit: a seeded sample of the training file (its rows are grouped by label), the first N of dev and test.
    data = {split: read_sentiment(p, limit=0 if split == "train" else args.limit, labels=SENTIMENT_LABELS[dataset])
            for split, p in paths.items()}
    data["train"] = sample(data["train"], args.limit, args.seed)
    for split, rows in data.items():
        print(f"loaded {len(rows)} {split} examples from {paths[split]}")
    for split in ("train", "dev"):
        if any(e.label is None for e in data[split]):
            raise SystemExit(f"{paths[split]}: no 'sentiment' column; the {split} split needs labels")
    num_labels = len(SENTIMENT_LABELS[dataset])
    print(f"{num_labels} labels")
    model = GPT2SentimentClassifier(gpt, num_labels, args.hidden_dropout_prob)
    fine_tune = fine_tune_config(args)
    trainable_only = prepare_model(model, fine_tune)

    max_len = args.max_length or model.gpt.config.max_position_embeddings
    feats = {s: sentiment_features(rows, tokenizer, max_len, f"{dataset} {s}") for s, rows in data.items()}
    collate = PadCollator(tokenizer.pad_token_id)
    dev_loader = make_eval_loader(feats["dev"], collate, args.batch_size, args.num_workers)
    test_loader = make_eval_loader(feats["test"], collate, args.batch_size, args.num_workers)
    dev_labels = [e.label for e in data["dev"]]

    def loss_fn(m: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        return F.cross_entropy(m(batch["input_ids"], batch["attention_mask"]), batch["labels"])

    def eval_fn(m: torch.nn.Module) -> dict[str, float]:
        return classification_metrics(dev_labels, predict_labels(m, dev_loader))

    if args.load:
        load_weights_into(model, args.load)
        print(f"loaded {args.load}")
    if out_dir is not None:  # None: --epochs 0 only predicts with the --load model
        cfg = train_config_from_args(args, device, metric="accuracy", output_dir=str(out_dir),
                                     save_trainable_only=trainable_only)
        fit_task(model, loss_fn, feats["train"], collate, eval_fn, cfg, **loader_settings(args),
                 extra={"args": vars(args), "dataset": dataset, "num_labels": num_labels,
                        "fine_tune": fine_tune.to_dict()})

    dev_pred = predict_labels(model, dev_loader)
    test_pred = predict_labels(model, test_loader)
    metrics = classification_metrics(dev_labels, dev_pred)
    metrics["majority_baseline"] = majority_baseline([e.label for e in data["train"]], dev_labels)
    for split, preds in (("dev", dev_pred), ("test", test_pred)):
        path = pred_paths[split]
        write_id_predictions(path, "Predicted_Sentiment", [e.id for e in data[split]], preds)
        print(f"wrote {path}")
    print(f"{dataset} dev accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f} "
          f"(majority-class baseline accuracy {metrics['majority_baseline']:.3f})")
    return metrics


__all__ = ["DATASETS", "logits", "predict_labels", "run"]
