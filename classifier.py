"""Sentiment classification on SST (5 classes) and CFIMDB (2 classes) with GPT-2.

    python classifier.py --fine-tune-mode last-linear-layer   # GPT-2 frozen, linear head (lr 1e-3)
    python classifier.py --fine-tune-mode full-model          # everything trains (lr 1e-5)
    python classifier.py --fine-tune-mode lora                # LoRA adapters + head (lr 3e-4)

As the course starter does, trains and evaluates on SST and then on CFIMDB (or one of
them with ``--dataset``), and writes ``predictions/<mode>-<sst|cfimdb>-<dev|test>-out.csv``
in the starter's format. This file only parses the flags: the task is
``tasks.sentiment``, the modes and their default learning rates ``models.fine_tune``,
the flags, loop, checkpoints and data reading ``training/``.
"""

from __future__ import annotations

import argparse
from typing import Any

from models.fine_tune import default_lr, mode_names, modes_help
from tasks.sentiment import DATASETS, run
from training.cli import add_common_args, run_main


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fine-tune-mode", "--fine_tune_mode", dest="fine_tune_mode", choices=mode_names(),
                        default="last-linear-layer", help=modes_help(mode_names()))
    parser.add_argument("--dataset", choices=(*DATASETS, "both"), default="both")
    for ds in DATASETS:
        for split, suffix in (("train", "train"), ("dev", "dev"), ("test", "test-student")):
            parser.add_argument(f"--{ds}_{split}", type=str, default=f"data/ids-{ds}-{suffix}.csv")
    parser.add_argument("--predictions_dir", type=str, default="predictions")
    add_common_args(parser, batch_size=8, lr=None, epochs=10, hidden_dropout_prob=0.3)
    args = parser.parse_args(argv)
    if args.lr is None:
        args.lr = default_lr(args.fine_tune_mode)
    return args


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    args = get_args(argv)
    datasets = DATASETS if args.dataset == "both" else (args.dataset,)
    return {ds: run(args, ds) for ds in datasets}


if __name__ == "__main__":
    run_main(main)
