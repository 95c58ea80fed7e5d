"""Speculative greedy decoding against the target's own greedy decoding: tokens per second,
the draft's acceptance rate, and a check that the tokens are identical.

Run: ``python benchmarks/speculative_speed.py --target MODEL --draft MODEL [--ks 2 4 6]``
(models as ``generate.py --model`` takes them: a saved model, a checkpoint, a Hugging Face folder);
without ``--draft`` the draft is the target's first ``--draft_layers`` layers with its own head. With
``--random gpt2`` (a gpt2-shaped random target) only the step costs are printed: random drafts agree by chance.
``--draft_vocab N`` adds rows for the draft with its head cut to the N most frequent tokens of the
prompts file (``decoding.speculative.PrunedDraft``).
Prompts are lines of ``--prompts_file``; times are the best of ``--repeats`` passes over all prompts
after one warm-up pass, both models prepared by ``decoding.inference.prepare_for_inference``;
``--clock cpu --threads 1`` times this process's CPU time, which other jobs on a shared machine move far less.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.measure import CLOCK  # noqa: E402
from config import get_config  # noqa: E402
from decoding.inference import prepare_for_inference  # noqa: E402
from decoding.speculative import (  # noqa: E402
    PrunedDraft,
    SpeculativeStats,
    frequent_tokens,
    speculative_generate,
    truncate_cache,
)
from models.generation import generate  # noqa: E402
from models.generation_config import GenerationConfig  # noqa: E402
from models.gpt2 import GPT2Model  # noqa: E402
from models.loading import load_tokenizer  # noqa: E402
from tasks.restore import restore_task_model  # noqa: E402

# --clock cpu: this process's CPU time (1 thread: the time it would take alone, far less moved by other jobs
# on a shared machine), through the benchmarks' shared clock (benchmarks.measure.CLOCK), as bench.py sets it.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def best_time(fn, repeats: int) -> tuple[float, list[torch.Tensor]]:
    out = fn()  # warm-up: packs the decoding layouts
    times = []
    for _ in range(repeats):
        t = CLOCK[0]()
        out = fn()
        times.append(CLOCK[0]() - t)
    return min(times), out


def step_costs(target, draft, prompt_len: int, ks: list[int], repeats: int = 20) -> dict[str, float]:
    """ms of one target step, one draft step, and a target forward over k + 1 new positions."""

    def ms(model, new: int) -> float:
        cache = model.new_cache(1, prompt_len + new)
        ids = torch.randint(0, model.config.vocab_size, (1, prompt_len + new))
        with torch.no_grad():
            model(ids[:, :prompt_len], cache=cache)
            best = float("inf")
            for _ in range(repeats):
                truncate_cache(cache, prompt_len)
                t = CLOCK[0]()
                h = model(ids[:, prompt_len:], cache=cache)["last_hidden_state"][0]
                model.hidden_state_to_token(h)
                best = min(best, CLOCK[0]() - t)
        return best * 1e3

    costs = {"target step": ms(target, 1), "draft step": ms(draft, 1)}
    costs.update({f"target verify k={k}": ms(target, k + 1) for k in ks})
    return costs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default=None)
    p.add_argument("--draft", default=None)
    p.add_argument("--random", default=None, help="a named size: a random target")
    p.add_argument("--draft_layers", type=int, default=2, help="without --draft: the target's first N layers")
    p.add_argument("--draft_vocab", type=int, default=0,
                   help="also time the draft with its head cut to the N most frequent tokens of --prompts_file")
    p.add_argument("--prompts_file", default="data/tinyshakespeare.txt")
    p.add_argument("--num_prompts", type=int, default=8)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--ks", type=int, nargs="+", default=[2, 4, 6])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="cpu: process CPU time (with --threads 1)")
    args = p.parse_args()
    CLOCK[0] = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.random:
        target = GPT2Model(get_config(args.random)).eval()
    else:
        target = restore_task_model(args.target, "body").model.eval()
    if args.draft is None:  # the target's first layers, its final LayerNorm and head (no training)
        draft = copy.deepcopy(target)
        draft.h = draft.h[: args.draft_layers]
    else:
        draft = restore_task_model(args.draft, "body").model.eval()
    embedding = draft.wte.weight
    target, draft = prepare_for_inference(target), prepare_for_inference(draft)
    tokenizer = load_tokenizer(None, verbose=False)
    text = Path(args.prompts_file).read_text(encoding="utf-8")
    drafts = {"": draft}
    if args.draft_vocab:
        corpus = torch.tensor(tokenizer(text)["input_ids"])
        keep = frequent_tokens(corpus, args.draft_vocab, embedding.size(0))
        drafts[f", draft head {len(keep)} tokens"] = PrunedDraft(draft, embedding, keep)
    lines = [ln for ln in text.splitlines() if len(ln) > 20]
    prompts = [torch.tensor([tokenizer.encode(lines[i * len(lines) // args.num_prompts])])
               for i in range(args.num_prompts)]
    config = GenerationConfig(max_new_tokens=args.new_tokens)
    print(f"{args.clock} clock, threads {torch.get_num_threads()}, {len(prompts)} prompts, "
          f"{args.new_tokens} new tokens each, greedy")
    for label, d in drafts.items():
        for name, ms in step_costs(target, d, 16, args.ks).items():
            print(f"{name}{label if name.startswith('draft') else ''}: {ms:.2f} ms")
    if args.random:
        return
    tokens = len(prompts) * args.new_tokens
    base, expected = best_time(lambda: [generate(target, x, config=config) for x in prompts], args.repeats)
    print("| decoding | tokens/s | speed-up | acceptance rate | tokens per target forward | identical |")
    print("|---|---|---|---|---|---|")
    print(f"| target alone | {tokens / base:.1f} | 1.00x | | 1.00 | |")
    for (label, draft), k in itertools.product(drafts.items(), args.ks):
        stats = SpeculativeStats()

        def run(k: int = k, stats: SpeculativeStats = stats, draft=draft) -> list[torch.Tensor]:
            return [speculative_generate(target, draft, x, config=config, k=k, stats=stats) for x in prompts]

        t, out = best_time(run, args.repeats)
        same = all(torch.equal(a, b) for a, b in zip(out, expected))
        per = stats.generated / stats.target_forwards
        print(f"| speculative k={k}{label} | {tokens / t:.1f} | {base / t:.2f}x | {stats.acceptance_rate:.1%} "
              f"| {per:.2f} | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
