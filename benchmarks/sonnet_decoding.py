"""Every decoding strategy on one fine-tuned sonnet model: dev chrF and the sonnet form.

    python benchmarks/sonnet_decoding.py --model runs/sonnet/<run>/sonnet-model.pt
    python benchmarks/sonnet_decoding.py --model sonnet-model.pt --seeds 3 --only greedy,beam,mbr-pool

The model completes the dev prompts (the first 3 lines of each held-out sonnet) under each
strategy of ``STRATEGIES`` (or ``--only``), with ``sonnet_generation.py``'s own decoding code
and flags: the stopping rule (EOS or ``--num_lines`` lines), the token budget and the left
padding are the task's. Reported per strategy: corpus chrF against the true dev sonnets
(sacrebleu, as the course grades), the form of the generated sonnets (``tasks.sonnet_form``:
lines, share with 14 lines, mean |syllables - 10| per line, rhyme adherence to ABAB CDCD EFEF
GG) and seconds. Strategies that sample run under ``--seeds`` seeds and report mean ± std;
deterministic ones run once. Prints a Markdown table; ``--json`` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sonnet_generation  # noqa: E402
from cli.sonnet import settings_from_args  # noqa: E402
from experiments.tables import mean_std, mean_std_table  # noqa: E402
from tasks.course_data import read_sonnets  # noqa: E402
from tasks.metrics import chrf  # noqa: E402
from tasks.restore import restore_task_model  # noqa: E402
from tasks.sonnet import complete_prompts  # noqa: E402
from tasks.sonnet_eval import PROMPT_LINES  # noqa: E402
from tasks.sonnet_form import summarize_form  # noqa: E402

# name -> sonnet_generation.py decoding flags
STRATEGIES: dict[str, list[str]] = {
    "greedy": ["--decoding", "greedy"],
    "greedy, no repeated 3-grams": ["--decoding", "greedy", "--no_repeat_ngram_size", "3"],
    "sample T=1.2 p=0.9 (default)": ["--decoding", "sample"],
    "sample T=0.8 p=0.9": ["--decoding", "sample", "--temperature", "0.8"],
    "beam 4, no repeated 3-grams": ["--decoding", "beam", "--num_beams", "4", "--no_repeat_ngram_size", "3"],
    "contrastive a=0.6 k=4": ["--decoding", "contrastive"],
    "contrastive, mean sim": ["--decoding", "contrastive", "--contrastive_mean_sim"],
    "contrastive, mean sim, dynamic a": ["--decoding", "contrastive", "--contrastive_mean_sim",
                                         "--contrastive_dynamic_alpha"],
    "mbr over 8 samples": ["--decoding", "mbr", "--mbr_candidates", "8"],
    "mbr over beam:4,sample:8,contrastive": ["--decoding", "mbr", "--mbr_pool", "beam:4,sample:8,contrastive"],
}
STOCHASTIC = ("sample", "mbr")
COLUMNS = (("dev chrF", "chrf", ".2f"), ("lines", "mean_lines", ".1f"), ("14 lines", "frac_14_lines", ".2f"),
           ("mean abs(syl - 10)", "mean_syllable_error", ".2f"), ("rhyme adherence", "rhyme_adherence", ".2f"),
           ("s", "seconds", ".0f"))


def evaluate(model: Any, tokenizer: Any, flags: list[str], prompts: list[str], refs: list[str],
             seed: int, common: list[str]) -> dict[str, float]:
    """chrF, form and seconds of one strategy under one seed."""
    decoding = settings_from_args(sonnet_generation.get_args([*common, *flags, "--seed", str(seed)])).decoding
    t0 = time.perf_counter()
    texts = complete_prompts(model, tokenizer, prompts, decoding.generation(tokenizer),
                             batch_size=decoding.batch_size, seed=seed, mbr_pool=decoding.pool)
    seconds = time.perf_counter() - t0
    return {"chrf": chrf(texts, refs), **summarize_form(texts, PROMPT_LINES).as_dict(), "seconds": seconds}


def table(rows: list[dict[str, Any]]) -> str:
    return mean_std_table({r["name"]: r["runs"] for r in rows}, COLUMNS, heads=("decoding", "runs"),
                          no_spread=("seconds",))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a fine-tuned sonnet model (sonnet-model.pt)")
    p.add_argument("--only", default=None, help="comma-separated strategy names or their first words "
                                                f"(default: all of {', '.join(STRATEGIES)})")
    p.add_argument("--seeds", type=int, default=3, help="seeds for the strategies that sample")
    p.add_argument("--first_seed", type=int, default=11711)
    p.add_argument("--max_new_tokens", type=int, default=192)
    p.add_argument("--limit", type=int, default=0, help="first N dev prompts (0: all)")
    p.add_argument("--data", default="data", help="folder with the course's sonnet files")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    if args.seeds < 1 or not Path(args.model).is_file():
        p.error(f"need --seeds >= 1 and an existing --model file (got {args.seeds}, {args.model})")
    chosen = list(STRATEGIES)
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        chosen = [n for n in STRATEGIES if any(n == w or n.startswith(w) for w in wanted)]
        if not chosen:
            p.error(f"--only {args.only!r} names no strategy; choose among {', '.join(STRATEGIES)}")
    data = Path(args.data)
    prompts = [s.text for s in read_sonnets(data / "sonnets_held_out_dev.txt", args.limit)]
    refs = [s.text for s in read_sonnets(data / "TRUE_sonnets_held_out_dev.txt", args.limit)]
    common = ["--max_new_tokens", str(args.max_new_tokens)]
    restored = restore_task_model(args.model, "sonnet", settings_from_args(sonnet_generation.get_args(common)))
    model, tokenizer = restored.model, restored.tokenizer
    model.eval()
    rows = []
    for name in chosen:
        flags = STRATEGIES[name]
        n = args.seeds if any(s in flags for s in STOCHASTIC) else 1
        runs = [evaluate(model, tokenizer, flags, prompts, refs, args.first_seed + i, common) for i in range(n)]
        rows.append({"name": name, "flags": " ".join(flags), "runs": runs})
        print(f"{name}: chrF {mean_std([r['chrf'] for r in runs])[0]:.2f} ({' '.join(flags)})", flush=True)
    text = table(rows)
    print("\n" + text)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "rows": rows, "table": text}, indent=2) + "\n")
    return {"rows": rows, "table": text}


if __name__ == "__main__":
    main()
