"""Offline learning check: a ``tiny`` random-init GPT-2 trained on SST and CFIMDB on the CPU
must beat the majority-class baseline on dev. No pretrained weights are needed, so this
runs anywhere; it shows that the engine, data path and head learn, not what GPT-2 can reach.

    python benchmarks/sentiment_offline.py                      # reads data/ (setup.sh)
    python benchmarks/sentiment_offline.py --data ../shared/data

It drives ``classifier.main`` with fixed flags (printed), then prints a table and writes
``runs/benchmarks/sentiment_offline/<dataset>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import classifier  # noqa: E402

# Random init needs a far larger step than fine-tuning pretrained weights (1e-5). --limit caps every
# split: it shortens training to minutes on a shared CPU while dev stays whole (SST dev 1,101, CFIMDB dev 245).
FLAGS = {
    "sst": ["--limit", "3000", "--epochs", "2", "--batch_size", "32", "--lr", "1e-3", "--max_length", "64"],
    "cfimdb": ["--limit", "800", "--epochs", "3", "--cfimdb_batch_size", "16", "--lr", "1e-3", "--max_length", "128"],
}
COMMON = ["--fine-tune-mode", "full-model", "--model_size", "tiny", "--random_init", "--scheduler", "linear",
          "--warmup_ratio", "0.1", "--hidden_dropout_prob", "0.1", "--weight_decay", "0.01", "--max_grad_norm", "1",
          "--no_progress"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="data", help="folder holding ids-{sst,cfimdb}-*.csv")
    parser.add_argument("--out", default="runs/benchmarks/sentiment_offline")
    parser.add_argument("--dataset", choices=(*FLAGS, "both"), default="both",
                        help="one dataset per process lets the two run side by side")
    args = parser.parse_args()

    results = {}
    for ds, flags in FLAGS.items():
        if args.dataset not in (ds, "both"):
            continue
        paths = [f"--{ds}_train", f"{args.data}/ids-{ds}-train.csv", f"--{ds}_dev", f"{args.data}/ids-{ds}-dev.csv",
                 f"--{ds}_test", f"{args.data}/ids-{ds}-test-student.csv"]
        argv = [*COMMON, *flags, "--dataset", ds, *paths,
                "--output_dir", f"{args.out}/{ds}", "--predictions_dir", f"{args.out}/predictions"]
        print("python classifier.py " + " ".join(argv), flush=True)
        t0 = time.perf_counter()
        metrics = classifier.main(argv)[ds]
        results[ds] = {**metrics, "seconds": round(time.perf_counter() - t0, 1), "flags": " ".join(flags)}

    print("\n| dataset | dev accuracy | dev macro-F1 | majority baseline | minutes |")
    print("| --- | --- | --- | --- | --- |")
    for ds, r in results.items():
        print(f"| {ds} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | {r['majority_baseline']:.3f} "
              f"| {r['seconds'] / 60:.1f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for ds, r in results.items():
        (out / f"{ds}.json").write_text(json.dumps(r, indent=2) + "\n")
    beaten = all(r["accuracy"] > r["majority_baseline"] for r in results.values())
    print("beats the majority-class baseline on dev" if beaten else "DOES NOT beat the majority-class baseline")
    sys.exit(0 if beaten else 1)


if __name__ == "__main__":
    main()
