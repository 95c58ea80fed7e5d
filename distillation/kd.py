"""``kd``: knowledge distillation of a fine-tuned GPT-2 sentence classifier (the
teacher, a checkpoint written by ``classifier.py`` on SST, CFIMDB or CoLA) into a small
student: a 2-layer LSTM on GPT-2 token embeddings, or a ``tiny`` GPT-2.

Loss: alpha * T^2 * KL(teacher soft labels || student) + (1 - alpha) * CE
(``distillation.kd_loss``). The same student trained with alpha = 0 (no teacher)
is the baseline; both students' dev scores are reported together, with the teacher's.
The teacher's logits are computed once over the training set (it is frozen and
in eval mode, so they never change). Every result carries the dev accuracy and Matthews
correlation; on CoLA the best epoch is picked by Matthews correlation, GLUE's CoLA metric.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from cli.validation import positive_float, positive_int, unit_interval
from distillation.kd_loss import LSTMStudent, kd_loss
from distillation.records import write_summary

DEFAULTS = {"batch_size": 32, "lr": 1e-3, "epochs": 5, "hidden_dropout_prob": 0.1}


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True,
                   help="classifier.py checkpoint (e.g. runs/classifier/full-model-sst/best.pt)")
    from tasks.sentiment import DATASETS

    p.add_argument("--dataset", choices=DATASETS, default="sst")
    p.add_argument("--train", default=None, help="default data/ids-<dataset>-train.csv (CoLA: data/cola-train.tsv)")
    p.add_argument("--dev", default=None, help="default data/ids-<dataset>-dev.csv (CoLA: data/cola-dev.tsv)")
    p.add_argument("--student", choices=("lstm", "tiny"), default="lstm")
    p.add_argument("--student_hidden", type=positive_int, default=768, help="LSTM hidden size")
    p.add_argument("--alpha", type=unit_interval, default=0.5, help="weight of the soft (teacher) term")
    p.add_argument("--temperature", type=positive_float, default=2.0)
    p.add_argument("--no_baseline", action="store_true", help="skip the student trained without the teacher")


def load_teacher(path: str | Path, device: torch.device, dataset: str | None = None):
    """(GPT2SentimentClassifier, tokenizer, saved args) from a ``classifier.py`` checkpoint, rebuilt
    by ``tasks.sentiment_checkpoint.load_classifier``. With ``dataset``, a teacher trained on
    another task (an SST teacher for CFIMDB would make 5-way students of a 2-class task) is
    refused before anything is built."""
    from models.loading import CheckpointError
    from tasks.sentiment import NUM_LABELS
    from tasks.sentiment_checkpoint import load_classifier

    def same_task(extra) -> None:
        theirs, n = extra.get("dataset"), extra["num_labels"]
        if dataset is not None and (theirs != dataset or n != NUM_LABELS[dataset]):
            raise CheckpointError(f"{path}: the teacher was trained on {theirs} ({n} labels) but --dataset {dataset} "
                                  f"has {NUM_LABELS[dataset]}; pass a teacher trained on {dataset} "
                                  f"or --dataset {theirs}")

    teacher = load_classifier(path, device, same_task)
    return teacher.model, teacher.tokenizer, teacher.args


def logits_of(model, loader) -> list[list[float]]:
    """Logits in file order (features carry ``index``)."""
    from engine.predict import predict_in_order
    from tasks.sentiment import logits

    return predict_in_order(model, loader, logits)


def metrics_of(model, loader, labels: list[int]) -> dict[str, float]:
    """Accuracy, macro-F1 and Matthews correlation of the model's predictions."""
    from tasks.metrics import classification_metrics

    return classification_metrics(labels, [max(range(len(x)), key=x.__getitem__) for x in logits_of(model, loader)])


def build_student(kind: str, teacher, num_labels: int, args: argparse.Namespace) -> torch.nn.Module:
    """The LSTM on the teacher's embeddings, or a random ``tiny`` GPT-2 sentiment classifier."""
    from models.gpt2 import build_model
    from models.heads import GPT2SentimentClassifier

    if kind == "lstm":
        return LSTMStudent(teacher.gpt.wte.weight, num_labels, args.student_hidden, dropout=args.hidden_dropout_prob)
    return GPT2SentimentClassifier(build_model("tiny", random_init=True), num_labels, args.hidden_dropout_prob)


def train_student(args: argparse.Namespace, teacher, feats: dict[str, list[dict[str, Any]]], alpha: float,
                  name: str, device: torch.device, collate, dev_labels: list[int]) -> dict[str, Any]:
    from cli.common import seed_everything, train_config_from_args
    from engine.data import make_eval_loader
    from methods.fine_tune import count_parameters
    from tasks.common import fit_task
    from tasks.sentiment import SELECTION_METRIC

    seed_everything(args.seed)
    num_labels = len(feats["train"][0]["teacher_logits"])
    student = build_student(args.student, teacher, num_labels, args)
    n_train, n_total = count_parameters(student)
    dev_loader = make_eval_loader(feats["dev"], collate, args.batch_size)

    def loss_fn(m: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        logits = m(batch["input_ids"], batch["attention_mask"])  # (B, C)
        teacher_logits = torch.tensor(batch["teacher_logits"], device=logits.device)  # (B, C)
        return kd_loss(logits.float(), teacher_logits, batch["labels"], alpha, args.temperature)

    out_dir = Path(args.output_dir or f"runs/kd/{args.dataset}-{args.student}") / name
    cfg = train_config_from_args(args, device, metric=SELECTION_METRIC[args.dataset], output_dir=str(out_dir))
    best, trainer = fit_task(student, loss_fn, feats["train"], collate, lambda m: metrics_of(m, dev_loader, dev_labels),
                             cfg, batch_size=args.batch_size,
                             extra={"alpha": alpha, "temperature": args.temperature, "student": args.student})
    return {"dev_accuracy": best.get("accuracy"), "dev_matthews_corr": best.get("matthews_corr"),
            "best_epoch": best.get("epoch"), "alpha": alpha,
            "trainable_parameters": n_train, "parameters": n_total, "checkpoint": str(trainer.best_checkpoint)}


def run(args: argparse.Namespace) -> dict:
    from cli.common import pick_device, seed_everything
    from engine.data import PadCollator, make_eval_loader
    from tasks.course_data import sentiment_features
    from tasks.sentiment import default_path, read_split

    seed_everything(args.seed)
    device = pick_device(args.use_gpu, args.device)
    teacher, tokenizer, teacher_args = load_teacher(args.teacher, device, args.dataset)
    paths = {"train": args.train or default_path(args.dataset, "train"),
             "dev": args.dev or default_path(args.dataset, "dev")}
    max_len = args.max_length or min(512, teacher.gpt.config.max_position_embeddings)
    collate = PadCollator(tokenizer.pad_token_id)
    feats, labels = {}, {}
    for split, path in paths.items():
        rows = read_split(args.dataset, path, limit=args.limit)
        if any(r.label is None for r in rows):
            raise SystemExit(f"{path}: no 'sentiment' column; kd needs labels")
        feats[split] = sentiment_features(rows, tokenizer, max_len, f"{args.dataset} {split}")
        labels[split] = [r.label for r in rows]
    for split in feats:
        t_logits = logits_of(teacher, make_eval_loader(feats[split], collate, args.batch_size))
        for f, t in zip(feats[split], t_logits):
            f["teacher_logits"] = t
    teacher_dev = metrics_of(teacher, make_eval_loader(feats["dev"], collate, args.batch_size), labels["dev"])
    results: dict[str, Any] = {"teacher": {"dev_accuracy": teacher_dev["accuracy"],
                                           "dev_matthews_corr": teacher_dev["matthews_corr"],
                                           "checkpoint": str(args.teacher),
                                           "model_size": teacher_args.model_size,
                                           "fine_tune_mode": teacher_args.fine_tune_mode}}
    results["kd"] = train_student(args, teacher, feats, args.alpha, "kd", device, collate, labels["dev"])
    if not args.no_baseline:
        results["baseline"] = train_student(args, teacher, feats, 0.0, "baseline", device, collate, labels["dev"])
    out = Path(args.output_dir or f"runs/kd/{args.dataset}-{args.student}") / "kd.json"
    summary = {"results": results, "dataset": args.dataset, "student": args.student,
               "settings": {"alpha": args.alpha, "temperature": args.temperature, "lr": args.lr,
                            "epochs": args.epochs, "batch_size": args.batch_size, "limit": args.limit},
               "seed": args.seed}
    write_summary(out, "kd", **summary)
    for key, name in (("dev_accuracy", "accuracy"), ("dev_matthews_corr", "Matthews corr.")):
        line = f"{args.dataset} dev {name}: teacher {results['teacher'][key]:.3f}, student+KD {results['kd'][key]:.3f}"
        if "baseline" in results:
            line += f", student alone {results['baseline'][key]:.3f}"
        print(line)
    print(json.dumps(results, indent=2))
    return summary
