"""The command line of a paraphrase run (``paraphrase_detection.py``) and its reading into
``tasks.paraphrase.ParaphraseSettings``; ``paraphrase_settings`` also serves a pipeline that
trains a paraphrase run with its own shared flags (``distillation.train``)."""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any

from cli.common import add_classification_args, objective_settings_from_args, task_settings_from_args
from cli.defaults import DefaultsHelpFormatter, add_recipe_arg, parse_with_recipe
from cli.validation import non_negative_int, positive_float
from engine.multitask import SAMPLINGS
from errors import InputError
from methods.fine_tune import mode_names, modes_help
from tasks.multitask import check_tasks
from tasks.paraphrase import ParaphraseSettings
from tasks.settings import ClassificationSettings

RECOMMENDED = {"max_grad_norm": 1.0}  # the starter never clips
POOLING_HELP = ("the SimCSE term's sentence representation (needs --contrastive_weight > 0; mean is refused without "
                "it): the answer itself is always read at the prompt's last token, its next-token prediction")


def task_list(text: str) -> tuple[str, ...]:
    """``--multitask``: comma-separated task names (empty: Quora alone)."""
    return tuple(t.strip() for t in text.split(",") if t.strip())


def task_weights(text: str) -> dict[str, float]:
    """``--task_weights quora=1,sst=0.5``: a loss weight (>= 0) per task name."""
    out = {}
    for item in (t.strip() for t in text.split(",") if t.strip()):
        name, _, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not task=weight (e.g. quora=1,sst=0.5)") from None
        if out[name.strip()] < 0:
            raise argparse.ArgumentTypeError(f"{item!r}: a weight must be >= 0")
    return out


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
    g = parser.add_argument_group("multi-task training and hard negatives (off by default)")
    g.add_argument("--multitask", type=task_list, default=",".join(d.multitask),
                   help="auxiliary tasks trained beside Quora in one run, comma-separated: sst, cfimdb, cola "
                        "(a linear head each on the shared body, their default train files; the saved model is "
                        "the paraphrase scorer)")
    g.add_argument("--task_sampling", choices=SAMPLINGS, default=d.task_sampling,
                   help="which task each batch comes from: p ~ n (proportional), equal (uniform), or "
                        "p ~ n^(1/T) (temperature)")
    g.add_argument("--sampling_temperature", type=positive_float, default=d.sampling_temperature,
                   help="T of --task_sampling temperature")
    g.add_argument("--task_weights", type=task_weights, default="",
                   help="loss weight per task, e.g. quora=1,sst=0.5 (1 where not given)")
    g.add_argument("--contrastive_hard_negatives", action="store_true",
                   help="with --contrastive_supervised: add to each pair, as a SimCSE negative, the question of "
                        "a pair with the other label that shares the most words with its first question")
    # --hidden_dropout_prob is GPT-2's own residual/embedding dropout here (there is no head).
    add_classification_args(parser, batch_size=8, lr=1e-5, epochs=10, hidden_dropout_prob=0.1, model_size="gpt2",
                            max_grad_norm=0.0)
    add_recipe_arg(parser, RECOMMENDED)
    next(a for a in parser._actions if a.dest == "pooling").help = POOLING_HELP  # the shared flag, told for this task
    return parser


def parse_args(argv: list[str] | None = None, description: str | None = None) -> argparse.Namespace:
    """The parsed flags, the starter's defaults or, with ``--recipe recommended``, ``RECOMMENDED``."""
    return parse_with_recipe(build_parser(description), argv, RECOMMENDED)


def settings_from_args(args: argparse.Namespace) -> ParaphraseSettings:
    """The run's typed settings from its parsed flags; flags that would change nothing, or that
    cannot go together, are refused first (``check_args``)."""
    check_args(args)
    own = {f.name for f in fields(ParaphraseSettings)} - {f.name for f in fields(ClassificationSettings)}
    return task_settings_from_args(args, ParaphraseSettings, objective=objective_settings_from_args(args),
                                   **{name: getattr(args, name) for name in sorted(own)})


def check_args(args: argparse.Namespace) -> None:
    """Refuse (``InputError``: one ``error:`` line, exit status 2) ``--pooling mean`` without the
    SimCSE term (the only thing it changes here), hard negatives without supervised SimCSE, and
    multi-task runs with the training objectives (they regularise one task's logits)."""
    if args.pooling != "last" and args.contrastive_weight == 0:
        raise InputError(f"--pooling {args.pooling} changes nothing here without --contrastive_weight > 0: the "
                         "paraphrase answer is read at the prompt's last token; drop --pooling or add the SimCSE term")
    if args.contrastive_hard_negatives and not (args.contrastive_supervised and args.contrastive_weight > 0):
        raise InputError("--contrastive_hard_negatives needs --contrastive_supervised and --contrastive_weight > 0")
    try:
        check_tasks(args.multitask, args.task_weights)
    except ValueError as e:
        raise InputError(f"--multitask/--task_weights: {e}") from None
    objectives = (args.rdrop_alpha, args.contrastive_weight, args.smart_weight, args.smart_proximal_weight)
    if args.multitask and (any(w > 0 for w in objectives) or args.contrastive_supervised):
        raise InputError("--multitask trains on the tasks' plain losses: drop the training objectives "
                         "(--rdrop_alpha, --contrastive_*, --smart_*)")


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


__all__ = ["POOLING_HELP", "RECOMMENDED", "build_parser", "check_args", "parse_args", "paraphrase_settings",
           "settings_from_args", "task_list", "task_weights"]
