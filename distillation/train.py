"""Step 4, ``train``: the kept pairs (label 1) and generated negatives (pairs that
failed entailment, label 0) written in the Quora file format, and
the paraphrase task (``tasks.paraphrase``, what ``paraphrase_detection.py`` runs) trained on
them, with every shared flag given here (engine, LoRA, model) passed on:

- approach 1: generated pairs only (batch 8, 4 epochs);
- approach 2: generated pairs plus the Quora training set (batch 16, 8 epochs);

both with lr 1.5e-5, evaluated on the Quora dev split. ``--epochs``/``--batch_size``
override the approach's defaults. ``--prepare_only`` writes the files and stops.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from cli.paraphrase import paraphrase_settings
from distillation.filter_step import side_paths
from distillation.records import read_jsonl, write_quora_tsv, write_summary
from engine.rng import seed_everything
from tasks.paraphrase import ParaphraseSettings
from tasks.paraphrase import run as train_paraphrase
from tasks.quora_data import load_quora_splits
from tasks.settings import TaskSettings

DEFAULTS = {"lr": 1.5e-5, "epochs": None, "batch_size": None, "hidden_dropout_prob": 0.1}
APPROACHES = {1: {"batch_size": 8, "epochs": 4, "quora": False}, 2: {"batch_size": 16, "epochs": 8, "quora": True}}


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pairs", required=True, help="kept pairs from the filter step (JSON lines)")
    p.add_argument("--negatives", default=None, help="default: <pairs>.negatives.jsonl beside --pairs")
    p.add_argument("--approach", choices=("1", "2", "both"), default="both")
    p.add_argument("--neg_ratio", type=float, default=1.0,
                   help="at most this many negatives per positive (a random subset); <0 keeps all")
    p.add_argument("--para_train", default="data/quora-train.csv", help="Quora train set added in approach 2")
    p.add_argument("--para_dev", default="data/quora-dev.csv")
    p.add_argument("--para_test", default="data/quora-test-student.csv")
    p.add_argument("--prepare_only", action="store_true", help="write the pair files, do not train")


def negatives_for(positives: list, negatives: list, ratio: float, seed: int) -> list:
    """A seeded subset of at most ratio * len(positives) negatives (all when ratio < 0)."""
    if ratio < 0 or len(negatives) <= ratio * len(positives):
        return list(negatives)
    return random.Random(seed).sample(negatives, int(ratio * len(positives)))


def quora_train_pairs(train: str, dev: str, test: str, limit: int = 0) -> list[tuple[str, str, int]]:
    """(sentence1, sentence2, label) of the Quora training split the paraphrase task reads."""
    rows = load_quora_splits(train, dev, test, limit=limit)["train"]
    return [(r.sentence1, r.sentence2, r.label) for r in rows]


def paraphrase_settings_for(args: argparse.Namespace, train_file: Path, out_dir: Path, batch_size: int,
                            epochs: int) -> ParaphraseSettings:
    """The paraphrase run's settings: every flag this step shares with it, the approach's
    batch size and epochs, and the files under ``out_dir``."""
    return paraphrase_settings(args, para_train=str(train_file), para_dev_out=str(out_dir / "para-dev-output.csv"),
                               para_test_out=str(out_dir / "para-test-output.csv"), output_dir=str(out_dir),
                               batch_size=batch_size, epochs=epochs)


def run(args: argparse.Namespace, settings: TaskSettings) -> dict:
    seed_everything(settings.seed)
    pos = [(r["s1"], r["s2"]) for r in read_jsonl(args.pairs)]
    neg_path = args.negatives or side_paths(args.pairs)[0]
    neg_all = [(r["s1"], r["s2"]) for r in read_jsonl(neg_path)]
    if not pos and not neg_all:
        raise SystemExit(f"{args.pairs}: no pairs to train on (lower the filter's --threshold or generate more)")
    neg = negatives_for(pos, neg_all, args.neg_ratio, settings.seed)
    out_root = Path(settings.run.output_dir or "runs/distillation/train")
    approaches = (1, 2) if args.approach == "both" else (int(args.approach),)
    results: dict = {}
    for a in approaches:
        spec = APPROACHES[a]
        extra_pos, extra_neg = [], []
        if spec["quora"]:
            quora = quora_train_pairs(args.para_train, args.para_dev, args.para_test, settings.data.limit)
            extra_pos = [(s1, s2) for s1, s2, y in quora if y == 1]
            extra_neg = [(s1, s2) for s1, s2, y in quora if y == 0]
        out_dir = out_root / f"approach{a}"
        pair_file = out_dir / ("generated-pairs.csv" if a == 1 else "generated-plus-quora.csv")
        rows = write_quora_tsv(pair_file, pos + extra_pos, neg + extra_neg, seed=settings.seed)
        epochs = settings.train.epochs
        bs, ep = settings.data.batch_size or spec["batch_size"], epochs if epochs is not None else spec["epochs"]
        res = {"pair_file": str(pair_file), "rows": rows, "positives": len(pos) + len(extra_pos),
               "negatives": len(neg) + len(extra_neg), "generated_positives": len(pos),
               "generated_negatives": len(neg), "quora_rows": len(extra_pos) + len(extra_neg),
               "batch_size": bs, "epochs": ep, "lr": settings.train.lr}
        print(f"approach {a}: wrote {rows} pairs to {pair_file}")
        if not args.prepare_only:
            out = train_paraphrase(paraphrase_settings_for(args, pair_file, out_dir, bs, ep))
            res.update({"dev": out.get("dev"), "test": out.get("test"), "checkpoint": out.get("checkpoint")})
        results[f"approach{a}"] = res
    summary = {"results": results, "generated_negatives_available": len(neg_all), "neg_ratio": args.neg_ratio,
               "settings": {"model_size": settings.model.model_size, "random_init": settings.model.random_init,
                            "limit": settings.data.limit},
               "seed": settings.seed}
    write_summary(out_root / "train.json", "train", **summary)
    return summary
