"""Sentence classification with GPT-2: sentiment (SST, CFIMDB) and grammatical acceptability (CoLA).

SST has 5 classes, CFIMDB and CoLA 2.

    python classifier.py --fine-tune-mode last-linear-layer   # GPT-2 frozen, linear head (lr 1e-3)
    python classifier.py --fine-tune-mode full-model          # everything trains (lr 1e-5)
    python classifier.py --fine-tune-mode lora                # LoRA adapters + head (lr 3e-4)

    python classifier.py --dataset cola --fine-tune-mode lora # CoLA: accuracy and Matthews correlation
    python classifier.py --rdrop_alpha 1 --pooling mean       # a training objective, mean pooling

As the course starter does, trains and evaluates on SST and then on CFIMDB (``--dataset both``,
or one of them with ``--dataset``), and writes ``predictions/<mode>-<sst|cfimdb>-<dev|test>-out.csv``
in the starter's format; ``--dataset cola`` writes ``predictions/<mode>-cola-dev-out.csv`` (CoLA
has no public test set). The training objectives (R-Drop, SimCSE, SMART) and ``--pooling`` are
``methods.objectives``' (their flags: ``cli.common``). This file only parses the flags
into ``tasks.sentiment.SentimentSettings``: the task is ``tasks.sentiment``, the modes and their
default learning rates ``methods.fine_tune``, the shared flags ``cli/``, the loop, checkpoints
and data reading ``engine/``.
"""

from __future__ import annotations

import argparse
from typing import Any

from cli.common import add_classification_args, objective_settings_from_args, run_main, task_settings_from_args
from methods.fine_tune import default_lr, mode_names, modes_help
from tasks.sentiment import DATASETS, SPLITS, STARTER_DATASETS, SentimentSettings, default_path, run


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fine-tune-mode", "--fine_tune_mode", dest="fine_tune_mode", choices=mode_names(),
                        default="last-linear-layer", help=modes_help(mode_names()))
    parser.add_argument("--dataset", choices=(*DATASETS, "both"), default="both",
                        help="both: sst then cfimdb, as the course starter")
    for ds in DATASETS:
        for split in SPLITS[ds]:
            parser.add_argument(f"--{ds}_{split}", type=str, default=default_path(ds, split))
    parser.add_argument("--predictions_dir", type=str, default="predictions")
    add_classification_args(parser, batch_size=8, lr=None, epochs=10, hidden_dropout_prob=0.3)
    args = parser.parse_args(argv)
    if args.contrastive_supervised:
        parser.error("--contrastive_supervised needs sentence pairs (paraphrase_detection.py); for single "
                     "sentences drop it to use unsupervised SimCSE (two dropout views)")
    if args.lr is None:
        args.lr = default_lr(args.fine_tune_mode)
    return args


def settings_from_args(args: argparse.Namespace) -> SentimentSettings:
    """The run's typed settings from the parsed flags (``get_args``)."""
    files = {(ds, split): getattr(args, f"{ds}_{split}") for ds in DATASETS for split in SPLITS[ds]}
    return task_settings_from_args(args, SentimentSettings, objective=objective_settings_from_args(args),
                                   dataset=args.dataset, files=files, predictions_dir=args.predictions_dir)


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    settings = settings_from_args(get_args(argv))
    datasets = STARTER_DATASETS if settings.dataset == "both" else (settings.dataset,)
    return {ds: run(settings, ds) for ds in datasets}


if __name__ == "__main__":
    run_main(main)
