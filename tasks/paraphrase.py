"""Quora paraphrase detection as a cloze question GPT-2 answers with its own LM head: the
task behind ``paraphrase_detection.py``, and the scoring the distillation pipeline uses.

    score_paraphrase_pairs(model, tokenizer, pairs) -> P(yes) for (sentence1, sentence2) pairs
    load_paraphrase_scorer(path) -> ClozeParaphraseScorer saved by a run
    run(paraphrase_settings(base, para_train=...)) -> {"dev": metrics, "checkpoint": path, ...};
        trains on any Quora-format TSV, with every setting of ``base`` a paraphrase run shares

The training loss is ``methods.objectives.build_objective`` over the answer logits (or the
vocabulary's, with ``--loss vocab``): the plain cross-entropy unless an objective flag is set.
R-Drop and SMART regularise those logits; SimCSE's InfoNCE runs on the prompt's representation
(unsupervised, two dropout views) or, with ``--contrastive_supervised``, on the two questions of
each pair encoded alone (a positive pair's questions are positives). ``--pooling`` picks that
representation; the answer itself is always read at the prompt's last token (it is the
next-token prediction there).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cli.common import default_output_dir, fine_tune_config, open_run, train_config_from_args
from cli.validation import non_negative_int
from engine import distributed
from engine.checkpoints import load_model, save_model
from engine.data import PadCollator, make_eval_loader
from engine.predict import predict_in_order
from methods.fine_tune import mode_names, modes_help
from methods.lora import unwrap_lora
from methods.objectives import PairViewCollator, add_pair_views, build_objective
from models.heads import ClozeParaphraseScorer
from models.loading import load_tokenizer
from tasks.common import add_classification_args, build_task_model, fit_task, loader_settings, prepare_model, start
from tasks.course_data import ParaphrasePair, load_quora_splits, paraphrase_features, write_id_predictions
from tasks.metrics import classification_metrics, majority_baseline


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The flags of a paraphrase run (``paraphrase_detection.py``'s command line)."""
    parser = argparse.ArgumentParser(description=description)
    modes = mode_names(has_head=False)  # the cloze scorer has no head to train alone
    parser.add_argument("--para_train", type=str, default="data/quora-train.csv")
    parser.add_argument("--para_dev", type=str, default="data/quora-dev.csv")
    parser.add_argument("--para_test", type=str, default="data/quora-test-student.csv")
    parser.add_argument("--para_dev_out", type=str, default="predictions/para-dev-output.csv")
    parser.add_argument("--para_test_out", type=str, default="predictions/para-test-output.csv")
    parser.add_argument("--fine_tune_mode", "--fine-tune-mode", dest="fine_tune_mode", choices=modes,
                        default="full-model", help=modes_help(modes))
    parser.add_argument("--loss", choices=("answer", "vocab"), default="answer",
                        help="cross-entropy among the two answer tokens (answer) or over the full vocabulary "
                             "(vocab, the starter's)")
    parser.add_argument("--padding_side", choices=("right", "left"), default="right")
    parser.add_argument("--eval_batch_size", type=non_negative_int, default=0, help="0: 4 x --batch_size")
    parser.add_argument("--filepath", type=str, default=None,
                        help="where the best model is saved (default <output_dir>/paraphrase-model.pt)")
    # --hidden_dropout_prob is GPT-2's own residual/embedding dropout here (there is no head).
    add_classification_args(parser, batch_size=8, lr=1e-5, epochs=10, hidden_dropout_prob=0.1, model_size="gpt2")
    return parser

def paraphrase_settings(base: argparse.Namespace | None = None, **overrides: Any) -> argparse.Namespace:
    """The settings ``run`` takes: the flags' defaults, then every setting of ``base`` that a
    paraphrase run also has (e.g. a pipeline's shared engine, LoRA and model flags, so none is
    dropped), then ``overrides`` (which must be flags of a paraphrase run)."""
    defaults = vars(build_parser().parse_args([]))
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise TypeError(f"not settings of a paraphrase run: {unknown}")
    shared = {k: v for k, v in vars(base or argparse.Namespace()).items() if k in defaults}
    return argparse.Namespace(**{**defaults, **shared, **overrides})


# ----------------------------------------------------------------- public API


def load_paraphrase_scorer(path: str | Path, device: str | torch.device = "cpu") -> ClozeParaphraseScorer:
    """The scorer a run saved (``<output_dir>/paraphrase-model.pt`` or ``--filepath``), in eval mode."""
    return ClozeParaphraseScorer(load_model(path, map_location=device)).eval()


def predict_p_yes(
    model: ClozeParaphraseScorer,
    features: Sequence[dict[str, Any]],
    collate: PadCollator,
    batch_size: int,
    bf16: bool = True,
) -> list[float]:
    """P(yes) of each feature dict in order: no gradients, batches sorted by length (little
    padding), bf16 autocast on CUDA."""
    if not features:
        return []
    return predict_in_order(model, make_eval_loader(features, collate, batch_size),
                            lambda m, b: m.p_yes(b["input_ids"], b["attention_mask"]).float(), bf16=bf16)


def score_paraphrase_pairs(
    model: ClozeParaphraseScorer,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    batch_size: int = 32,
    max_length: int | None = None,
    padding_side: str = "right",
    bf16: bool = True,
) -> list[float]:
    """P("yes" | "yes" or "no") that each (sentence1, sentence2) is a paraphrase, in input order,
    with exactly the prompt the model was trained on. Batched, no gradients, on the model's
    device; ``max_length`` defaults to the model's context (longer questions are cut)."""
    max_length = max_length or model.gpt.config.max_position_embeddings
    items = [ParaphrasePair(str(i), s1, s2, None) for i, (s1, s2) in enumerate(pairs)]
    feats = paraphrase_features(items, tokenizer, max_length, "scored pairs")
    return predict_p_yes(model, feats, PadCollator(tokenizer.pad_token_id, padding_side=padding_side),
                         batch_size, bf16)


def write_paraphrase_predictions(path: str | Path, ids: Sequence[str], token_ids: Sequence[int]) -> None:
    """``predictions/para-{dev,test}-output.csv``: ``id \\t Predicted_Is_Paraphrase `` then ``<id>, <token id> ``."""
    write_id_predictions(path, "Predicted_Is_Paraphrase", ids, token_ids)


# ----------------------------------------------------------------- the run


def build_scorer(args: argparse.Namespace) -> tuple[ClozeParaphraseScorer, Any, bool]:
    """(scorer, tokenizer, checkpoints hold only trainable parameters) from the flags."""
    if not args.load:
        return build_task_model(args, ClozeParaphraseScorer, hidden_dropout_prob=args.hidden_dropout_prob)
    model, tokenizer = ClozeParaphraseScorer(load_model(args.load)), load_tokenizer(args.tokenizer)
    print(f"loaded {args.load}")
    return model, tokenizer, prepare_model(model, fine_tune_config(args))


def evaluate(p_yes: Sequence[float], pairs: Sequence[ParaphrasePair]) -> dict[str, float]:
    """Accuracy and macro-F1 of thresholding P(yes) at 0.5 (= the larger of the two answer logits)."""
    return classification_metrics([p.label for p in pairs], [int(p > 0.5) for p in p_yes])


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train (unless ``--epochs 0``), keep the best dev epoch, save it, write both prediction
    files. ``args``: the parsed flags or ``paraphrase_settings(...)``."""
    out_dir = open_run(args, default_output_dir("paraphrase", f"{args.fine_tune_mode}-{Path(args.model_size).name}"),
                       outputs=(args.para_dev_out, args.para_test_out, args.filepath))
    device = start(args)
    data = load_quora_splits(args.para_train, args.para_dev, args.para_test, limit=args.limit)
    for split, rows in data.items():
        print(f"{split}: {len(rows)} pairs")
    model, tokenizer, trainable_only = build_scorer(args)
    print(f"loss over {'the two answer tokens' if args.loss == 'answer' else 'the full vocabulary'}")

    max_len = args.max_length or model.gpt.config.max_position_embeddings
    feats = {s: paraphrase_features(rows, tokenizer, max_len, f"quora {s}") for s, rows in data.items()}
    collate = PadCollator(tokenizer.pad_token_id, padding_side=args.padding_side)
    eval_bs = args.eval_batch_size or 4 * args.batch_size
    bf16 = not args.no_bf16
    filepath = args.filepath or str(Path(out_dir or ".") / "paraphrase-model.pt")  # no out_dir: predict only

    best: dict[str, Any] = {}
    if args.epochs > 0:
        full_vocab = args.loss == "vocab"
        objective = build_objective(
            args, lambda m, b: m.scores(b["input_ids"], b["attention_mask"], full_vocab),
            lambda logits, b: ClozeParaphraseScorer.answer_loss(logits, b["labels"], full_vocab))
        train_collate = collate
        if objective.settings.contrastive_supervised:  # each question alone, for the pair's two views
            add_pair_views(feats["train"], [p.sentence1 for p in data["train"]], [p.sentence2 for p in data["train"]],
                           tokenizer, max_len)
            train_collate = PairViewCollator(tokenizer.pad_token_id, padding_side=args.padding_side)

        def eval_fn(m: ClozeParaphraseScorer) -> dict[str, float]:
            return evaluate(predict_p_yes(m, feats["dev"], collate, eval_bs, bf16), data["dev"])

        cfg = train_config_from_args(args, device, metric="accuracy", output_dir=str(out_dir),
                                     save_trainable_only=trainable_only)
        best, _ = fit_task(model, objective, feats["train"], train_collate, eval_fn, cfg, **loader_settings(args),
                           callbacks=objective.callbacks, extra={"args": vars(args)})
    model.to(device)
    unwrap_lora(model)
    if args.epochs > 0 or not args.load:  # predicting with a loaded model changes nothing worth saving
        save_model(model.gpt, filepath, task="paraphrase", dev=best)
        print(f"saved the model to {filepath}")
    else:
        filepath = args.load

    p_dev = predict_p_yes(model, feats["dev"], collate, eval_bs, bf16)
    p_test = predict_p_yes(model, feats["test"], collate, eval_bs, bf16)
    metrics = evaluate(p_dev, data["dev"])
    metrics["majority_baseline"] = majority_baseline([p.label for p in data["train"]], [p.label for p in data["dev"]])
    for split, path, p in (("dev", args.para_dev_out, p_dev), ("test", args.para_test_out, p_test)):
        if distributed.is_main():  # under torchrun: one writer
            write_paraphrase_predictions(path, [x.id for x in data[split]], ClozeParaphraseScorer.answer_token(
                [int(v > 0.5) for v in p]))
        print(f"wrote {path}")
    print(f"dev accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f} "
          f"(majority-class baseline accuracy {metrics['majority_baseline']:.3f})")
    result: dict[str, Any] = {"dev": metrics, "best": best, "checkpoint": filepath}
    if data["test"] and all(p.label is not None for p in data["test"]):  # carved offline test split
        result["test"] = evaluate(p_test, data["test"])
        print(f"test accuracy {result['test']['accuracy']:.3f}, macro-F1 {result['test']['macro_f1']:.3f} "
              "(labeled test split)")
    return result


__all__ = ["build_parser", "load_paraphrase_scorer", "paraphrase_settings", "predict_p_yes", "run",
           "score_paraphrase_pairs", "write_paraphrase_predictions"]
