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
ensemble's dev metrics.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cli.validation import non_negative_int, positive_int
from experiments.launch import ExperimentError
from experiments.tables import write_tables
from models.loading import CheckpointError
from tasks.metrics import classification_metrics


@dataclass
class Member:
    """One checkpoint: its task, what it predicts from, and its class probabilities per split."""

    path: Path
    task: str  # classifier | paraphrase
    model: Any
    tokenizer: Any
    max_length: int
    num_labels: int = 2
    dataset: str | None = None
    args: argparse.Namespace | None = None


def checkpoint_task(path: str | Path) -> str:
    """``classifier`` or ``paraphrase`` from what the file holds (read without its tensors)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    extra = ckpt.get("extra") or {}
    if "num_labels" in extra and "args" in extra:
        return "classifier"
    if "config" in ckpt and extra.get("task") == "paraphrase":
        return "paraphrase"
    raise CheckpointError(f"{path}: neither a classifier.py checkpoint (best.pt) nor a paraphrase_detection.py "
                          "model file (paraphrase-model.pt)")


def load_members(paths: Sequence[str | Path], device: torch.device) -> list[Member]:
    """Every checkpoint rebuilt; all must be of one task (and one dataset and label set)."""
    kinds = {str(p): checkpoint_task(p) for p in paths}  # all checked before any model is built
    if len(set(kinds.values())) > 1:
        raise ExperimentError(f"checkpoints of different tasks cannot be ensembled: {kinds}")
    members: list[Member] = []
    for p in paths:
        if kinds[str(p)] == "classifier":
            members.append(_classifier_member(p, device, members[0] if members else None))
        else:
            from models.loading import load_tokenizer
            from tasks.paraphrase import load_paraphrase_scorer

            model = load_paraphrase_scorer(p, device)
            args = run_args(Path(p).parent)
            members.append(Member(Path(p), "paraphrase", model, load_tokenizer(getattr(args, "tokenizer", None),
                                                                               verbose=False),
                                  getattr(args, "max_length", 0) or model.gpt.config.max_position_embeddings,
                                  args=args))
    return members


def run_args(folder: Path) -> argparse.Namespace | None:
    """The flags of the run that wrote a paraphrase model file (its model file holds none; the
    run's ``last.pt`` beside it does), so the member reads the data as its run did."""
    last = folder / "last.pt"
    if not last.exists():
        return None
    extra = torch.load(last, map_location="cpu", weights_only=True, mmap=True).get("extra") or {}
    return argparse.Namespace(**extra["args"]) if "args" in extra else None


def _classifier_member(path: str | Path, device: torch.device, first: Member | None) -> Member:
    from tasks.sentiment_checkpoint import load_classifier

    def same_task(extra: Any) -> None:
        if first is not None and (extra.get("dataset"), extra["num_labels"]) != (first.dataset, first.num_labels):
            raise CheckpointError(f"{path}: trained on {extra.get('dataset')} ({extra['num_labels']} labels), but "
                                  f"{first.path} on {first.dataset} ({first.num_labels}); ensemble "
                                  "checkpoints of one dataset")

    c = load_classifier(path, device, same_task)
    max_len = c.args.max_length or c.model.gpt.config.max_position_embeddings
    return Member(Path(path), "classifier", c.model, c.tokenizer, max_len, c.num_labels, c.dataset, c.args)


def read_split(first: Member, split: str, path: str | None, limit: int | None = None) -> list[Any] | None:
    """The rows of ``split``: ``path`` or the file the first member's run used (None: no such file),
    the first ``limit`` of them (None: the first member's run's ``--limit``)."""
    if limit is None:
        limit = getattr(first.args, "limit", 0) or 0
    if first.task == "paraphrase":
        from tasks.course_data import load_quora_splits

        # The paraphrase run's defaults: offline, the same deterministic splits carved from quora-minbert-dev.csv.
        files = {s: getattr(first.args, f"para_{s}", f"data/quora-{s}.csv") for s in ("train", "dev")}
        files["test"] = getattr(first.args, "para_test", "data/quora-test-student.csv")
        files[split] = path or files[split]
        return load_quora_splits(files["train"], files["dev"], files["test"], limit=limit)[split]
    path = path or getattr(first.args, f"{first.dataset}_{split}", None)
    if path is None:
        return None
    if first.dataset == "cola":
        from tasks.cola import read_cola

        return read_cola(path, limit)
    from tasks.course_data import SENTIMENT_LABELS, read_sentiment

    return read_sentiment(path, limit, labels=SENTIMENT_LABELS.get(first.dataset))


@torch.no_grad()
def probabilities(member: Member, rows: Sequence[Any], batch_size: int, name: str = "") -> torch.Tensor:
    """(N, C) class probabilities of ``rows`` in order, with the task's own prediction code."""
    from engine.data import PadCollator

    collate = PadCollator(member.tokenizer.pad_token_id, padding_side=getattr(member.args, "padding_side", "right"))
    if member.task == "paraphrase":
        from tasks.course_data import paraphrase_features
        from tasks.paraphrase import predict_p_yes

        feats = paraphrase_features(rows, member.tokenizer, member.max_length, verbose=False)
        p_yes = torch.tensor(predict_p_yes(member.model, feats, collate, batch_size))
        return torch.stack([1 - p_yes, p_yes], dim=-1)
    from engine.data import make_eval_loader
    from engine.predict import predict_in_order
    from tasks.course_data import sentiment_features
    from tasks.sentiment import logits

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
        from models.heads import ClozeParaphraseScorer
        from tasks.paraphrase import write_paraphrase_predictions

        path = folder / f"para-{split}-output.csv"
        write_paraphrase_predictions(path, [r.id for r in rows], ClozeParaphraseScorer.answer_token(preds))
        return path
    from tasks.course_data import write_id_predictions

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
    p.add_argument("checkpoints", nargs="+", help="classifier.py best.pt/last.pt files, or paraphrase model files")
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


def main(args: argparse.Namespace, task_argv: list[str]) -> dict[str, Any]:
    return run_ensemble(args.checkpoints, args.out, dev=args.dev, test=args.test, prefix=args.prefix,
                        batch_size=args.batch_size, limit=args.limit, device=args.device)


__all__ = ["Member", "add_args", "checkpoint_task", "load_members", "main", "mean_probabilities", "probabilities",
           "read_split", "run_ensemble", "write_predictions"]
