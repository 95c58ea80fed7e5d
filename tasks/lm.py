"""Causal-LM training on text: continued pretraining on a plain-text corpus (``pretrain.py``,
and ``sonnet_generation.py --pretrain_corpus``) and fine-tuning on a list of texts (the
sonnets), with one loss, ``causal_lm_loss``, through the shared engine.

Pretraining reads the corpus as one token stream (a plain-text file as it is: write
``<|endoftext|>`` between documents if it has several; a Poetry Foundation CSV as its poems
joined by that token, ``--corpus_format``), cuts it into blocks of the context length, and holds out a small tail of
blocks so that the best epoch is picked by held-out loss. Resume, checkpoints and logs are
the Trainer's (``--resume`` continues from ``<output_dir>/last.pt``). ``run_pretraining`` is
``pretrain.py``'s run (``PretrainSettings``); ``pretrain_before_fine_tuning`` is the same
pretraining as the first step of a task run (``CorpusPretraining``). Their flags are
``cli.lm``'s, shared by both scripts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from engine.data import DataFormatError, PadCollator, encode, make_loader, read_text
from engine.trainer import EvalFn, TrainConfig, Trainer
from methods.qat import apply_qat, remove_qat
from methods.restore import save_model
from methods.sparse_attention import SparseAttention, apply_sparse_attention, attention_fields
from models.sonnet_gpt import SonnetGPT
from modules.losses import count_lm_targets
from tasks.common import build_body, check_context, default_output_dir, fit_task, open_task_run, start, train_config
from tasks.poetry_corpus import is_poetry_csv, read_documents
from tasks.restore import restore_task_model
from tasks.settings import TaskSettings

EOS_TEXT = "<|endoftext|>"  # GPT-2's end-of-text token as text: the tokenizer reads it as that one token

# ----------------------------------------------------------------- data


def read_corpus(path: str | Path, fmt: str = "auto", separator: str = EOS_TEXT) -> str:
    """The corpus text; a clear error for a missing, binary or empty file. A Poetry Foundation
    CSV (``fmt`` ``csv``, or ``auto`` and a ``.csv`` name: ``tasks.poetry_corpus``) becomes its
    poems joined by ``separator`` (GPT-2's end-of-text token), so that no poem runs into the next
    and the model learns where one ends; ``text`` reads any file as one plain-text document."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretraining corpus {path} does not exist")
    if fmt != "text" and (fmt == "csv" or is_poetry_csv(path)):
        return separator.join(read_documents(path, "csv", verbose=True))
    text = read_text(path)
    if not text.strip():
        raise DataFormatError(path, None, "the corpus is empty; give a plain-text file with some text")
    return text


def corpus_blocks(text: str, tokenizer: Any, block_size: int, limit: int = 0) -> list[dict[str, list[int]]]:
    """The token stream cut into consecutive blocks of ``block_size`` (the last one
    may be shorter; a remainder of one token is dropped, it predicts nothing)."""
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    blocks = [ids[i : i + block_size] for i in range(0, len(ids), block_size)]
    blocks = [{"input_ids": b} for b in blocks if len(b) >= 2]
    return blocks[:limit] if limit else blocks


def split_held_out(blocks: list[dict], fraction: float) -> tuple[list[dict], list[dict]]:
    """The last ``fraction`` of blocks (at least one, if there are two or more) held out."""
    if len(blocks) < 2 or fraction <= 0:
        return blocks, []
    n = max(1, int(round(len(blocks) * fraction)))
    return blocks[:-n], blocks[-n:]


# ----------------------------------------------------------------- loss


def causal_lm_loss(model: SonnetGPT, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the real tokens of a batch (``SonnetGPT.loss``). A
    parametrised weight is computed once per forward and loss: QAT's tied embedding
    (``methods.qat``) serves the input lookup and the LM head from one rounding."""
    with parametrize.cached():
        return model.loss(batch["input_ids"], batch["attention_mask"])


def held_out_loss(model: nn.Module, loader: Any) -> dict[str, float]:
    """Token-weighted mean loss and perplexity over held-out blocks (eval mode, no grad)."""
    device = next(model.parameters()).device
    total, n = 0.0, 0
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        count = int(batch["attention_mask"][:, 1:].sum())
        total += float(causal_lm_loss(model, batch)) * count
        n += count
    loss = total / max(n, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


# ----------------------------------------------------------------- fine-tuning on texts


def sonnet_features(texts: Sequence[str], tokenizer: Any, max_length: int, name: str = "") -> list[dict[str, Any]]:
    """Example dicts for PadCollator: each text's tokens followed by EOS (cut to ``max_length``),
    so the model learns to end a sonnet; the EOS is a real token, not padding."""
    ids = encode(tokenizer, [t + tokenizer.eos_token for t in texts], max_length, name)
    return [{"input_ids": x} for x in ids]


def fine_tune_lm(
    model: SonnetGPT,
    tokenizer: Any,
    texts: Sequence[str],
    eval_fn: EvalFn | None,
    config: TrainConfig,
    *,
    batch_size: int = 8,
    max_length: int = 0,
    num_workers: int = 0,
    group_by_length: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], Trainer]:
    """Train ``model`` as a causal LM on ``texts`` with the shared Trainer (``config`` is a
    ``TrainConfig``; ``eval_fn`` must return ``config.metric``); leaves the best epoch's
    weights in ``model``. Returns (best dev metrics, trainer)."""
    max_length = max_length or model.gpt.config.max_position_embeddings
    feats = sonnet_features(texts, tokenizer, max_length, "sonnets")
    return fit_task(model, causal_lm_loss, feats, PadCollator(tokenizer.pad_token_id), eval_fn, config,
                    batch_size=batch_size, num_workers=num_workers, group_by_length=group_by_length, extra=extra,
                    count_fn=count_lm_targets)


# ----------------------------------------------------------------- driver


def pretrain_lm(
    model: nn.Module,
    tokenizer: Any,
    corpus: str | Path,
    train_config: Any,
    *,
    batch_size: int = 4,
    block_size: int = 0,
    held_out_fraction: float = 0.05,
    limit: int = 0,
    num_workers: int = 0,
    corpus_format: str = "auto",
) -> dict[str, Any]:
    """Continue training ``model`` (a GPT2Model or a SonnetGPT; whatever of it
    requires grad) as a causal LM on ``corpus``; leaves the best held-out epoch's
    weights in ``model``. Checkpoints name parameters as ``SonnetGPT`` does.

    ``train_config`` is a ``engine.trainer.TrainConfig`` (epochs, lr, output_dir,
    resume...); its metric is set to held-out loss. ``block_size`` 0 means the
    model's context length; ``corpus_format`` is ``read_corpus``'s ``fmt``. Returns the best
    held-out metrics with their epoch.
    """
    lm = model if isinstance(model, SonnetGPT) else SonnetGPT(model)
    context = lm.gpt.config.max_position_embeddings
    block_size = min(block_size or context, context)
    text = read_corpus(corpus, corpus_format, getattr(tokenizer, "eos_token", None) or EOS_TEXT)
    blocks = corpus_blocks(text, tokenizer, block_size, limit)
    if not blocks:
        raise DataFormatError(corpus, None, "fewer than 2 tokens, nothing to learn; give a longer corpus")
    train, held = split_held_out(blocks, held_out_fraction)
    collate = PadCollator(tokenizer.pad_token_id)
    eval_fn = None
    if held:
        held_loader = make_loader(held, collate, batch_size, shuffle=False)
        eval_fn = lambda m: held_out_loss(m, held_loader)  # noqa: E731
    cfg = replace(train_config, metric="loss", mode="min")
    print(f"pretraining on {corpus}: {len(train)} blocks of <= {block_size} tokens, {len(held)} held out")
    best, _ = fit_task(lm, causal_lm_loss, train, collate, eval_fn, cfg, batch_size=batch_size,
                       num_workers=num_workers, extra={"corpus": str(corpus), **attention_fields(lm)},
                       count_fn=count_lm_targets)
    return best


# ----------------------------------------------------------------- runs


@dataclass(frozen=True)
class CorpusPretraining:
    """Causal-LM pretraining on ``corpus`` before a task fine-tunes (``--pretrain_corpus`` and its
    ``--pretrain_*`` settings; ``corpus`` None: none). The rest of the engine's settings are the task's."""

    corpus: str | None = None
    corpus_format: str = "auto"
    epochs: int = 10
    batch_size: int = 4
    lr: float = 1e-5
    block_size: int = 0  # tokens per block (0: the context)


@dataclass(frozen=True)
class PretrainSettings(TaskSettings):
    """A ``pretrain.py`` run: the ``corpus`` (``corpus_format``: ``read_corpus``'s ``fmt``), the share
    of blocks held out, and the attention the model trains with; the block size is
    ``data.max_length`` (0: the context); ``qat`` (int8 / int4) trains it quantisation-aware
    (``methods.qat``)."""

    corpus: str = ""
    corpus_format: str = "auto"
    held_out_fraction: float = 0.05
    attention: SparseAttention = field(default_factory=SparseAttention)
    qat: str = "none"


def pretrain_before_fine_tuning(
    model: nn.Module, tokenizer: Any, settings: TaskSettings, pretraining: CorpusPretraining, device: torch.device,
    output_dir: str | Path, trainable_only: bool = False,
) -> dict[str, Any]:
    """A task's ``pretraining`` step: pretraining with the task's engine settings but the
    pretraining's epochs, batch size and lr, in ``<output_dir>/pretrain`` (so ``--resume``
    resumes it too). With LoRA only the adapters train, as in the fine-tuning after it."""
    cfg = train_config(settings, device, Path(output_dir) / "pretrain", epochs=pretraining.epochs, lr=pretraining.lr,
                       save_trainable_only=trainable_only)
    return pretrain_lm(model, tokenizer, pretraining.corpus, cfg, batch_size=pretraining.batch_size,
                       block_size=pretraining.block_size, limit=settings.data.limit,
                       num_workers=settings.data.num_workers, corpus_format=pretraining.corpus_format)


def run_pretraining(settings: PretrainSettings) -> dict[str, Any]:
    """``pretrain.py``: pretrain the ``model_size`` model on ``corpus`` and save it as
    ``<run folder>/model.pt``; returns the best held-out metrics."""
    out_dir = open_task_run(settings, default_output_dir("pretrain", Path(settings.corpus).stem), trains=True)
    device = start(settings)
    model, tokenizer = build_body(settings.model, hidden_dropout_prob=settings.model.hidden_dropout_prob)
    apply_sparse_attention(model, settings.attention)
    if settings.run.load:  # continue from a model an earlier run saved (model.pt)
        model = restore_task_model(settings.run.load).model
    check_context(model.config.max_position_embeddings, max_length=settings.data.max_length)  # not cut silently
    apply_qat(model, settings.qat)
    cfg = train_config(settings, device, out_dir)
    data = settings.data
    best = pretrain_lm(model, tokenizer, settings.corpus, cfg, batch_size=data.batch_size, block_size=data.max_length,
                       held_out_fraction=settings.held_out_fraction, limit=data.limit, num_workers=data.num_workers,
                       corpus_format=settings.corpus_format)
    remove_qat(model)  # float weights, whose --quantize rounding is what the QAT forward used
    save_model(model, Path(out_dir) / "model.pt", corpus=settings.corpus, **attention_fields(model))
    if "loss" in best:
        print(f"best held-out {best}; weights in {Path(out_dir) / 'model.pt'}")
    else:  # no epoch was scored: say so rather than print a "best" of nothing
        print(f"no held-out text (the corpus fills one block, or --held_out_fraction is 0), so no epoch was scored; "
              f"the last epoch's weights in {Path(out_dir) / 'model.pt'}")
    return best


__all__ = ["EOS_TEXT", "CorpusPretraining", "PretrainSettings", "causal_lm_loss", "corpus_blocks", "fine_tune_lm",
           "held_out_loss", "pretrain_before_fine_tuning", "pretrain_lm", "read_corpus", "run_pretraining",
           "sonnet_features", "split_held_out"]
