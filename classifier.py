"""Sentence classification with GPT-2: sentiment (SST, CFIMDB) and grammatical acceptability (CoLA).

SST has 5 classes, CFIMDB and CoLA 2.

    python classifier.py --fine-tune-mode last-linear-layer   # GPT-2 frozen, linear head (lr 1e-3)
    python classifier.py --fine-tune-mode full-model          # everything trains (lr 1e-3, the starter's)
    python classifier.py --fine-tune-mode full-model --recipe recommended   # lr 1e-5, clipping at norm 1
    python classifier.py --fine-tune-mode lora                # LoRA adapters + head (lr 3e-4)

    python classifier.py --dataset cola --fine-tune-mode lora # CoLA: accuracy and Matthews correlation
    python classifier.py --rdrop_alpha 1 --pooling mean       # a training objective, mean pooling

As the course starter does, trains and evaluates on SST and then on CFIMDB (``--dataset both``,
or one of them with ``--dataset``), and writes ``predictions/<mode>-<sst|cfimdb>-<dev|test>-out.csv``
in the starter's format; ``--dataset cola`` writes ``predictions/<mode>-cola-dev-out.csv`` (CoLA
has no public test set). A run writes them into its own folder (``<run>/predictions/``) and copies
them to ``predictions/`` only when complete (no ``--limit``) or told where (``tasks.publish``).
The defaults are the starter's (``--recipe starter``): lr 1e-3 in
both of its modes (its help text's 1e-5 for fine-tuning is not what it runs), no gradient
clipping, CFIMDB at batch 8 whatever ``--batch_size`` says (``--cfimdb_batch_size``);
``--recipe recommended`` gives each mode its own lr (full-model 1e-5) and clips at norm 1.
The training objectives (R-Drop, SimCSE, SMART) and ``--pooling`` are
``methods.objectives``' (their flags: ``cli.common``). This file only parses the flags
into ``tasks.sentiment.SentimentSettings``: the task is ``tasks.sentiment``, the modes and their
default learning rates ``methods.fine_tune``, the shared flags ``cli/``, the loop, checkpoints
and data reading ``engine/``.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any

from cli.common import add_classification_args, objective_settings_from_args, run_main, task_settings_from_args
from cli.defaults import DefaultsHelpFormatter, add_recipe_arg, parse_with_recipe
from cli.validation import positive_int
from methods.fine_tune import default_lr, mode_names, modes_help
from tasks.sentiment import DATASETS, SPLITS, STARTER_DATASETS, SentimentSettings, default_path, run

STARTER_LR = 1e-3  # the starter's --lr default, in both of its modes
STARTER_MODES = ("last-linear-layer", "full-model")
STARTER_CFIMDB_BATCH = 8  # the starter trains and predicts CFIMDB at this batch size, whatever --batch_size says
RECOMMENDED = {"max_grad_norm": 1.0}  # and each mode's own lr (methods.fine_tune)
LR_HELP = (f"default: {STARTER_LR:g}, the starter's, for {' and '.join(STARTER_MODES)} (the starter's help "
           "text says 1e-5 for fine-tuning, but runs 1e-3); lora 3e-4, prefix 5e-4, reft 1e-3; --recipe recommended: "
           "each mode's own, full-model 1e-5")


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--fine-tune-mode", "--fine_tune_mode", dest="fine_tune_mode", choices=mode_names(),
                        default="last-linear-layer", help=modes_help(mode_names()))
    parser.add_argument("--dataset", choices=(*DATASETS, "both"), default="both",
                        help="both: sst then cfimdb, as the course starter")
    for ds in DATASETS:
        for split in SPLITS[ds]:
            parser.add_argument(f"--{ds}_{split}", type=str, default=default_path(ds, split))
    parser.add_argument("--predictions_dir", type=str, default="predictions")
    parser.add_argument("--cfimdb_batch_size", type=positive_int, default=STARTER_CFIMDB_BATCH,
                        help="CFIMDB's batch size instead of --batch_size, as in the starter (its long reviews "
                             "fit a 12 GB GPU at 8)")
    add_classification_args(parser, batch_size=8, lr=None, epochs=10, hidden_dropout_prob=0.3, max_grad_norm=0.0,
                            lr_help=LR_HELP)
    add_recipe_arg(parser, RECOMMENDED, "each mode's own --lr (full-model 1e-5)")
    args = parse_with_recipe(parser, argv, RECOMMENDED)
    if args.contrastive_supervised:
        parser.error("--contrastive_supervised needs sentence pairs (paraphrase_detection.py); for single "
                     "sentences drop it to use unsupervised SimCSE (two dropout views)")
    if args.lr is None:
        starter = args.recipe == "starter" and args.fine_tune_mode in STARTER_MODES
        args.lr = STARTER_LR if starter else default_lr(args.fine_tune_mode)
        if starter and args.lr != default_lr(args.fine_tune_mode):
            print(f"{args.fine_tune_mode} at lr {args.lr:g}, the starter's default; --recipe recommended "
                  f"or --lr {default_lr(args.fine_tune_mode):g} for the rate meant for fine-tuning")
    return args


def settings_from_args(args: argparse.Namespace) -> SentimentSettings:
    """The run's typed settings from the parsed flags (``get_args``)."""
    files = {(ds, split): getattr(args, f"{ds}_{split}") for ds in DATASETS for split in SPLITS[ds]}
    return task_settings_from_args(args, SentimentSettings, objective=objective_settings_from_args(args),
                                   dataset=args.dataset, files=files, predictions_dir=args.predictions_dir)


def dataset_settings(settings: SentimentSettings, dataset: str, cfimdb_batch_size: int) -> SentimentSettings:
    """The settings ``dataset`` runs with: CFIMDB's batch is ``cfimdb_batch_size``, as the starter
    fixes it (its reviews are long), so a ``--batch_size`` chosen for SST cannot run it out of memory."""
    if dataset != "cfimdb" or settings.data.batch_size == cfimdb_batch_size:
        return settings
    print(f"cfimdb: batch {cfimdb_batch_size} (--cfimdb_batch_size, as the starter), not --batch_size "
          f"{settings.data.batch_size}")
    return replace(settings, data=replace(settings.data, batch_size=cfimdb_batch_size))


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    args = get_args(argv)
    settings = settings_from_args(args)
    datasets = STARTER_DATASETS if settings.dataset == "both" else (settings.dataset,)
    return {ds: run(dataset_settings(settings, ds, args.cfimdb_batch_size), ds) for ds in datasets}


if __name__ == "__main__":
    run_main(main)
