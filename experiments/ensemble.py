"""Ensembles: saved checkpoints of one task combined by averaging their class probabilities.

    python -m experiments ensemble runs/seeds/sst-lora/seed-*/best.pt runs/classifier/full-model-sst/*/best.pt \\
        --out runs/ensembles/sst
    python -m experiments ensemble runs/para-a/paraphrase-model.pt runs/para-b/paraphrase-model.pt \\
        --out runs/ensembles/para

Members may mix fine-tune modes and model sizes: each is rebuilt from its own checkpoint
(``classifier.py``'s ``best.pt``/``last.pt``, or ``paraphrase_detection.py``'s model file) and reads
the data with its own run's tokenisation limit (a paraphrase model file's run flags are read
from the ``last.pt`` beside it); only the task (and for sentiment the dataset and label
set) must agree. The ensemble predicts the class of largest mean probability (softmax of a
classifier's logits; P(no), P(yes) of the cloze scorer). Written to ``--out``: the prediction
files in the starter's format (``predictions/<prefix>-<dataset>-{dev,test}-out.csv``, or
``para-{dev,test}-output.csv``), and ``ensemble.{csv,md}`` with each member's and the
ensemble's dev metrics. Sonnet models (``sonnet-model.pt``) are combined by MBR over their pooled
samples instead (``experiments.sonnet_ensemble``, ``--samples``).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import torch

from cli.validation import non_negative_int, positive_int
from engine.checkpoints import load_checkpoint
from engine.data import PadCollator, make_eval_loader
from engine.predict import predict_in_order
from errors import CheckpointError
from experiments.launch import ExperimentError
from experiments.sonnet_ensemble import run_sonnet_ensemble
from experiments.tables import write_tables
from models.heads import ClozeParaphraseScorer
from models.loading import load_tokenizer
from tasks.course_data import SENTIMENT_LABELS, read_sentiment, sentiment_features, write_id_predictions
from tasks.metrics import classification_metrics
from tasks.paraphrase import ParaphraseSettings, predict_p_yes, write_paraphrase_predictions
from tasks.quora_data import load_quora_splits, paraphrase_features
from tasks.restore import restore_task_model
from tasks.sentiment import DATASETS, SPLITS, SentimentSettings, logits, read_cola
from tasks.settings import DataSettings, ModelSettings, TaskSettings, from_flags

S = TypeVar("S", bound=TaskSettings)


@dataclass
class Member:
    """One checkpoint: its task, what it predicts from, and the settings of the run that trained it
    (``ParaphraseSettings`` or ``SentimentSettings``: how that run read and tokenised its data)."""

    path: Path
    task: str  # classifier | paraphrase
    model: Any
    tokenizer: Any
    max_length: int
    num_labels: int = 2
    dataset: str | None = None
    settings: TaskSettings = field(default_factory=TaskSettings)


def checkpoint_task(path: str | Path) -> str:
    """``classifier``, ``paraphrase`` or ``sonnet`` from what the file holds (read without its tensors)."""
    ckpt = load_checkpoint(path, mmap=True)
    extra = ckpt.get("extra") or {}
    if "num_labels" in extra and "args" in extra:
        return "classifier"
    if "config" in ckpt and extra.get("task") in ("paraphrase", "sonnet"):
        return extra["task"]
    raise CheckpointError(f"{path}: neither a classifier.py checkpoint (best.pt), a paraphrase_detection.py "
                          "model file (paraphrase-model.pt) nor a sonnet model file (sonnet-model.pt)")


def one_task(paths: Sequence[str | Path]) -> str:
    """The task of every checkpoint (``checkpoint_task``), all read before any model is built: one task only."""
    kinds = {str(p): checkpoint_task(p) for p in paths}
    if len(set(kinds.values())) > 1:
        raise ExperimentError(f"checkpoints of different tasks cannot be ensembled: {kinds}")
    return next(iter(kinds.values()))


def load_members(paths: Sequence[str | Path], device: torch.device) -> list[Member]:
    """Every checkpoint rebuilt; all must be of one task (and one dataset and label set), with class
    probabilities (a sonnet model has none: ``experiments.sonnet_ensemble``)."""
    task = one_task(paths)
    if task == "sonnet":
        raise CheckpointError(f"{paths[0]}: a sonnet model file; only classifier and paraphrase checkpoints have "
                              "class probabilities")
    members: list[Member] = []
    for p in paths:
        if task == "classifier":
            members.append(_classifier_member(p, device, members[0] if members else None))
        else:
            model = restore_task_model(p, "paraphrase", device=device).model.eval()
            settings = settings_of(ParaphraseSettings, run_flags(Path(p).parent))
            members.append(Member(Path(p), "paraphrase", model, load_tokenizer(settings.model.tokenizer, verbose=False),
                                  settings.data.max_length or model.gpt.config.max_position_embeddings,
                                  settings=settings))
    return members


def run_flags(folder: Path) -> dict[str, Any]:
    """The flags of the run that wrote a paraphrase model file (its model file holds none; the
    run's ``last.pt`` beside it does), so the member reads the data as its run did ({}: unknown,
    the paraphrase run's defaults)."""
    last = folder / "last.pt"
    if not last.exists():
        return {}
    extra = load_checkpoint(last, mmap=True).get("extra") or {}
    return dict(extra.get("args", {}))


def settings_of(cls: type[S], flags: Mapping[str, Any], **fields: Any) -> S:
    """A task's settings (``cls``) as a saved run's flags set them: its model, data and own fields
    (a flag the run predates keeps the field's default), with ``fields`` added."""
    return replace(from_flags(cls, flags), model=from_flags(ModelSettings, flags),
                   data=from_flags(DataSettings, flags), flags=dict(flags), **fields)


def _classifier_member(path: str | Path, device: torch.device, first: Member | None) -> Member:
    def same_task(extra: Any) -> None:
        if first is not None and (extra.get("dataset"), extra["num_labels"]) != (first.dataset, first.num_labels):
            raise CheckpointError(f"{path}: trained on {extra.get('dataset')} ({extra['num_labels']} labels), but "
                                  f"{first.path} on {first.dataset} ({first.num_labels}); ensemble "
                                  "checkpoints of one dataset")

    c = restore_task_model(path, "classifier", device=device, check=same_task)
    files = {(ds, split): c.flags[f"{ds}_{split}"] for ds in DATASETS for split in SPLITS[ds]
             if f"{ds}_{split}" in c.flags}
    settings = settings_of(SentimentSettings, c.flags, files=files)
    max_len = settings.data.max_length or c.model.gpt.config.max_position_embeddings
    return Member(Path(path), "classifier", c.model, c.tokenizer, max_len, c.num_labels, c.dataset, settings)


def read_split(first: Member, split: str, path: str | None, limit: int | None = None) -> list[Any] | None:
    """The rows of ``split``: ``path`` or the file the first member's run used (None: no such file),
    the first ``limit`` of them (None: the first member's run's ``--limit``)."""
    settings = first.settings
    if limit is None:
        limit = settings.data.limit
    if isinstance(settings, ParaphraseSettings):
        # The paraphrase run's defaults: offline, the same deterministic splits carved from quora-minbert-dev.csv.
        files = {"train": settings.para_train, "dev": settings.para_dev, "test": settings.para_test}
        files[split] = path or files[split]
        return load_quora_splits(files["train"], files["dev"], files["test"], limit=limit)[split]
    if isinstance(settings, SentimentSettings):
        path = path or settings.files.get((first.dataset, split))
    if path is None:
        return None
    if first.dataset == "cola":
        return read_cola(path, limit)
    return read_sentiment(path, limit, labels=SENTIMENT_LABELS.get(first.dataset))


@torch.no_grad()
def probabilities(member: Member, rows: Sequence[Any], batch_size: int, name: str = "") -> torch.Tensor:
    """(N, C) class probabilities of ``rows`` in order, with the task's own prediction code."""
    settings = member.settings
    padding_side = settings.padding_side if isinstance(settings, ParaphraseSettings) else "right"
    collate = PadCollator(member.tokenizer.pad_token_id, padding_side=padding_side)
    if member.task == "paraphrase":
        feats = paraphrase_features(rows, member.tokenizer, member.max_length, verbose=False)
        p_yes = torch.tensor(predict_p_yes(member.model, feats, collate, batch_size))
        return torch.stack([1 - p_yes, p_yes], dim=-1)
    feats = sentiment_features(rows, member.tokenizer, member.max_length, f"{member.dataset} {name}".strip())
    out = predict_in_order(member.model, make_eval_loader(feats, collate, batch_size), logits)
    return torch.tensor(out).softmax(-1)


def mean_probabilities(probs: Sequence[torch.Tensor]) -> torch.Tensor:
    """The ensemble's (N, C) probabilities: the members' mean."""
    return torch.stack(list(probs)).mean(0)


def write_predictions(first: Member, split: str, rows: Sequence[Any], preds: Sequence[int], folder: Path,
                      prefix: str) -> Path:
    """The starter's prediction file of ``split``, written by the task's own writer."""
    if first.task == "paraphrase":
        path = folder / f"para-{split}-output.csv"
        write_paraphrase_predictions(path, [r.id for r in rows], ClozeParaphraseScorer.answer_token(preds))
        return path
    path = folder / f"{prefix}-{first.dataset}-{split}-out.csv"
    write_id_predictions(path, "Predicted_Sentiment", [r.id for r in rows], list(preds))
    return path


def run_ensemble(paths: Sequence[str | Path], out: str | Path, *, dev: str | None = None, test: str | None = None,
                 prefix: str = "ensemble", batch_size: int = 32, limit: int | None = None,
                 device: str | torch.device = "cpu") -> dict[str, Any]:
    """Load the members, average their probabilities on dev and test, write the prediction files and
    ``ensemble.{csv,md}``; returns ``{"dev": metrics, "members": [...], "probs": {split: (N, C)}, ...}``."""
    out = Path(out)
    members = load_members(paths, torch.device(device))
    first = members[0]
    result: dict[str, Any] = {"members": [], "probs": {}, "predictions": {}}
    for split, path in (("dev", dev), ("test", test)):
        rows = read_split(first, split, path, limit)
        if rows is None:
            continue
        probs = [probabilities(m, rows, batch_size, split) for m in members]
        mean = mean_probabilities(probs)
        preds = mean.argmax(-1).tolist()
        result["probs"][split] = mean
        result["predictions"][split] = write_predictions(first, split, rows, preds, out / "predictions", prefix)
        print(f"wrote {result['predictions'][split]}")
        if split == "dev":
            labels = [r.label for r in rows]
            result["members"] = [{"checkpoint": str(m.path), **classification_metrics(labels, p.argmax(-1).tolist())}
                                 for m, p in zip(members, probs)]
            result["dev"] = classification_metrics(labels, preds)
    table = [*result["members"], {"checkpoint": f"ensemble of {len(members)}", **result.get("dev", {})}]
    csv_path, md_path = write_tables(table, ["checkpoint", "accuracy", "macro_f1", "matthews_corr"],
                                     out / "ensemble", f"{first.task} ensemble, dev set")
    print(md_path.read_text())
    print(f"wrote {csv_path} and {md_path}")
    return result


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoints", nargs="+",
                   help="classifier.py best.pt/last.pt files, paraphrase model files, or sonnet model files")
    p.add_argument("--out", required=True, help="folder for predictions/ and ensemble.{csv,md}")
    p.add_argument("--dev", default=None, help="dev file (default: the one the first checkpoint's run used)")
    p.add_argument("--test", default=None, help="test file (default: the one the first checkpoint's run used)")
    p.add_argument("--prefix", default="ensemble",
                   help="sentiment prediction files are <prefix>-<dataset>-<split>-out.csv (e.g. full-model "
                        "for the course's names)")
    p.add_argument("--batch_size", type=positive_int, default=32)
    p.add_argument("--limit", type=non_negative_int, default=None,
                   help="only the first N examples of each split (default: the first checkpoint's run's --limit; "
                        "0: all)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1...")
    p.add_argument("--samples", type=positive_int, default=4,
                   help="sonnet models (sonnet-model.pt): sonnets each model samples per prompt, all pooled for "
                        "MBR by chrF (experiments.sonnet_ensemble)")
    p.add_argument("--seed", type=int, default=11711, help="sonnet models: seeds the sampling")


def main(args: argparse.Namespace, task_argv: list[str]) -> dict[str, Any]:
    if one_task(args.checkpoints) == "sonnet":  # no probabilities to average: MBR over the models' samples
        return run_sonnet_ensemble(args.checkpoints, args.out, run_flags(Path(args.checkpoints[0]).parent),
                                   samples=args.samples, dev=args.dev, test=args.test, limit=args.limit,
                                   seed=args.seed, device=args.device)
    return run_ensemble(args.checkpoints, args.out, dev=args.dev, test=args.test, prefix=args.prefix,
                        batch_size=args.batch_size, limit=args.limit, device=args.device)


__all__ = ["Member", "add_args", "checkpoint_task", "load_members", "main", "mean_probabilities", "one_task",
           "probabilities", "read_split", "run_ensemble", "write_predictions"]
