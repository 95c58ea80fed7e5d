"""Quora paraphrase detection as a cloze question GPT-2 answers with its own LM head: the
task behind ``paraphrase_detection.py``, and the scoring the distillation pipeline uses.

    score_paraphrase_pairs(model, tokenizer, pairs) -> P(yes) for (sentence1, sentence2) pairs
    tasks.restore.restore_task_model(path, "paraphrase").model -> ClozeParaphraseScorer saved by a run
    run(ParaphraseSettings(...)) -> {"dev": metrics, "checkpoint": path, ...}; trains on any
        Quora-format TSV (``cli.paraphrase.paraphrase_settings`` builds the settings from flags)

The training loss is the cross-entropy over the answer logits (or the vocabulary's, with
``--loss vocab``), with the training objectives' terms added when one is asked for
(``tasks.common.training_loss``).
R-Drop and SMART regularise those logits; SimCSE's InfoNCE runs on the prompt's representation
(unsupervised, two dropout views) or, with ``--contrastive_supervised``, on the two questions of
each pair encoded alone (a positive pair's questions are positives). ``--pooling`` picks that
representation; the answer itself is always read at the prompt's last token (it is the
next-token prediction there), so ``cli.paraphrase`` refuses ``--pooling mean`` without SimCSE.
``--contrastive_hard_negatives`` adds mined negatives to supervised SimCSE
(``methods.objectives.hard_negatives``); ``--multitask sst`` trains Quora beside other tasks in
one run (``tasks.multitask``); ``--back_translate de`` adds copies of training pairs with a
question translated to German and back (``tasks.back_translation``). ``--dpo`` trains on the
DPO loss of the two answers instead of the cross-entropy (``tasks.paraphrase_dpo``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine import ranks
from engine.data import PadCollator, make_eval_loader
from engine.predict import predict_in_order
from errors import InputError
from methods.dpo import DEFAULT_BETA
from methods.lora import unwrap_lora
from methods.objectives.hard_negatives import add_hard_negatives, mine_hard_negatives
from methods.restore import save_model
from models.heads import ClozeParaphraseScorer
from tasks.back_translation import BackTranslation, augment_pairs
from tasks.common import (
    build_task_model,
    check_context,
    default_output_dir,
    fit_task,
    open_task_run,
    prepare_model,
    start,
    train_config,
    train_metrics_fn,
    training_loss,
)
from tasks.course_data import write_id_predictions
from tasks.metrics import classification_metrics, majority_baseline
from tasks.multitask import MAIN_TASK, aux_features, multitask_training
from tasks.paraphrase_dpo import dpo_training_loss
from tasks.publish import RunPredictions, Target, is_explicit, partial_reason, shown
from tasks.quora_data import PARAPHRASE_PROMPT, ParaphrasePair, load_quora_splits, paraphrase_features
from tasks.restore import restore_task_model
from tasks.settings import ClassificationSettings


@dataclass(frozen=True)
class ParaphraseSettings(ClassificationSettings):
    """A paraphrase run (the fields are ``paraphrase_detection.py``'s flags): the Quora files read
    and written, the loss over the two answer tokens or the full vocabulary, the padding side,
    the evaluation batch size (0: 4 x the training one), where the best model is saved
    (None: ``<run folder>/paraphrase-model.pt``), the auxiliary tasks of a multi-task run with
    their sampling and loss weights (``tasks.multitask``), mined SimCSE hard negatives, DPO on
    the answers instead of the cross-entropy (``tasks.paraphrase_dpo``, ``dpo_beta``), and
    back-translated copies of training pairs (``back_translate*``: ``tasks.back_translation``)."""

    para_train: str = "data/quora-train.csv"
    para_dev: str = "data/quora-dev.csv"
    para_test: str = "data/quora-test-student.csv"
    para_dev_out: str = "predictions/para-dev-output.csv"
    para_test_out: str = "predictions/para-test-output.csv"
    loss: str = "answer"
    padding_side: str = "right"
    eval_batch_size: int = 0
    filepath: str | None = None
    multitask: tuple[str, ...] = ()
    task_sampling: str = "proportional"
    sampling_temperature: float = 2.0
    task_weights: dict[str, float] = field(default_factory=dict)
    contrastive_hard_negatives: bool = False
    dpo: bool = False
    dpo_beta: float = DEFAULT_BETA
    back_translate: str = ""  # a pivot language: copies of training pairs back-translated (tasks.back_translation)
    back_translate_fraction: float = 1.0
    back_translate_side: str = "sentence1"
    back_translate_models: tuple[str, ...] = ()
    back_translate_cache: str = ""
    back_translate_beams: int = 1


# ----------------------------------------------------------------- public API


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


def _build_scorer(settings: ParaphraseSettings) -> tuple[ClozeParaphraseScorer, Any, bool]:
    """(scorer, tokenizer, checkpoints hold only trainable parameters) from the settings."""
    load = settings.run.load
    if not load:
        return build_task_model(settings, ClozeParaphraseScorer,
                                hidden_dropout_prob=settings.model.hidden_dropout_prob)
    restored = restore_task_model(load, "paraphrase", settings)
    model, tokenizer = restored.model, restored.tokenizer
    print(f"loaded {load}")
    return model, tokenizer, prepare_model(model, settings.fine_tune)


def check_prompt_room(tokenizer: Any, max_length: int) -> None:
    """Refuse a ``--max_length`` (0: the context) that the cloze prompt's own words fill, leaving
    not one token for the two questions: every pair would fail to encode."""
    around = len(tokenizer.encode(PARAPHRASE_PROMPT.format(s1="a", s2="a"))) - 2  # the prompt without its questions
    if 0 < max_length <= around:
        raise InputError(f"--max_length {max_length} leaves no room for the questions: the paraphrase prompt around "
                         f"them takes {around} tokens; use at least {around + 1} (0: the context)")


def answers(p_yes: Sequence[float]) -> list[int]:
    """1 (a paraphrase) where P(yes) > 0.5 (= the larger of the two answer logits), else 0."""
    return [int(p > 0.5) for p in p_yes]


def evaluate(p_yes: Sequence[float], pairs: Sequence[ParaphrasePair]) -> dict[str, float]:
    """Accuracy and macro-F1 of thresholding P(yes) at 0.5 (``answers``)."""
    return classification_metrics([p.label for p in pairs], answers(p_yes))


def run(settings: ParaphraseSettings) -> dict[str, Any]:
    """Train (unless ``--epochs 0``), keep the best dev epoch, save it, write both prediction files."""
    data_settings = settings.data
    parent = default_output_dir("paraphrase", f"{settings.fine_tune.mode}-{Path(settings.model.model_size).name}")
    carved = tuple(p for p in (settings.para_train, settings.para_dev, settings.para_test) if not Path(p).exists())
    files = RunPredictions({split: Target(Path(getattr(settings, f"para_{split}_out")),
                                          is_explicit(settings, f"para_{split}_out")) for split in ("dev", "test")},
                           partial_reason(limit=data_settings.limit, carved=carved, max_steps=settings.train.max_steps))
    out_dir = open_task_run(settings, parent, outputs=(*files.published(), settings.filepath))
    device = start(settings)
    model, tokenizer, trainable_only = _build_scorer(settings)  # bad lengths stop before any data is read
    check_context(model.gpt.config.max_position_embeddings, max_length=data_settings.max_length)
    check_prompt_room(tokenizer, data_settings.max_length)
    data = load_quora_splits(settings.para_train, settings.para_dev, settings.para_test, limit=data_settings.limit)
    if settings.back_translate:  # cli.paraphrase checked the Marian models before the run began
        data["train"] = augment_pairs(data["train"], BackTranslation.from_settings(settings), settings.seed, device,
                                      settings.train.progress)
    for split, rows in data.items():
        print(f"{split}: {len(rows)} pairs")
    print(f"loss over {'the two answer tokens' if settings.loss == 'answer' else 'the full vocabulary'}")

    max_len = data_settings.max_length or model.gpt.config.max_position_embeddings
    feats = {k: paraphrase_features(rows, tokenizer, max_len, f"quora {k}") for k, rows in data.items()}
    collate = PadCollator(tokenizer.pad_token_id, padding_side=settings.padding_side)
    eval_bs = settings.eval_batch_size or 4 * data_settings.batch_size
    bf16 = settings.train.bf16
    filepath = settings.filepath or str(Path(out_dir or ".") / "paraphrase-model.pt")  # no out_dir: predict only

    best: dict[str, Any] = {}
    if settings.train.epochs > 0:
        full_vocab = settings.loss == "vocab"
        if settings.dpo:  # cli.paraphrase refuses it beside the objectives and multi-task training
            loss = dpo_training_loss(model, settings.dpo_beta)
            print(f"DPO (beta {settings.dpo_beta}): the right answer chosen, the other rejected, against a frozen "
                  "copy of the starting model")
        else:
            loss = training_loss(settings.objective,
                                 lambda m, b: m.scores(b["input_ids"], b["attention_mask"], full_vocab),
                                 lambda logits, b: ClozeParaphraseScorer.answer_loss(logits, b["labels"], full_vocab))
        train_collate = collate
        if settings.objective.contrastive_supervised:  # each question alone, for the pair's two views
            train_collate = loss.pair_view_collate(feats["train"], [p.sentence1 for p in data["train"]],
                                                   [p.sentence2 for p in data["train"]], tokenizer, max_len,
                                                   settings.padding_side)
        if settings.contrastive_hard_negatives:
            hard = mine_hard_negatives([p.sentence1 for p in data["train"]], [p.sentence2 for p in data["train"]],
                                       [p.label for p in data["train"]])
            add_hard_negatives(feats["train"], hard, tokenizer, max_len)
            print(f"mined {len(hard)} hard negatives (word overlap, other label)")
        train_model, loader = model, None
        if settings.multitask:
            aux = aux_features(settings.multitask, tokenizer, max_len, data_settings.limit)
            train_model, loader, loss = multitask_training(
                model, loss, {MAIN_TASK: feats["train"], **aux}, collate, **data_settings.loader_kwargs(),
                sampling=settings.task_sampling, temperature=settings.sampling_temperature,
                weights=settings.task_weights, hidden_dropout_prob=settings.model.hidden_dropout_prob)

        def eval_fn(m: Any) -> dict[str, float]:  # the scorer, or the multi-task model holding it
            return evaluate(predict_p_yes(getattr(m, "scorer", m), feats["dev"], collate, eval_bs, bf16), data["dev"])

        on_train = train_metrics_fn(feats["train"], len(feats["dev"]), settings.seed, lambda m, rows: answers(
            predict_p_yes(getattr(m, "scorer", m), rows, collate, eval_bs, bf16)))
        cfg = train_config(settings, device, out_dir, metric="accuracy", save_trainable_only=trainable_only)
        best, _ = fit_task(train_model, loss, feats["train"], train_collate, eval_fn, cfg,
                           **data_settings.loader_kwargs(), callbacks=getattr(loss, "callbacks", []),
                           extra={"args": dict(settings.flags)}, train_eval_fn=on_train, loader=loader)
    model.to(device)
    unwrap_lora(model)
    if settings.train.epochs > 0 or not settings.run.load:  # predicting with a loaded model: nothing worth saving
        save_model(model.gpt, filepath, task="paraphrase", dev=best)
        print(f"saved the model to {filepath}")
    else:
        filepath = settings.run.load

    p_dev = predict_p_yes(model, feats["dev"], collate, eval_bs, bf16)
    p_test = predict_p_yes(model, feats["test"], collate, eval_bs, bf16)
    metrics = evaluate(p_dev, data["dev"])
    metrics["majority_baseline"] = majority_baseline([p.label for p in data["train"]], [p.label for p in data["dev"]])
    if ranks.is_main():  # under torchrun: one writer
        files.open(out_dir, settings.run, parent)
        for split, p in (("dev", p_dev), ("test", p_test)):
            write_paraphrase_predictions(files.path(split), [x.id for x in data[split]],
                                         ClozeParaphraseScorer.answer_token(answers(p)))
            print(f"wrote {shown(files.path(split))}")
        files.publish("accuracy", metrics["accuracy"])
    print(f"dev accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f} "
          f"(majority-class baseline accuracy {metrics['majority_baseline']:.3f})")
    result: dict[str, Any] = {"dev": metrics, "best": best, "checkpoint": filepath}
    if data["test"] and all(p.label is not None for p in data["test"]):  # carved offline test split
        result["test"] = evaluate(p_test, data["test"])
        print(f"test accuracy {result['test']['accuracy']:.3f}, macro-F1 {result['test']['macro_f1']:.3f} "
              "(labeled test split)")
    return result


__all__ = ["ParaphraseSettings", "predict_p_yes", "run", "score_paraphrase_pairs",
           "write_paraphrase_predictions"]
