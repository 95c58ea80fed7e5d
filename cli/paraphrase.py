"""The command line of a paraphrase run (``paraphrase_detection.py``) and its reading into
``tasks.paraphrase.ParaphraseSettings``; ``paraphrase_settings`` also serves a pipeline that
trains a paraphrase run with its own shared flags (``distillation.train``)."""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any

from cli.common import add_classification_args, objective_settings_from_args, task_settings_from_args
from cli.defaults import DefaultsHelpFormatter, add_recipe_arg, parse_with_recipe
from cli.validation import non_negative_int
from methods.fine_tune import mode_names, modes_help
from tasks.paraphrase import ParaphraseSettings
from tasks.settings import ClassificationSettings

RECOMMENDED = {"max_grad_norm": 1.0}  # the starter never clips


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The flags of a paraphrase run (``paraphrase_detection.py``'s command line)."""
    d = ParaphraseSettings()
    parser = argparse.ArgumentParser(description=description, formatter_class=DefaultsHelpFormatter)
    modes = mode_names(has_head=False)  # the cloze scorer has no head to train alone
    parser.add_argument("--para_train", type=str, default=d.para_train)
    parser.add_argument("--para_dev", type=str, default=d.para_dev)
    parser.add_argument("--para_test", type=str, default=d.para_test)
    parser.add_argument("--para_dev_out", type=str, default=d.para_dev_out)
    parser.add_argument("--para_test_out", type=str, default=d.para_test_out)
    parser.add_argument("--fine_tune_mode", "--fine-tune-mode", dest="fine_tune_mode", choices=modes,
                        default="full-model", help=modes_help(modes))
    parser.add_argument("--loss", choices=("answer", "vocab"), default=d.loss,
                        help="cross-entropy among the two answer tokens (answer) or over the full vocabulary "
                             "(vocab, the starter's)")
    parser.add_argument("--padding_side", choices=("right", "left"), default=d.padding_side)
    parser.add_argument("--eval_batch_size", type=non_negative_int, default=d.eval_batch_size,
                        help="0: 4 x --batch_size")
    parser.add_argument("--filepath", type=str, default=d.filepath,
                        help="where the best model is saved (default <output_dir>/paraphrase-model.pt)")
    # --hidden_dropout_prob is GPT-2's own residual/embedding dropout here (there is no head).
    add_classification_args(parser, batch_size=8, lr=1e-5, epochs=10, hidden_dropout_prob=0.1, model_size="gpt2",
                            max_grad_norm=0.0)
    add_recipe_arg(parser, RECOMMENDED)
    return parser


def parse_args(argv: list[str] | None = None, description: str | None = None) -> argparse.Namespace:
    """The parsed flags, the starter's defaults or, with ``--recipe recommended``, ``RECOMMENDED``."""
    return parse_with_recipe(build_parser(description), argv, RECOMMENDED)


def settings_from_args(args: argparse.Namespace) -> ParaphraseSettings:
    """The run's typed settings from its parsed flags."""
    own = {f.name for f in fields(ParaphraseSettings)} - {f.name for f in fields(ClassificationSettings)}
    return task_settings_from_args(args, ParaphraseSettings, objective=objective_settings_from_args(args),
                                   **{name: getattr(args, name) for name in sorted(own)})


def paraphrase_settings(base: argparse.Namespace | None = None, **overrides: Any) -> ParaphraseSettings:
    """The settings of a paraphrase run: the flags' defaults, then every setting of ``base`` that a
    paraphrase run also has (e.g. a pipeline's shared engine, LoRA and model flags, so none is
    dropped), then ``overrides`` (which must be flags of a paraphrase run)."""
    defaults = vars(build_parser().parse_args([]))
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise TypeError(f"not settings of a paraphrase run: {unknown}")
    shared = {k: v for k, v in vars(base or argparse.Namespace()).items() if k in defaults}
    return settings_from_args(argparse.Namespace(**{**defaults, **shared, **overrides}))


__all__ = ["RECOMMENDED", "build_parser", "parse_args", "paraphrase_settings", "settings_from_args"]
