"""Step 1, ``contexts``: short prefixes whose continuations will be paraphrase candidates.

Either sampled from GPT-2 itself (news-style datelines or question openers,
completed to one sentence with top-p 0.9, temperature 1.0: the model supplies
its own domain), or read from a file: plain text (one per line) or a Quora-format
TSV (its ``sentence1`` and ``sentence2`` questions).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from cli.validation import positive_int
from decoding.inference import prepare_for_inference
from distillation.records import write_jsonl, write_summary
from distillation.sampling import SamplingConfig, add_sampling_args, sample_sentences, sampling_config
from engine.data import read_tsv
from engine.rng import seed_everything
from tasks.common import build_body, pick_device
from tasks.settings import TaskSettings

DEFAULTS = {"batch_size": 32}

SEEDS = {
    "news": ["WASHINGTON (AP) —", "LONDON (Reuters) -", "NEW YORK (CNN) —", "PARIS (AFP) -", "TOKYO (AP) —",
             "BERLIN (Reuters) -", "SYDNEY (AP) —", "CHICAGO (AP) —", "The company said on Tuesday that",
             "Officials said"],
    "question": ["Q:", "Question:", "What is", "How do I", "Why do", "What are the best ways to", "Is it true that",
                 "Which is better,"],
}  # fmt: skip


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", required=True, help="JSON lines: {'id', 'text'}")
    p.add_argument("--num_contexts", type=positive_int, default=1000)
    p.add_argument("--style", choices=sorted(SEEDS), default="news")
    p.add_argument("--from_file", default=None,
                   help="read contexts instead of sampling: a .txt (one per line) or a Quora-format TSV")
    add_sampling_args(p, temperature=1.0, no_repeat_ngram_size=None)


def read_contexts(path: str | Path, limit: int = 0) -> list[str]:
    """Distinct non-empty contexts of a text file, or the questions of a Quora-format TSV."""
    path = Path(path)
    if not path.exists():
        raise SystemExit(f"{path}: contexts file does not exist")
    first = path.open(encoding="utf-8").readline()
    if "sentence1" in [h.strip() for h in first.split("\t")]:
        rows = read_tsv(path, required=["sentence1", "sentence2"])
        texts = [t for r in rows for t in (r["sentence1"], r["sentence2"])]
    else:
        texts = path.read_text(encoding="utf-8").splitlines()
    texts = list(dict.fromkeys(" ".join(t.split()) for t in texts if t.strip()))
    return texts[:limit] if limit else texts


def sample_contexts(model, tokenizer, style: str, n: int, cfg: SamplingConfig, batch_size: int, seed: int,
                    progress: bool = True) -> tuple[list[str], int]:
    """``n`` distinct one-sentence contexts (seed text + sampled sentence) and the
    number of samples drawn; gives up after 20 * n draws (a model that never ends a sentence)."""
    seeds = SEEDS[style]
    device = next(model.parameters()).device
    out: dict[str, None] = {}
    drawn, batch = 0, 0
    bar = tqdm(total=n, desc="contexts", disable=not progress)
    while len(out) < n and drawn < 20 * n:
        prompts = [seeds[(drawn + i) % len(seeds)] for i in range(batch_size)]
        gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + batch)
        with torch.no_grad():
            sents = sample_sentences(model, tokenizer, prompts, 1, cfg, gen)
        for prompt, (s,) in zip(prompts, sents):
            if s and len(out) < n:
                text = f"{prompt} {s}"
                if text not in out:
                    out[text] = None
                    bar.update(1)
        drawn += batch_size
        batch += 1
    bar.close()
    return list(out), drawn


def run(args: argparse.Namespace, settings: TaskSettings, model: Any = None, tokenizer: Any = None) -> dict:
    seed_everything(settings.seed)
    cfg = sampling_config(args)
    if args.from_file:
        texts, drawn, source = read_contexts(args.from_file, args.num_contexts), 0, args.from_file
    else:
        if model is None:
            model, tokenizer = build_body(settings.model)
        fast = prepare_for_inference(model.to(pick_device(settings.run.use_gpu, settings.run.device)).eval())
        texts, drawn = sample_contexts(fast, tokenizer, args.style, args.num_contexts, cfg, settings.data.batch_size,
                                       settings.seed, settings.train.progress)
        source = f"sampled:{args.style}"
    write_jsonl(args.output, ({"id": f"ctx-{i:06d}", "text": t} for i, t in enumerate(texts)))
    summary = {"contexts": len(texts), "requested": args.num_contexts, "samples_drawn": drawn, "source": source,
               "settings": {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens,
                            "model_size": settings.model.model_size, "random_init": settings.model.random_init},
               "seed": settings.seed}
    write_summary(args.output, "contexts", **summary)
    if not texts:
        raise SystemExit("no contexts: the model never finished a sentence; raise --max_new_tokens")
    return summary
