"""Sentence classification with ``GPT2SentimentClassifier``: sentiment on SST (5 classes) and
CFIMDB (2), and grammatical acceptability on CoLA (2; its reader ``read_cola`` is below). The task behind
``classifier.py``, callable with its settings (``run(SentimentSettings(...), dataset)``).

The training loss is the cross-entropy of the head's logits, with the training objectives'
terms added when one is asked for (R-Drop, SimCSE, SMART: ``tasks.common.training_loss``).
``--pooling`` picks the head's sentence representation and is saved beside the weights
(``extra["pooling"]``), so ``--load``, the KD teacher and ensembles rebuild the head the same way.

CoLA has no public test set (GLUE keeps its labels), so a CoLA run writes dev predictions only;
it selects its best epoch on Matthews correlation, GLUE's CoLA metric, and reports accuracy
beside it (every run's dev metrics, in ``metrics.jsonl`` too, include both).

CoLA (Warstadt, Singh and Bowman 2019, "Neural Network Acceptability Judgments"; the GLUE
grammatical-acceptability task) asks whether an English sentence is grammatical (1) or not (0).
The files setup.sh fetches (``data/cola-train.tsv``, ``data/cola-dev.tsv``: the in-domain
training set and the out-of-domain development set, tokenized and lower-cased) have no header
and no ids: each line is ``sentence \\t label``. They are read into the sentiment reader's
``SentimentExample`` so that the classifier's features, loaders and prediction files serve
CoLA unchanged; each example's id is the file's name and its line (``cola-dev-12``), stable
across runs. GLUE scores CoLA by Matthews correlation (``tasks.metrics.matthews_corr``),
since 70% of the sentences are grammatical and accuracy flatters a majority guess.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine import ranks
from engine.checkpoints import load_weights_into
from engine.data import DataFormatError, PadCollator, Record, make_eval_loader, parse_int, sample
from engine.device import cpu_hint
from engine.efficiency import count_parameters
from engine.predict import predict_in_order
from models.heads import GPT2SentimentClassifier, pooling_of
from tasks.common import (
    build_body,
    check_context,
    default_output_dir,
    fit_task,
    open_task_run,
    prepare_model,
    start,
    train_config,
    train_metrics_fn,
    training_loss,
)
from tasks.course_data import (
    SENTIMENT_LABELS,
    SentimentExample,
    read_sentiment,
    sentiment_features,
    write_id_predictions,
)
from tasks.metrics import classification_metrics, majority_baseline
from tasks.publish import RunPredictions, Target, is_explicit, never_read, partial_reason, shown
from tasks.settings import ClassificationSettings

COLA_FILES = {"train": "cola-train.tsv", "dev": "cola-dev.tsv"}
COLA_LABELS = 2


def read_cola(path: str | Path, limit: int = 0, lowercase: bool = True) -> list[SentimentExample]:
    """Labelled CoLA sentences of a ``sentence \\t label`` file (first ``limit`` when > 0).
    Blank lines are skipped; a line without exactly two tab-separated fields, with an empty
    sentence, or with a label other than 0/1 raises ``DataFormatError`` naming file and line."""
    path = Path(path)
    if not path.exists():
        raise DataFormatError(path, None, "file does not exist (run setup.sh to download the data, or pass the path)")
    with open(path, encoding="utf-8", newline="") as f:
        lines = f.read().splitlines()
    out: list[SentimentExample] = []
    for lineno, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        fields = text.split("\t")
        if len(fields) != 2:
            raise DataFormatError(path, lineno, f"expected 2 tab-separated fields (sentence, label), found "
                                                f"{len(fields)}")
        sentence = fields[0].strip()
        if not sentence:
            raise DataFormatError(path, lineno, "empty sentence")
        label = parse_int(Record(lineno, {"label": fields[1].strip()}), "label", path, allowed=(0, 1))
        out.append(SentimentExample(id=f"{path.stem}-{lineno}", text=sentence.lower() if lowercase else sentence,
                                    label=label, line=lineno, path=str(path)))
        if limit and len(out) >= limit:
            break
    if not out:
        raise DataFormatError(path, None, "no sentences found; expected lines 'sentence<TAB>label'")
    return out


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


@dataclass(frozen=True)
class SentimentSettings(ClassificationSettings):
    """A ``classifier.py`` run: ``dataset`` is one of ``DATASETS`` or ``both`` (SST then CFIMDB, each
    in a subfolder of the run folder); ``files`` maps (dataset, split) to a file other than
    ``default_path``'s; prediction files are published to ``predictions_dir`` (``tasks.publish``)."""

    dataset: str = "both"
    files: Mapping[tuple[str, str], str] = field(default_factory=dict)
    predictions_dir: str = "predictions"

    def path(self, dataset: str, split: str) -> str:
        """The file of ``split`` of ``dataset``."""
        return self.files.get((dataset, split), default_path(dataset, split))


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


def run(settings: SentimentSettings, dataset: str) -> dict[str, Any]:
    """Train on one dataset, write its dev (and test, where there is one) predictions; returns
    the dev metrics."""
    mode, data_settings = settings.fine_tune.mode, settings.data
    print(f"Training sentence classifier on {dataset} ({mode})...")
    splits = SPLITS[dataset]
    explicit = is_explicit(settings, "predictions_dir")
    files = RunPredictions({s: Target(Path(settings.predictions_dir) / f"{mode}-{dataset}-{s}-out.csv", explicit)
                            for s in splits if s != "train"},
                           partial_reason(limit=data_settings.limit, max_steps=settings.train.max_steps))
    parent = default_output_dir("classifier", f"{mode}-{dataset}")
    subdir = dataset if settings.dataset == "both" else None
    out_dir = open_task_run(settings, parent, subdir=subdir, outputs=files.published())
    device = start(settings)
    gpt, tokenizer = build_body(settings.model)  # weights first: a bad --model_size fails before any data is read
    check_context(gpt.config.max_position_embeddings, max_length=settings.data.max_length)
    paths = {split: settings.path(dataset, split) for split in splits}
    # --limit: a seeded sample of the training file (its rows are grouped by label), the first N of dev and test.
    data = {split: read_split(dataset, p, limit=0 if split == "train" else data_settings.limit)
            for split, p in paths.items()}
    data["train"] = sample(data["train"], data_settings.limit, settings.seed)
    for split, rows in data.items():
        print(f"loaded {len(rows)} {split} examples from {paths[split]}")
    for split in ("train", "dev"):
        if any(e.label is None for e in data[split]):
            raise SystemExit(f"{paths[split]}: no 'sentiment' column; the {split} split needs labels")
    num_labels = NUM_LABELS[dataset]
    print(f"{num_labels} labels")
    model = GPT2SentimentClassifier(gpt, num_labels, settings.model.hidden_dropout_prob, settings.objective.pooling)
    trainable_only = prepare_model(model, settings.fine_tune)
    if out_dir is not None and (note := cpu_hint(device, trainable_parameters=count_parameters(model)[0],
                                                 train_examples=len(data["train"]))):
        print(note, file=sys.stderr)

    max_len = data_settings.max_length or model.gpt.config.max_position_embeddings
    feats = {s: sentiment_features(rows, tokenizer, max_len, f"{dataset} {s}") for s, rows in data.items()}
    collate = PadCollator(tokenizer.pad_token_id)
    loaders = {s: make_eval_loader(feats[s], collate, data_settings.batch_size, data_settings.num_workers)
               for s in files.targets}
    dev_labels = [e.label for e in data["dev"]]

    def eval_fn(m: torch.nn.Module) -> dict[str, float]:
        return classification_metrics(dev_labels, predict_labels(m, loaders["dev"]))

    load = settings.run.load
    if load:
        saved = pooling_of(load_weights_into(model, load).get("extra", {}))
        if saved != model.pooling:
            print(f"--pooling {saved}: the pooling {load} was trained with (not {model.pooling})")
            model.pooling = saved
        print(f"loaded {load}")
    if out_dir is not None:  # None: --epochs 0 only predicts with the --load model
        cfg = train_config(settings, device, out_dir, metric=SELECTION_METRIC[dataset],
                           save_trainable_only=trainable_only)
        loss = training_loss(settings.objective, logits)
        on_train = train_metrics_fn(feats["train"], len(feats["dev"]), settings.seed, lambda m, rows: predict_labels(
            m, make_eval_loader(rows, collate, data_settings.batch_size, data_settings.num_workers)))
        fit_task(model, loss, feats["train"], collate, eval_fn, cfg, **data_settings.loader_kwargs(),
                 callbacks=loss.callbacks, train_eval_fn=on_train,
                 extra={"args": dict(settings.flags), "dataset": dataset, "num_labels": num_labels,
                        "fine_tune": settings.fine_tune.to_dict(), "pooling": model.pooling})

    preds = {split: predict_labels(model, loader) for split, loader in loaders.items()}
    metrics = classification_metrics(dev_labels, preds["dev"])
    metrics["majority_baseline"] = majority_baseline([e.label for e in data["train"]], dev_labels)
    if ranks.is_main():  # under torchrun: one writer
        files.open(out_dir, settings.run, parent, subdir)
        for split in files.targets:
            write_id_predictions(files.path(split), PREDICTION_COLUMN[dataset], [e.id for e in data[split]],
                                 preds[split])
            print(f"wrote {shown(files.path(split))}")
        for target in files.targets.values():
            if note := never_read(target.dest.name):
                print(f"note: {note}")
        files.publish(SELECTION_METRIC[dataset], metrics[SELECTION_METRIC[dataset]])
    mcc = f", Matthews corr. {metrics['matthews_corr']:.3f}" if dataset == "cola" else ""
    print(f"{dataset} dev accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}{mcc} "
          f"(majority-class baseline accuracy {metrics['majority_baseline']:.3f})")
    return metrics



__all__ = [
    "DATASETS", "FILE_NAMES", "NUM_LABELS", "SELECTION_METRIC", "SPLITS", "STARTER_DATASETS", "SentimentSettings",
    "default_path", "logits", "predict_labels", "read_split", "run",
]
