"""``kd``: knowledge distillation of a fine-tuned GPT-2 sentence classifier (the
teacher, a checkpoint written by ``classifier.py`` on SST, CFIMDB or CoLA) into a small
student: a 2-layer LSTM on GPT-2 token embeddings (frozen), report 004's 2-layer ReLU RNN
on trainable embeddings, or a ``tiny`` GPT-2.

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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cli.validation import positive_float, positive_int, unit_interval
from distillation.kd_loss import LSTMStudent, RNNStudent, kd_loss
from distillation.records import write_summary
from engine.data import PadCollator, make_eval_loader
from engine.efficiency import count_parameters
from engine.predict import predict_in_order
from engine.rng import seed_everything
from errors import CheckpointError
from models.gpt2 import build_model
from models.heads import GPT2SentimentClassifier
from tasks.common import fit_task, pick_device, train_config
from tasks.course_data import sentiment_features
from tasks.metrics import classification_metrics
from tasks.restore import restore_task_model
from tasks.sentiment import DATASETS, NUM_LABELS, SELECTION_METRIC, default_path, logits, read_split
from tasks.settings import ModelSettings, TaskSettings, from_flags

STUDENTS = ("lstm", "rnn", "tiny")
DEFAULTS = {"batch_size": 32, "lr": 1e-3, "epochs": 5, "hidden_dropout_prob": 0.1}


@dataclass(frozen=True)
class KDSettings:
    """The kd step's own flags (the shared ones, engine and model, are the run's ``TaskSettings``):
    the teacher checkpoint, the dataset and its files (None: ``default_path``'s), the student, and
    the loss's weight ``alpha`` of the soft term and its ``temperature``."""

    teacher: str = ""
    dataset: str = "sst"
    train: str | None = None
    dev: str | None = None
    student: str = "lstm"
    student_hidden: int = 768
    alpha: float = 0.5
    temperature: float = 2.0
    no_baseline: bool = False

    def out_dir(self, settings: TaskSettings) -> Path:
        """The folder of the students' runs and ``kd.json``: ``--output_dir`` or ``runs/kd/<dataset>-<student>``."""
        return Path(settings.run.output_dir or f"runs/kd/{self.dataset}-{self.student}")


def add_args(p: argparse.ArgumentParser) -> None:
    d = KDSettings()
    p.add_argument("--teacher", required=True,
                   help="classifier.py checkpoint (e.g. runs/classifier/full-model-sst/best.pt)")
    p.add_argument("--dataset", choices=DATASETS, default=d.dataset)
    p.add_argument("--train", default=d.train, help="default data/ids-<dataset>-train.csv (CoLA: data/cola-train.tsv)")
    p.add_argument("--dev", default=d.dev, help="default data/ids-<dataset>-dev.csv (CoLA: data/cola-dev.tsv)")
    p.add_argument("--student", choices=STUDENTS, default=d.student,
                   help="lstm: 2-layer LSTM on the teacher's frozen embeddings; rnn: 2-layer ReLU RNN on "
                        "trainable ones (report 004); tiny: a random tiny GPT-2")
    p.add_argument("--student_hidden", type=positive_int, default=d.student_hidden, help="LSTM/RNN hidden size")
    p.add_argument("--alpha", type=unit_interval, default=d.alpha, help="weight of the soft (teacher) term")
    p.add_argument("--temperature", type=positive_float, default=d.temperature)
    p.add_argument("--no_baseline", action="store_true", help="skip the student trained without the teacher")


def same_task(path: str | Path, dataset: str) -> Callable[[Mapping[str, Any]], None]:
    """``restore_task_model``'s check of a teacher: one trained on another task (an SST teacher for
    CFIMDB would make 5-way students of a 2-class task) is refused before anything is built."""

    def check(extra: Mapping[str, Any]) -> None:
        theirs, n = extra.get("dataset"), extra["num_labels"]
        if theirs != dataset or n != NUM_LABELS[dataset]:
            raise CheckpointError(f"{path}: the teacher was trained on {theirs} ({n} labels) but --dataset {dataset} "
                                  f"has {NUM_LABELS[dataset]}; pass a teacher trained on {dataset} "
                                  f"or --dataset {theirs}")

    return check


def logits_of(model: torch.nn.Module, loader: Any) -> list[list[float]]:
    """Logits in file order (features carry ``index``)."""
    return predict_in_order(model, loader, logits)


def metrics_of(model: torch.nn.Module, loader: Any, labels: list[int]) -> dict[str, float]:
    """Accuracy, macro-F1 and Matthews correlation of the model's predictions."""
    return classification_metrics(labels, [max(range(len(x)), key=x.__getitem__) for x in logits_of(model, loader)])


def build_student(kind: str, teacher: GPT2SentimentClassifier, num_labels: int, hidden: int,
                  dropout: float) -> torch.nn.Module:
    """The LSTM or ReLU RNN (``hidden`` wide) on the teacher's embeddings, or a random ``tiny`` GPT-2
    sentiment classifier."""
    if kind in ("lstm", "rnn"):
        student = LSTMStudent if kind == "lstm" else RNNStudent
        return student(teacher.gpt.wte.weight, num_labels, hidden, dropout=dropout)
    return GPT2SentimentClassifier(build_model("tiny", random_init=True), num_labels, dropout)


def train_student(settings: TaskSettings, kd: KDSettings, teacher: GPT2SentimentClassifier,
                  feats: dict[str, list[dict[str, Any]]], alpha: float, name: str, device: torch.device,
                  collate: Callable[[list[dict[str, Any]]], dict[str, Any]], dev_labels: list[int]) -> dict[str, Any]:
    """Train one student with weight ``alpha`` on the teacher's soft labels (0: the baseline) in
    ``<out_dir>/<name>``; its best dev scores, size and checkpoint."""
    seed_everything(settings.seed)
    num_labels = len(feats["train"][0]["teacher_logits"])
    student = build_student(kd.student, teacher, num_labels, kd.student_hidden, settings.model.hidden_dropout_prob)
    n_train, n_total = count_parameters(student)
    batch_size = settings.data.batch_size
    dev_loader = make_eval_loader(feats["dev"], collate, batch_size)

    def loss_fn(m: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        out = m(batch["input_ids"], batch["attention_mask"])  # (B, C)
        teacher_logits = torch.tensor(batch["teacher_logits"], device=out.device)  # (B, C)
        return kd_loss(out.float(), teacher_logits, batch["labels"], alpha, kd.temperature)

    cfg = train_config(settings, device, kd.out_dir(settings) / name, metric=SELECTION_METRIC[kd.dataset])
    best, trainer = fit_task(student, loss_fn, feats["train"], collate, lambda m: metrics_of(m, dev_loader, dev_labels),
                             cfg, batch_size=batch_size,
                             extra={"alpha": alpha, "temperature": kd.temperature, "student": kd.student})
    return {"dev_accuracy": best.get("accuracy"), "dev_matthews_corr": best.get("matthews_corr"),
            "best_epoch": best.get("epoch"), "alpha": alpha,
            "trainable_parameters": n_train, "parameters": n_total, "checkpoint": str(trainer.best_checkpoint)}


def run(args: argparse.Namespace, settings: TaskSettings) -> dict:
    kd = from_flags(KDSettings, vars(args))
    seed_everything(settings.seed)
    device = pick_device(settings.run.use_gpu, settings.run.device)
    restored = restore_task_model(kd.teacher, "classifier", device=device, check=same_task(kd.teacher, kd.dataset))
    teacher, tokenizer, teacher_flags = restored.model, restored.tokenizer, restored.flags
    paths = {"train": kd.train or default_path(kd.dataset, "train"),
             "dev": kd.dev or default_path(kd.dataset, "dev")}
    max_len = settings.data.max_length or min(512, teacher.gpt.config.max_position_embeddings)
    batch_size = settings.data.batch_size
    collate = PadCollator(tokenizer.pad_token_id)
    feats, labels = {}, {}
    for split, path in paths.items():
        rows = read_split(kd.dataset, path, limit=settings.data.limit)
        if any(r.label is None for r in rows):
            raise SystemExit(f"{path}: no 'sentiment' column; kd needs labels")
        feats[split] = sentiment_features(rows, tokenizer, max_len, f"{kd.dataset} {split}")
        labels[split] = [r.label for r in rows]
    for split in feats:
        t_logits = logits_of(teacher, make_eval_loader(feats[split], collate, batch_size))
        for f, t in zip(feats[split], t_logits):
            f["teacher_logits"] = t
    teacher_dev = metrics_of(teacher, make_eval_loader(feats["dev"], collate, batch_size), labels["dev"])
    results: dict[str, Any] = {"teacher": {"dev_accuracy": teacher_dev["accuracy"],
                                           "dev_matthews_corr": teacher_dev["matthews_corr"],
                                           "checkpoint": str(kd.teacher),
                                           "model_size": from_flags(ModelSettings, teacher_flags).model_size,
                                           "fine_tune_mode": teacher_flags["fine_tune_mode"]}}
    results["kd"] = train_student(settings, kd, teacher, feats, kd.alpha, "kd", device, collate, labels["dev"])
    if not kd.no_baseline:
        results["baseline"] = train_student(settings, kd, teacher, feats, 0.0, "baseline", device, collate,
                                            labels["dev"])
    summary = {"results": results, "dataset": kd.dataset, "student": kd.student,
               "settings": {"alpha": kd.alpha, "temperature": kd.temperature, "lr": settings.train.lr,
                            "epochs": settings.train.epochs, "batch_size": batch_size, "limit": settings.data.limit},
               "seed": settings.seed}
    write_summary(kd.out_dir(settings) / "kd.json", "kd", **summary)
    for key, name in (("dev_accuracy", "accuracy"), ("dev_matthews_corr", "Matthews corr.")):
        line = f"{kd.dataset} dev {name}: teacher {results['teacher'][key]:.3f}, student+KD {results['kd'][key]:.3f}"
        if "baseline" in results:
            line += f", student alone {results['baseline'][key]:.3f}"
        print(line)
    print(json.dumps(results, indent=2))
    return summary
