"""Quora paraphrase detection as a cloze question that GPT-2 answers with its own LM head.

    python paraphrase_detection.py --use_gpu                       # full model, lr 1e-5 (the starter's run)
    python paraphrase_detection.py --fine_tune_mode lora --lr 3e-4  # LoRA adapters only
    python paraphrase_detection.py --model_size tiny --random_init --limit 2000 --epochs 2   # offline smoke run

Each pair becomes one prompt (``training.course_data.PARAPHRASE_PROMPT``, the same for train, dev
and test) and the answer is read at its last real token as "yes" (8505) or "no" (3919).
Without the course's Quora files (offline), train/dev/test are carved from
``data/quora-minbert-dev.csv`` and a notice says so. Writes
``predictions/para-{dev,test}-output.csv`` in the starter's format, and the best model as a
plain GPT-2 checkpoint (LoRA merged) that ``load_paraphrase_scorer`` reads back.

Public API (used by the distillation pipeline):
    score_paraphrase_pairs(model, tokenizer, pairs) -> P(yes) for (sentence1, sentence2) pairs
    load_paraphrase_scorer(path) -> ClozeParaphraseScorer saved by a run
    main(argv) -> {"dev": metrics, "checkpoint": path, ...}; trains on any Quora-format TSV
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from models.heads import ClozeParaphraseScorer, count_parameters, set_fine_tune_mode
from models.loading import load_model, load_tokenizer, save_model
from modules.lora import unwrap_lora
from training.cli import (
    add_common_args,
    build_from_args,
    default_output_dir,
    lora_kwargs,
    open_run,
    pick_device,
    run_main,
    seed_everything,
    train_config_from_args,
)
from training.course_data import ParaphrasePair, load_quora_splits, paraphrase_features, write_id_predictions
from training.data import PadCollator, make_eval_loader, make_loader, restore_order
from training.metrics import classification_metrics, majority_baseline
from training.trainer import Trainer, predict
from training.validation import non_negative_int

FINE_TUNE_MODES = ("full-model", "lora")  # the cloze scorer has no head to train alone


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--para_train", type=str, default="data/quora-train.csv")
    parser.add_argument("--para_dev", type=str, default="data/quora-dev.csv")
    parser.add_argument("--para_test", type=str, default="data/quora-test-student.csv")
    parser.add_argument("--para_dev_out", type=str, default="predictions/para-dev-output.csv")
    parser.add_argument("--para_test_out", type=str, default="predictions/para-test-output.csv")
    parser.add_argument("--fine_tune_mode", "--fine-tune-mode", dest="fine_tune_mode", choices=FINE_TUNE_MODES,
                        default="full-model", help="full-model: every parameter trains; lora: low-rank adapters")
    parser.add_argument("--loss", choices=("answer", "vocab"), default="answer",
                        help="cross-entropy among the two answer tokens (answer) or over the full vocabulary "
                             "(vocab, the starter's)")
    parser.add_argument("--padding_side", choices=("right", "left"), default="right")
    parser.add_argument("--eval_batch_size", type=non_negative_int, default=0, help="0: 4 x --batch_size")
    parser.add_argument("--filepath", type=str, default=None,
                        help="where the best model is saved (default <output_dir>/paraphrase-model.pt)")
    # --hidden_dropout_prob is GPT-2's own residual/embedding dropout here (there is no head).
    add_common_args(parser, batch_size=8, lr=1e-5, epochs=10, hidden_dropout_prob=0.1, model_size="gpt2")
    return parser.parse_args(argv)


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

    def step(m: ClozeParaphraseScorer, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return batch["index"].cpu(), m.p_yes(batch["input_ids"], batch["attention_mask"]).float().cpu()

    out = predict(model, make_eval_loader(features, collate, batch_size), step, bf16=bf16)
    return restore_order(torch.cat([i for i, _ in out]).tolist(), torch.cat([p for _, p in out]).tolist())


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
    if args.load:
        gpt, tokenizer = load_model(args.load), load_tokenizer(args.tokenizer)
        print(f"loaded {args.load}")
    else:
        gpt, tokenizer = build_from_args(args, hidden_dropout_prob=args.hidden_dropout_prob)
    model = ClozeParaphraseScorer(gpt)
    trainable_only = set_fine_tune_mode(model, args.fine_tune_mode, model.head, **lora_kwargs(args))
    return model, tokenizer, trainable_only


def evaluate(p_yes: Sequence[float], pairs: Sequence[ParaphrasePair]) -> dict[str, float]:
    """Accuracy and macro-F1 of thresholding P(yes) at 0.5 (= the larger of the two answer logits)."""
    return classification_metrics([p.label for p in pairs], [int(p > 0.5) for p in p_yes])


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train (unless ``--epochs 0``), keep the best dev epoch, save it, write both prediction files."""
    out_dir = open_run(args, default_output_dir("paraphrase", f"{args.fine_tune_mode}-{Path(args.model_size).name}"),
                       outputs=(args.para_dev_out, args.para_test_out, args.filepath))
    seed_everything(args.seed)
    device = pick_device(args.use_gpu, args.device)
    data = load_quora_splits(args.para_train, args.para_dev, args.para_test, limit=args.limit)
    for split, rows in data.items():
        print(f"{split}: {len(rows)} pairs")
    model, tokenizer, trainable_only = build_scorer(args)
    n_train, n_total = count_parameters(model)
    print(f"{args.fine_tune_mode}: {n_train:,} of {n_total:,} parameters train; loss over "
          f"{'the two answer tokens' if args.loss == 'answer' else 'the full vocabulary'}")

    max_len = args.max_length or model.gpt.config.max_position_embeddings
    feats = {s: paraphrase_features(rows, tokenizer, max_len, f"quora {s}") for s, rows in data.items()}
    collate = PadCollator(tokenizer.pad_token_id, padding_side=args.padding_side)
    eval_bs = args.eval_batch_size or 4 * args.batch_size
    bf16 = not args.no_bf16
    filepath = args.filepath or str(Path(out_dir or ".") / "paraphrase-model.pt")  # no out_dir: predict only

    best: dict[str, Any] = {}
    if args.epochs > 0:
        full_vocab = args.loss == "vocab"

        def loss_fn(m: ClozeParaphraseScorer, batch: dict[str, Any]) -> torch.Tensor:
            return m.loss(batch["input_ids"], batch["attention_mask"], batch["labels"], full_vocab=full_vocab)

        def eval_fn(m: ClozeParaphraseScorer) -> dict[str, float]:
            return evaluate(predict_p_yes(m, feats["dev"], collate, eval_bs, bf16), data["dev"])

        loader = make_loader(feats["train"], collate, args.batch_size, shuffle=True, num_workers=args.num_workers,
                             group_by_length=args.group_by_length)
        cfg = train_config_from_args(args, device, metric="accuracy", output_dir=str(out_dir),
                                     save_trainable_only=trainable_only)
        trainer = Trainer(model, loss_fn, loader, eval_fn, cfg, extra={"args": vars(args)})
        best = trainer.fit()
        if trainer.best_checkpoint is not None:
            trainer.load_best()
            print(f"best epoch {best.get('epoch')} from {trainer.best_checkpoint}")
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


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command-line entry; also callable as ``main(["--para_train", "pairs.tsv", ...])``."""
    return run(get_args(argv))


if __name__ == "__main__":
    run_main(main)
