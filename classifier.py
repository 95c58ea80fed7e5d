"""Sentiment classification on SST (5 classes) and CFIMDB (2 classes) with GPT-2.

    python classifier.py --fine-tune-mode last-linear-layer   # GPT-2 frozen, linear head (lr 1e-3)
    python classifier.py --fine-tune-mode full-model          # everything trains (lr 1e-5)
    python classifier.py --fine-tune-mode lora                # LoRA adapters + head (lr 3e-4)

As the course starter does, trains and evaluates on SST and then on CFIMDB (or one of
them with ``--dataset``), and writes ``predictions/<mode>-<sst|cfimdb>-<dev|test>-out.csv``
in the starter's format. Everything not particular to this task (flags, loop,
checkpoints, data reading) lives in ``training/``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from models.heads import FINE_TUNE_MODES, GPT2SentimentClassifier, count_parameters, set_fine_tune_mode
from training.checkpoints import load_weights_into
from training.cli import (
    add_common_args,
    build_from_args,
    default_output_dir,
    lora_kwargs,
    open_run,
    pick_device,
    run_main,
    seed_everything,
    train_config_from_args,
)
from training.course_data import SENTIMENT_LABELS, read_sentiment, sentiment_features, write_id_predictions
from training.data import PadCollator, make_eval_loader, make_loader, restore_order, sample
from training.metrics import classification_metrics, majority_baseline
from training.trainer import Trainer, predict

DATASETS = ("sst", "cfimdb")
DEFAULT_LR = {"last-linear-layer": 1e-3, "full-model": 1e-5, "lora": 3e-4}


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fine-tune-mode", "--fine_tune_mode", dest="fine_tune_mode", choices=FINE_TUNE_MODES,
                        default="last-linear-layer",
                        help="last-linear-layer: GPT-2 frozen, only the head trains; full-model: all parameters "
                             "train; lora: low-rank adapters and the head train")
    parser.add_argument("--dataset", choices=(*DATASETS, "both"), default="both")
    for ds in DATASETS:
        for split, suffix in (("train", "train"), ("dev", "dev"), ("test", "test-student")):
            parser.add_argument(f"--{ds}_{split}", type=str, default=f"data/ids-{ds}-{suffix}.csv")
    parser.add_argument("--predictions_dir", type=str, default="predictions")
    add_common_args(parser, batch_size=8, lr=None, epochs=10, hidden_dropout_prob=0.3)
    args = parser.parse_args(argv)
    if args.lr is None:
        args.lr = DEFAULT_LR[args.fine_tune_mode]
    return args


def classify_step(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(file positions, predicted labels) of one batch."""
    logits = model(batch["input_ids"], batch["attention_mask"])  # (B, num_labels)
    return batch["index"].cpu(), logits.argmax(-1).cpu()


def predict_labels(model: torch.nn.Module, loader: Any) -> list[int]:
    """Predicted labels in file order."""
    out = predict(model, loader, classify_step)
    indices = torch.cat([i for i, _ in out]).tolist()
    preds = torch.cat([p for _, p in out]).tolist()
    return restore_order(indices, preds)


def run(args: argparse.Namespace, dataset: str) -> dict[str, Any]:
    """Train on one dataset, write its dev and test predictions; returns the dev metrics."""
    print(f"Training sentiment classifier on {dataset} ({args.fine_tune_mode})...")
    pred_paths = {s: Path(args.predictions_dir) / f"{args.fine_tune_mode}-{dataset}-{s}-out.csv"
                  for s in ("dev", "test")}
    out_dir = open_run(args, default_output_dir("classifier", f"{args.fine_tune_mode}-{dataset}"),
                       subdir=dataset if args.dataset == "both" else None, outputs=pred_paths.values())
    seed_everything(args.seed)
    device = pick_device(args.use_gpu, args.device)
    gpt, tokenizer = build_from_args(args)
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

    model = GPT2SentimentClassifier(gpt, num_labels, args.hidden_dropout_prob)
    trainable_only = set_fine_tune_mode(model, args.fine_tune_mode, model.head, **lora_kwargs(args))
    n_train, n_total = count_parameters(model)
    print(f"{num_labels} labels; {n_train:,} of {n_total:,} parameters train")

    max_len = args.max_length or gpt.config.max_position_embeddings
    feats = {s: sentiment_features(rows, tokenizer, max_len, f"{dataset} {s}") for s, rows in data.items()}
    collate = PadCollator(tokenizer.pad_token_id)
    train_loader = make_loader(feats["train"], collate, args.batch_size, shuffle=True, num_workers=args.num_workers,
                               group_by_length=args.group_by_length)
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
    cfg = train_config_from_args(args, device, metric="accuracy", output_dir=str(out_dir),
                                 save_trainable_only=trainable_only)
    trainer = Trainer(model, loss_fn, train_loader, eval_fn, cfg, extra={"args": vars(args), "dataset": dataset,
                                                                          "num_labels": num_labels})
    best = trainer.fit() if out_dir else {}  # --epochs 0: predict with the --load model
    if trainer.best_checkpoint is not None:
        trainer.load_best()
        print(f"best epoch {best.get('epoch')} from {trainer.best_checkpoint}")

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


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    args = get_args(argv)
    datasets = DATASETS if args.dataset == "both" else (args.dataset,)
    return {ds: run(args, ds) for ds in datasets}


if __name__ == "__main__":
    run_main(main)
