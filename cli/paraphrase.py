"""The command line of a paraphrase run (``paraphrase_detection.py``) and its reading into
``tasks.paraphrase.ParaphraseSettings``; ``paraphrase_settings`` also serves a pipeline that
trains a paraphrase run with its own shared flags (``distillation.train``)."""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any

from cli.common import add_classification_args, objective_settings_from_args, task_settings_from_args
from cli.defaults import DefaultsHelpFormatter, add_recipe_arg, parse_with_recipe
from cli.dpo import add_dpo_args
from cli.validation import non_negative_int, positive_float, positive_int, probability
from engine import ranks
from engine.multitask import SAMPLINGS
from errors import InputError
from methods.fine_tune import mode_names, modes_help
from tasks.back_translation import (
    SIDES,
    BackTranslation,
    check_can_translate,
)
from tasks.multitask import check_tasks
from tasks.paraphrase import ParaphraseSettings
from tasks.settings import ClassificationSettings

RECOMMENDED = {"max_grad_norm": 1.0}  # the starter never clips
POOLING_HELP = ("the SimCSE term's sentence representation (needs --contrastive_weight > 0; mean is refused without "
                "it): the answer itself is always read at the prompt's last token, its next-token prediction")


DEFAULTS = ParaphraseSettings()
BT_FLAGS = ("back_translate_fraction", "back_translate_side", "back_translate_beams", "back_translate_cache")
DPO_HELP = ('train on the DPO loss instead of the cross-entropy: the right answer ("yes" or "no") the chosen '
            "completion, the other the rejected one, against a frozen copy of the starting model (dropout off)")


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


def model_pair(text: str) -> tuple[str, ...]:
    """``--back_translate_models``: two comma-separated models (empty: the hub's)."""
    models = tuple(m.strip() for m in text.split(",")) if text.strip() else ()
    if models and (len(models) != 2 or not all(models)):
        raise argparse.ArgumentTypeError(f"{text!r} is not two models EN_X,X_EN (folders or hub ids)")
    return models


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The flags of a paraphrase run (``paraphrase_detection.py``'s command line)."""
    d = DEFAULTS
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
    b = parser.add_argument_group("back-translation augmentation (off by default)")
    b.add_argument("--back_translate", metavar="PIVOT", default=d.back_translate,
                   help="add copies of training pairs (same label) whose question went to this language and back "
                        "(e.g. de, fr) through Marian models Helsinki-NLP/opus-mt-en-PIVOT and -PIVOT-en (the hub "
                        "or its cache; needs sentencepiece)")
    b.add_argument("--back_translate_fraction", type=probability, metavar="F", default=d.back_translate_fraction,
                   help="the fraction of training pairs copied (a sample drawn with --seed)")
    b.add_argument("--back_translate_side", choices=SIDES, default=d.back_translate_side,
                   help="which question of a copy is back-translated")
    b.add_argument("--back_translate_models", type=model_pair, metavar="EN_X,X_EN", default="",
                   help="the two Marian models (local folders or hub ids) instead of the Helsinki-NLP ones")
    b.add_argument("--back_translate_cache", metavar="PATH", default=d.back_translate_cache,
                   help="the JSONL file of translations, each sentence translated once and reused across runs "
                        "(default back-translation.jsonl beside --para_train)")
    b.add_argument("--back_translate_beams", type=positive_int, metavar="N", default=d.back_translate_beams,
                   help="beam width of the translations (1: greedy)")
    add_dpo_args(parser, "DPO (off by default)", DPO_HELP)
    # --hidden_dropout_prob is GPT-2's own residual/embedding dropout here (there is no head).
    add_classification_args(parser, batch_size=8, lr=1e-5, epochs=10, hidden_dropout_prob=0.1, model_size="gpt2",
                            max_grad_norm=0.0, pooling_help=POOLING_HELP)  # the shared flag, told for this task
    add_recipe_arg(parser, RECOMMENDED)
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
    SimCSE term (the only thing it changes here), hard negatives without supervised SimCSE,
    multi-task runs with the training objectives (they regularise one task's logits), ``--dpo``
    beside another loss or without training, the ``--back_translate_*`` flags without it, and
    ``--back_translate`` without training or, when it must translate, without what translating
    needs (``check_translation_at_hand``: before a run folder or a model exists)."""
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
    uses_objectives = any(w > 0 for w in objectives) or args.contrastive_supervised
    if args.dpo and (args.multitask or uses_objectives or args.loss != "answer" or args.epochs == 0):
        raise InputError("--dpo replaces the training loss: drop --multitask, the training objectives "
                         "(--rdrop_alpha, --contrastive_*, --smart_*) and --loss vocab, and train (--epochs >= 1)")
    if args.multitask and uses_objectives:
        raise InputError("--multitask trains on the tasks' plain losses: drop the training objectives "
                         "(--rdrop_alpha, --contrastive_*, --smart_*)")
    if args.back_translate_models and not args.back_translate:
        raise InputError("--back_translate_models needs --back_translate PIVOT (the pivot language they go through)")
    stray = [f"--{n}" for n in BT_FLAGS if not args.back_translate and getattr(args, n) != getattr(DEFAULTS, n)]
    if stray:
        raise InputError(f"{', '.join(stray)} change{'s' if len(stray) == 1 else ''} nothing without "
                         "--back_translate PIVOT: add it or drop them")
    if args.back_translate and args.epochs == 0:
        raise InputError("--back_translate adds training pairs: it changes nothing with --epochs 0")
    if args.back_translate:
        check_translation_at_hand(args)


def check_translation_at_hand(args: argparse.Namespace) -> None:
    """Where the translation cache does not exist yet, everything translating needs, before any
    run folder or model: the Marian models (downloaded if need be) and sentencepiece, a writable
    cache folder, and a single process. Where it exists it may already hold every sentence (a
    rerun offline, a resume): ``tasks.back_translation.back_translate`` checks the same things
    itself when a sentence is missing, so a full cache needs no model."""
    config = BackTranslation.from_settings(args)
    if not config.cache.exists():
        check_can_translate(config, f"the translation cache {config.cache} does not exist", ranks.launched())


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


__all__ = ["DPO_HELP", "POOLING_HELP", "RECOMMENDED", "build_parser", "check_args", "check_translation_at_hand",
           "model_pair", "parse_args", "paraphrase_settings", "settings_from_args", "task_list", "task_weights"]
