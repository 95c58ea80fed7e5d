"""Greedy generation speed: our decoder with and without the KV cache, and
``transformers``' ``generate`` on the same weights.

Run: ``python benchmarks/generation_speed.py [--size tiny] [--batch_sizes 1 8] [--new_tokens 128]``
Prints generated tokens per second (batch * new tokens / wall time, best of
``--repeats`` runs after one warm-up) and checks the outputs agree.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from config import get_config  # noqa: E402
from decoding.inference import prepare_for_inference  # noqa: E402
from models.generation import generate  # noqa: E402
from models.gpt2 import GPT2Model  # noqa: E402


def same_weights(size: str, seed: int = 0):
    """A random ``transformers`` GPT-2 and ours loaded from it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = get_config(size)
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config(n_embd=c.hidden_size, n_layer=c.num_hidden_layers, n_head=c.num_attention_heads,
                                    n_positions=c.max_position_embeddings, vocab_size=c.vocab_size)).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = GPT2Model.from_pretrained(d).eval()
    return ours, hf


def timed(fn, repeats: int) -> tuple[float, torch.Tensor]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out  # the least disturbed run: other processes only ever add time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="tiny")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt_len", type=int, default=16)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ours, hf = same_weights(args.size)
    print(f"size={args.size} prompt={args.prompt_len} new={args.new_tokens} threads={torch.get_num_threads()}")
    print(f"{'batch':>5} {'ours+cache':>11} {'ours-nocache':>13} {'transformers':>13} {'speed-up':>9}  same tokens")
    for B in args.batch_sizes:
        print(bench_batch(ours, hf, B, args))


def bench_batch(ours, hf, B: int, args: argparse.Namespace) -> str:
    """One table row: tokens/s of the three decoders at batch size B (ours prepared for
    inference once, as a caller decoding many batches would)."""
    ids = torch.randint(0, ours.config.vocab_size, (B, args.prompt_len), generator=torch.Generator().manual_seed(B))
    n = B * args.new_tokens
    kw = dict(max_new_tokens=args.new_tokens)
    fast = prepare_for_inference(ours)
    t_c, a = timed(lambda: generate(fast, ids, **kw), args.repeats)
    t_u, b = timed(lambda: generate(fast, ids, use_cache=False, **kw), max(1, args.repeats // 2))
    with torch.no_grad():
        t_h, c = timed(lambda: hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, top_k=None,
                                           min_new_tokens=args.new_tokens, pad_token_id=0, **kw), args.repeats)
    same = torch.equal(a, b) and torch.equal(a, c)
    return f"{B:>5} {n / t_c:>9.0f}/s {n / t_u:>11.0f}/s {n / t_h:>11.0f}/s {t_h / t_c:>8.2f}x  {same}"

if __name__ == "__main__":
    main()
