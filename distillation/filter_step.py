"""Step 3, ``filter``: candidate pairs from continuations of the same context,
kept only when they pass the length, numbers, copy, bidirectional-entailment
and dedup filters (``distillation.filters``). Writes the kept pairs, the
generated negatives (pairs that failed entailment), every scored candidate
(for choosing a threshold), and a summary of how many pairs each filter removed.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

from cli.validation import non_negative_int, positive_float, unit_interval
from distillation.filters import FilterConfig, Pair, ScoreFn, apply_filters, candidate_pairs
from distillation.records import read_jsonl, write_jsonl, write_summary
from distillation.scorer import add_scorer_args, load_scorer
from engine.rng import seed_everything
from tasks.settings import TaskSettings

DEFAULTS = {"batch_size": 64}


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--generations", required=True, help="JSON lines from the generate step")
    p.add_argument("--output", required=True, help="kept pairs, JSON lines (negatives go to <name>.negatives.jsonl)")
    p.add_argument("--max_pairs_per_context", type=non_negative_int, default=0,
                   help="random subset of each context's candidates (0: all pairs)")
    add_filter_args(p)
    add_scorer_args(p)


def add_filter_args(p: argparse.ArgumentParser) -> None:
    """The filters' settings, shared with self-distill."""
    p.add_argument("--threshold", type=unit_interval, default=0.75, help="minimum P(paraphrase) in each direction")
    p.add_argument("--min_ratio", type=positive_float, default=0.8, help="minimum len(s2)/len(s1) in characters")
    p.add_argument("--max_ratio", type=positive_float, default=1.5, help="maximum len(s2)/len(s1) in characters")
    p.add_argument("--max_rouge", type=unit_interval, default=0.75, help="maximum ROUGE-L F (higher is a copy)")


def filter_config(args: argparse.Namespace) -> FilterConfig:
    return FilterConfig(args.min_ratio, args.max_ratio, args.max_rouge, args.threshold)


def side_paths(output: str | Path) -> tuple[Path, Path]:
    """Where the negatives and the scored candidates of ``output`` go."""
    output = Path(output)
    stem = output.name.split(".")[0]
    return output.with_name(f"{stem}.negatives.jsonl"), output.with_name(f"{stem}.scored.jsonl")


def run(args: argparse.Namespace, settings: TaskSettings, score_fn: ScoreFn | None = None) -> dict:
    seed_everything(settings.seed)
    records = list(read_jsonl(args.generations))
    if not records:
        raise SystemExit(f"{args.generations}: no generations (run the generate step first)")
    rng = random.Random(settings.seed)
    candidates: list[Pair] = []
    for r in records:
        candidates += candidate_pairs(r["id"], r["continuations"], args.max_pairs_per_context, rng)
    if score_fn is None:
        score_fn = load_scorer(settings, args.scorer)
    cfg = filter_config(args)
    t0 = time.time()
    result = apply_filters(candidates, score_fn, cfg)
    negatives_path, scored_path = side_paths(args.output)
    write_jsonl(args.output, (p.to_dict() for p in result.kept))
    write_jsonl(negatives_path, (p.to_dict() for p in result.negatives))
    # Everything that reached the classifier, with both scores: for picking a threshold.
    write_jsonl(scored_path, (p.to_dict() for p in result.scored))
    summary = {
        "counts": result.counts,
        "negatives": len(result.negatives),
        "contexts": len(records),
        "seconds": round(time.time() - t0, 1),
        "files": {"kept": str(args.output), "negatives": str(negatives_path), "scored": str(scored_path)},
        "settings": {**vars(cfg), "max_pairs_per_context": args.max_pairs_per_context, "scorer": args.scorer},
        "seed": settings.seed,
    }
    write_summary(args.output, "filter", **summary)
    c = result.counts
    print("filter: " + ", ".join(f"{k} {v}" for k, v in c.items()) + f"; negatives {len(result.negatives)}")
    return summary
