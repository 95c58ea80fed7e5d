"""Does pretraining transfer? Sonnet fine-tuning from a pretrained small model against the same
architecture from random initialisation: same flags, same steps, same seeds.

    python pretrain.py --corpus ../shared/data/tinyshakespeare.txt --model_size <folder> --random_init ...
    python benchmarks/sonnet_pretraining.py --pretrained runs/pretrain/tinyshakespeare/<run>/model.pt
    python benchmarks/sonnet_pretraining.py --pretrained model.pt --seeds 3 --epochs 5 --lr 5e-4 -- --decoding greedy

For each seed and each start (``pretrained``: the weights of ``--pretrained``, a ``model.pt``
saved by ``pretrain.py``; ``random``: its architecture with fresh weights, ``--random_init``) it
drives ``sonnet_generation.main`` with the same flags, printed: no early stopping and no best-epoch
reload (``--patience 0 --save_top_k 0``), so both train exactly ``--epochs`` epochs and are
judged on their last weights, with linear warm-up and decay and clipping at norm 1 (given
explicitly: the task's defaults are the course starter's constant lr without clipping).
Reported on the dev sonnets, mean ± std over the seeds: chrF of the generated sonnets,
held-out perplexity of the true sonnets, and the form of the generated ones (lines, syllables
per line, rhyme adherence). Flags after ``--`` go to every run. Prints a
Markdown table and writes ``<out>/results.json``; each run's folder is ``<out>/<start>-seed<N>``.
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
from experiments.launch import sonnet_run_flags  # noqa: E402
from experiments.tables import mean_std_table  # noqa: E402

STARTS = ("pretrained", "random")
# (label, key in a run's summary, format): the table's columns
COLUMNS = (("dev chrF", "dev_chrf", ".2f"), ("dev perplexity", "dev_perplexity", ".1f"),
           ("lines", "mean_lines", ".2f"), ("mean abs(syl - 10)", "mean_syllable_error", ".2f"),
           ("rhyme adherence", "rhyme_adherence", ".2f"))


def run_flags(args: argparse.Namespace, start: str, seed: int) -> list[str]:
    """``sonnet_generation.py`` flags of one run."""
    data = Path(args.data)
    folder = Path(args.out) / f"{start}-seed{seed}"
    return [
        "--checkpoint", args.pretrained, *(["--random_init"] if start == "random" else []),
        "--seed", str(seed), "--epochs", str(args.epochs), "--lr", str(args.lr), "--batch_size", str(args.batch_size),
        "--limit", str(args.limit), "--max_new_tokens", str(args.max_new_tokens),
        "--scheduler", "linear", "--warmup_ratio", "0.1", "--max_grad_norm", "1",
        "--patience", "0", "--save_top_k", "0", "--no_progress", "--overwrite",
        *sonnet_run_flags(data, folder), *args.extra,
    ]


def summary(result: dict[str, Any]) -> dict[str, float]:
    """The numbers of one run that the table reports."""
    return {"dev_chrf": result["dev_chrf"], "dev_loss": result["dev_loss"], "dev_perplexity": result["dev_perplexity"],
            **result["form"]["dev"]}


def table(runs: dict[str, list[dict[str, float]]]) -> str:
    """A Markdown table, one row per start, mean ± std over its runs."""
    return mean_std_table(runs, COLUMNS, heads=("start", "seeds"))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained", required=True, help="a model saved by pretrain.py (<run>/model.pt)")
    parser.add_argument("--seeds", type=int, default=3, help="runs per start, seeds 11711, 11712, ...")
    parser.add_argument("--first_seed", type=int, default=11711)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=5e-4, help="one learning rate for both starts")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--limit", type=int, default=0, help="sonnets per split (0: all)")
    parser.add_argument("--max_new_tokens", type=int, default=192)
    parser.add_argument("--data", default="data", help="folder with the course's sonnet files")
    parser.add_argument("--out", default="runs/benchmarks/sonnet_pretraining")
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.extra = extra
    if args.seeds < 1 or not Path(args.pretrained).is_file():
        parser.error(f"need --seeds >= 1 and an existing --pretrained model file (got {args.seeds}, {args.pretrained})")

    runs: dict[str, list[dict[str, float]]] = {s: [] for s in STARTS}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for start in STARTS:
            flags = run_flags(args, start, seed)
            print("python sonnet_generation.py " + " ".join(flags), flush=True)
            t0 = time.perf_counter()
            row = summary(sonnet_generation.main(flags))
            runs[start].append({**row, "seed": seed, "seconds": round(time.perf_counter() - t0, 1)})
    text = table(runs)
    print("\n" + text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"pretrained": args.pretrained, "flags": vars(args), "runs": runs,
                                                  "table": text}, indent=2) + "\n")
    return {"runs": runs, "table": text}


if __name__ == "__main__":
    main()
