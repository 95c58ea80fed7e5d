"""Step 5, ``self-distill``: the student paraphrases, the filters judge.

A round: GPT-2 is fine-tuned as a paraphrase generator on the current pairs
(prompt ``Sentence: s1\\nParaphrase:``, target `` s2``, both directions, loss on
the target only); it then writes ``--num_paraphrases`` (10) sampled paraphrases
of every sentence of those pairs; the same filters as the ``filter`` step run
on each (sentence, paraphrase), and per sentence only the lowest-ROUGE-L
survivor is kept (the dedup filter does exactly that, as all candidates of a
sentence share it). The survivors are the next round's pairs. One round by default.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from cli.validation import positive_int
from distillation.filter_step import add_filter_args, filter_config
from distillation.filters import Pair, apply_filters
from distillation.records import read_jsonl, write_jsonl, write_summary
from distillation.sampling import SamplingConfig, add_sampling_args, sample_sentences, sampling_config
from distillation.scorer import add_scorer_args, load_scorer
from engine.data import PadCollator, make_loader
from engine.rng import seed_everything
from engine.trainer import Trainer
from methods.restore import save_model
from models.gpt2 import GPT2Model
from modules.losses import lm_loss
from tasks.common import build_body, pick_device, train_config
from tasks.settings import TaskSettings

DEFAULTS = {"lr": 1.5e-5, "epochs": 2, "batch_size": 8, "hidden_dropout_prob": 0.1}
PROMPT = "Sentence: {s}\nParaphrase:"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pairs", required=True, help="kept pairs from the filter step (JSON lines)")
    p.add_argument("--output", required=True, help="the last round's pairs (JSON lines); round k also "
                                                   "writes <name>.round<k>.jsonl")
    p.add_argument("--rounds", type=positive_int, default=1)
    p.add_argument("--num_paraphrases", type=positive_int, default=10)
    p.add_argument("--sources_per_batch", type=positive_int, default=4, help="sentences decoded together")
    add_sampling_args(p, temperature=1.0, no_repeat_ngram_size=0)
    add_filter_args(p)
    add_scorer_args(p)


def generator_features(pairs: list[tuple[str, str]], tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
    """Prompt + target + EOS; labels -100 on the prompt so only the paraphrase is learned."""
    feats = []
    for s1, s2 in pairs:
        for a, b in ((s1, s2), (s2, s1)):
            prompt = tokenizer.encode(PROMPT.format(s=a))
            target = tokenizer.encode(" " + b) + [tokenizer.eos_token_id]
            ids = (prompt + target)[:max_length]
            feats.append({"input_ids": ids, "labels": ([-100] * len(prompt) + target)[:max_length]})
    return feats


def train_generator(gpt: GPT2Model, tokenizer: Any, pairs: list[tuple[str, str]], settings: TaskSettings,
                    out_dir: Path, device: torch.device) -> dict:
    """Fine-tune ``gpt`` on the pairs as a paraphrase generator, with the step's engine flags."""
    max_len = settings.data.max_length or gpt.config.max_position_embeddings
    feats = generator_features(pairs, tokenizer, max_len)
    loader = make_loader(feats, PadCollator(tokenizer.pad_token_id, {"labels": -100}), settings.data.batch_size,
                         shuffle=True)

    def loss_fn(m, batch: dict[str, Any]) -> torch.Tensor:
        h = m(batch["input_ids"], batch["attention_mask"])["last_hidden_state"]  # (B, T, d)
        return lm_loss(h[:, :-1], m.wte.weight, batch["labels"][:, 1:])

    cfg = train_config(settings, device, out_dir, save_top_k=0)
    trainer = Trainer(gpt, loss_fn, loader, None, cfg, extra={"task": "paraphrase-generator"},
                      count_fn=lambda b: (b["labels"][:, 1:] != -100).sum())  # targets, for --grad_accum
    trainer.fit()
    return {"examples": len(feats), "epochs": settings.train.epochs}


def paraphrase_candidates(gpt: GPT2Model, tokenizer: Any, sources: list[str], cfg: SamplingConfig, *,
                          num_paraphrases: int, sources_per_batch: int, seed: int, device: torch.device,
                          progress: bool = True) -> list[Pair]:
    """``num_paraphrases`` samples per source as (source, paraphrase) candidates; each batch of
    ``sources_per_batch`` sources has its own sampler, seeded from ``seed`` and its position."""
    cands: list[Pair] = []
    step = sources_per_batch
    for start in tqdm(range(0, len(sources), step), desc="paraphrase", disable=not progress):
        chunk = sources[start : start + step]
        gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + start)
        with torch.no_grad():
            outs = sample_sentences(gpt, tokenizer, [PROMPT.format(s=s) for s in chunk], num_paraphrases, cfg, gen)
        for i, (src, paras) in enumerate(zip(chunk, outs)):
            cands += [Pair(f"src-{start + i}", src, p) for p in dict.fromkeys(paras) if p and p != src]
    return cands


def run(args: argparse.Namespace, settings: TaskSettings) -> dict:
    seed_everything(settings.seed)
    device = pick_device(settings.run.use_gpu, settings.run.device)
    pairs = [(r["s1"], r["s2"]) for r in read_jsonl(args.pairs)]
    if not pairs:
        raise SystemExit(f"{args.pairs}: no pairs to start from (run the filter step first)")
    score_fn = load_scorer(settings, args.scorer)
    out = Path(args.output)
    work = Path(settings.run.output_dir or out.with_name(out.name.split(".")[0] + "-runs"))
    rounds = []
    t0 = time.time()
    for k in range(1, args.rounds + 1):
        gpt, tokenizer = build_body(settings.model, hidden_dropout_prob=settings.model.hidden_dropout_prob)
        gpt.to(device)
        train_info = train_generator(gpt, tokenizer, pairs, settings, work / f"round{k}", device)
        save_model(gpt, work / f"round{k}" / "generator.pt", task="paraphrase-generator", round=k)
        gpt.eval()
        sources = list(dict.fromkeys(s for p in pairs for s in p))
        if settings.data.limit:
            sources = sources[: settings.data.limit]
        cands = paraphrase_candidates(gpt, tokenizer, sources, sampling_config(args),
                                      num_paraphrases=args.num_paraphrases, sources_per_batch=args.sources_per_batch,
                                      seed=settings.seed, device=device, progress=settings.train.progress)
        result = apply_filters(cands, score_fn, filter_config(args))
        pairs = [(p.s1, p.s2) for p in result.kept]
        write_jsonl(out.with_name(f"{out.name.split('.')[0]}.round{k}.jsonl"), (p.to_dict() for p in result.kept))
        rounds.append({"round": k, "train": train_info, "sources": len(sources), "counts": result.counts,
                       "generator": str(work / f"round{k}" / "generator.pt")})
        print(f"self-distill round {k}: {len(sources)} sentences, " +
              ", ".join(f"{a} {b}" for a, b in result.counts.items()))
        if not pairs:
            break
    write_jsonl(out, ({"context_id": "self-distill", "s1": a, "s2": b} for a, b in pairs))
    summary = {"rounds": rounds, "pairs": len(pairs), "seconds": round(time.time() - t0, 1),
               "settings": {"num_paraphrases": args.num_paraphrases, "temperature": args.temperature,
                            "top_p": args.top_p, **vars(filter_config(args)), "scorer": args.scorer,
                            "model_size": settings.model.model_size, "random_init": settings.model.random_init},
               "seed": settings.seed}
    write_summary(out, "self-distill", **summary)
    return summary
