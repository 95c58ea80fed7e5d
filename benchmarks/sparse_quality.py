"""Sparse attention, time against quality: fine-tune the same starting model on the sonnets
under each attention pattern and report time per epoch beside dev perplexity and dev chrF
(the handout's "time-vs-quality" study; ``benchmarks/sparse_attention.py`` measures the
kernels alone).

Every pattern starts from the same weights (patterns change only which keys a query sees,
never the weights), trains on the same batches in the same order (one seed), and is scored
the same way: perplexity of the held-out dev sonnets (token-weighted, EOS included, as the
fine-tuning loss counts) and corpus chrF of the dev prompts completed with one decoding
(greedy by default, stopping at 14 lines). Times are wall clock on this machine after one
untimed warm-up step, so compare rows of one run, not runs of different days.

    python benchmarks/sparse_quality.py --model runs/pretrain/shakespeare/model.pt --epochs 3
    python benchmarks/sparse_quality.py --random_init tiny --epochs 1 --limit 8 --window 32   # smoke run
    python benchmarks/sparse_quality.py --model MODEL --patterns dense,window --window 64 --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from config import ATTENTION_PATTERNS, get_config  # noqa: E402
from models.generation import LineStop, generate, trim  # noqa: E402
from models.gpt2 import GPT2Model  # noqa: E402
from models.heads import SonnetGPT  # noqa: E402
from models.loading import load_tokenizer  # noqa: E402
from optimizer import AdamW  # noqa: E402
from training.checkpoints import load_any_model  # noqa: E402
from training.course_data import read_sonnets  # noqa: E402
from training.data import PadCollator, count_lm_targets, encode  # noqa: E402
from training.metrics import chrf  # noqa: E402

DATA = Path(__file__).resolve().parent.parent / "data"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="starting model: saved .pt, Trainer checkpoint, Hugging Face folder or hub id")
    src.add_argument("--random_init", metavar="SIZE", help="a named size with random weights (smoke runs)")
    p.add_argument("--patterns", default=",".join(ATTENTION_PATTERNS), help="comma-separated attention patterns")
    p.add_argument("--window", type=int, default=64, help="attn_window (window, strided)")
    p.add_argument("--block", type=int, default=64, help="attn_block (block_global)")
    p.add_argument("--num_global", type=int, default=4, help="attn_num_global (block_global)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--limit", type=int, default=0, help="first N training sonnets and dev prompts (0: all)")
    p.add_argument("--max_length", type=int, default=256, help="training tokens per sonnet")
    p.add_argument("--max_new_tokens", type=int, default=160)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data_dir", default=str(DATA))
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    args.patterns = [x.strip() for x in args.patterns.split(",") if x.strip()]
    bad = [x for x in args.patterns if x not in ATTENTION_PATTERNS]
    if bad or not args.patterns:
        p.error(f"--patterns: unknown {bad}; choose from {', '.join(ATTENTION_PATTERNS)}")
    if min(args.window, args.block, args.epochs, args.batch_size, args.max_length, args.max_new_tokens) < 1:
        p.error("--window, --block, --epochs, --batch_size, --max_length and --max_new_tokens must be >= 1")
    return args


def batches(rows: list[list[int]], batch_size: int, collate: PadCollator, order: torch.Tensor | None = None):
    order = order if order is not None else torch.arange(len(rows))
    for i in range(0, len(rows), batch_size):
        yield collate([{"input_ids": rows[j]} for j in order[i : i + batch_size].tolist()])


@torch.no_grad()
def perplexity(model: SonnetGPT, rows: list[list[int]], collate: PadCollator) -> float:
    """exp of the token-weighted mean loss over ``rows``."""
    model.eval()
    total, count = 0.0, 0
    for b in batches(rows, 8, collate):
        n = int(count_lm_targets(b))
        total += float(model.loss(b["input_ids"], b["attention_mask"])) * n
        count += n
    return math.exp(total / max(count, 1))


@torch.no_grad()
def dev_chrf(model: SonnetGPT, tokenizer: Any, prompts: list[str], refs: list[str], max_new_tokens: int) -> float:
    model.eval()
    eos = tokenizer.eos_token_id
    left = PadCollator(tokenizer.pad_token_id, padding_side="left")
    ids = encode(tokenizer, prompts, model.gpt.config.max_position_embeddings - max_new_tokens, "prompts", False)
    texts = []
    for b in batches(ids, 8, left):
        x, mask = b["input_ids"], b["attention_mask"]
        out = generate(model.gpt, x, mask, max_new_tokens=max_new_tokens, eos_token_id=eos,
                       stop=LineStop(tokenizer, 14))
        n_pad = (mask == 0).sum(-1).tolist()
        texts += [tokenizer.decode(trim(out[i], x.size(1), n_pad[i], eos)).strip() for i in range(out.size(0))]
    return chrf(texts, refs)


def run_pattern(pattern: str, start: GPT2Model, data: dict[str, Any], tokenizer: Any,
                args: argparse.Namespace) -> dict[str, Any]:
    """Fine-tune a copy of ``start`` under ``pattern``; its row of the table."""
    cfg = dataclasses.replace(start.config, attn_pattern=pattern, attn_window=args.window, attn_block=args.block,
                              attn_num_global=args.num_global)
    torch.manual_seed(args.seed)
    gpt = GPT2Model(cfg)
    gpt.load_state_dict(start.state_dict())
    model = SonnetGPT(gpt)
    opt = AdamW(model.parameters(), lr=args.lr)
    collate = PadCollator(tokenizer.pad_token_id)
    order_gen = torch.Generator().manual_seed(args.seed)
    warm = next(batches(data["train"], args.batch_size, collate))  # untimed: first-call allocations
    model.loss(warm["input_ids"], warm["attention_mask"]).backward()
    opt.zero_grad(set_to_none=True)
    epoch_times = []
    for _ in range(args.epochs):
        model.train()
        t0 = time.perf_counter()
        for b in batches(data["train"], args.batch_size, collate, torch.randperm(len(data["train"]),
                                                                                 generator=order_gen)):
            loss = model.loss(b["input_ids"], b["attention_mask"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        epoch_times.append(time.perf_counter() - t0)
    return {"pattern": pattern, "sec_per_epoch": sum(epoch_times) / len(epoch_times),
            "dev_ppl": perplexity(model, data["dev"], collate),
            "dev_chrf": dev_chrf(model, tokenizer, data["prompts"], data["refs"], args.max_new_tokens)}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    start = load_any_model(args.model) if args.model else GPT2Model(get_config(args.random_init))
    tokenizer = load_tokenizer(verbose=False)
    d = Path(args.data_dir)
    eos = tokenizer.eos_token
    train = [s.text + eos for s in read_sonnets(d / "sonnets.txt", args.limit)]
    refs = [s.text for s in read_sonnets(d / "TRUE_sonnets_held_out_dev.txt", args.limit)]
    prompts = [s.text for s in read_sonnets(d / "sonnets_held_out_dev.txt", args.limit)]
    n_ctx = start.config.max_position_embeddings
    data = {"train": encode(tokenizer, train, min(args.max_length, n_ctx), "train", False),
            "dev": encode(tokenizer, [r + eos for r in refs], n_ctx, "dev", False), "prompts": prompts, "refs": refs}
    rows = [run_pattern(p, start, data, tokenizer, args) for p in args.patterns]
    print(f"{'pattern':<14}{'s/epoch':>9}{'dev ppl':>10}{'dev chrF':>10}")
    for r in rows:
        print(f"{r['pattern']:<14}{r['sec_per_epoch']:>9.2f}{r['dev_ppl']:>10.2f}{r['dev_chrf']:>10.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items()}, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
