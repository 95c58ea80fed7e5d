"""Step 2, ``generate``: many sampled one-sentence continuations per context.

Continuations of one context are constrained by it, so some of them say the
same thing in different words: the raw material of the paraphrase pairs.

Resumable: the output is JSON lines, one record per context, appended and
flushed after each batch; a rerun skips the contexts already written. Batches
are cut by position in the context list and each batch's sampler is seeded from
``--seed`` and that position, so an interrupted and resumed run writes the same
continuations as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from cli.validation import positive_int
from distillation.records import append_jsonl, read_jsonl, write_summary
from distillation.sampling import add_sampling_args, sample_sentences, sampling_config
from engine.rng import seed_everything
from tasks.common import build_body, pick_device
from tasks.settings import TaskSettings


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--contexts", required=True, help="JSON lines from the contexts step ({'id', 'text'})")
    p.add_argument("--output", required=True, help="JSON lines, appended: {'id', 'context', 'continuations'}")
    p.add_argument("--num_samples", type=positive_int, default=100, help="continuations per context")
    p.add_argument("--contexts_per_batch", type=positive_int, default=1,
                   help="contexts decoded together (rows per batch = this x num_samples)")
    add_sampling_args(p, temperature=0.5, no_repeat_ngram_size=3)
    p.add_argument("--prompt_template", default="{context}",
                   help="how a context becomes the prompt, e.g. '{context} In other words,'")


def batch_generator(seed: int, position: int, device: torch.device) -> torch.Generator:
    """The sampler of the batch starting at ``position``: same seed, same batch, same text."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + position)


def pending_batches(contexts: list[dict], done: set[str], per_batch: int) -> list[tuple[int, list[dict]]]:
    """(position, contexts not yet written) per fixed batch of the context list."""
    out = []
    for start in range(0, len(contexts), per_batch):
        todo = [c for c in contexts[start : start + per_batch] if c["id"] not in done]
        if todo:
            out.append((start, todo))
    return out


def run(args: argparse.Namespace, settings: TaskSettings, model: Any = None, tokenizer: Any = None) -> dict:
    seed_everything(settings.seed)
    contexts = list(read_jsonl(args.contexts))
    if not contexts:
        raise SystemExit(f"{args.contexts}: no contexts (run the contexts step first)")
    if settings.data.limit:
        contexts = contexts[: settings.data.limit]
    done = {r["id"] for r in read_jsonl(args.output)}
    batches = pending_batches(contexts, done, args.contexts_per_batch)
    device = pick_device(settings.run.use_gpu, settings.run.device)
    if batches and model is None:
        model, tokenizer = build_body(settings.model)
    if model is not None:
        model.to(device).eval()
    cfg = sampling_config(args)
    already = sum(c["id"] in done for c in contexts)
    bar = tqdm(total=len(contexts), initial=already, desc="generate", disable=not settings.train.progress)
    t0 = time.time()
    for start, todo in batches:
        prompts = [args.prompt_template.format(context=c["text"]) for c in todo]
        with torch.no_grad():
            sents = sample_sentences(model, tokenizer, prompts, args.num_samples, cfg,
                                     batch_generator(settings.seed, start, device))
        append_jsonl(args.output, ({"id": c["id"], "context": c["text"], "continuations": s}
                                   for c, s in zip(todo, sents)))
        bar.update(len(todo))
    bar.close()
    records = list(read_jsonl(args.output))
    n_cont = sum(len(r["continuations"]) for r in records)
    n_sent = sum(1 for r in records for s in r["continuations"] if s)
    summary = {
        "contexts": len(records), "skipped_already_done": already, "generated_now": len(contexts) - already,
        "continuations": n_cont, "complete_sentences": n_sent,
        "distinct_sentences": sum(len(set(filter(None, r["continuations"]))) for r in records),
        "seconds": round(time.time() - t0, 1),
        "settings": {**vars(cfg).copy(), "num_samples": args.num_samples, "model_size": settings.model.model_size,
                     "random_init": settings.model.random_init, "prompt_template": args.prompt_template},
        "seed": settings.seed,
    }
    write_summary(Path(args.output), "generate", **summary)
    return summary
