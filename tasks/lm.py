"""Causal-LM training on text: continued pretraining on a plain-text corpus (``pretrain.py``,
and ``sonnet_generation.py --pretrain_corpus``) and fine-tuning on a list of texts (the
sonnets), with one loss, ``causal_lm_loss``, through the shared engine.

Pretraining reads the corpus as one token stream (a plain-text file as it is: write
``<|endoftext|>`` between documents if it has several; a Poetry Foundation CSV as its poems
joined by that token, ``--corpus_format``), cuts it into blocks of the context length, and holds out a small tail of
blocks so that the best epoch is picked by held-out loss. Resume, checkpoints and logs are
the Trainer's (``--resume`` continues from ``<output_dir>/last.pt``). The flags for sparse
attention (``add_attention_args``) and for pretraining before fine-tuning
(``add_pretrain_args``) are defined here once and shared by both scripts.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cli.common import build_from_args, default_output_dir, open_run, train_config_from_args
from cli.validation import non_negative_int, positive_float, positive_int
from config import ATTENTION_PATTERNS
from engine.checkpoints import load_model, save_model
from engine.data import DataFormatError, PadCollator, encode, make_loader, read_text
from engine.trainer import EvalFn, TrainConfig, Trainer, count_lm_targets
from models.heads import SonnetGPT
from tasks.common import fit_task, start
from tasks.poetry_corpus import FORMATS, is_poetry_csv, read_documents

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
    """Mean next-token cross-entropy over the real tokens of a batch (``SonnetGPT.loss``)."""
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
                       num_workers=num_workers, extra={"corpus": str(corpus)}, count_fn=count_lm_targets)
    return best


# ----------------------------------------------------------------- flags


def add_attention_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Sparse-attention flags (see modules/attention.py); weights are unaffected."""
    g = parser.add_argument_group("sparse attention")
    g.add_argument("--attn_pattern", choices=ATTENTION_PATTERNS, default="dense")
    g.add_argument("--attn_window", type=positive_int, default=256, help="local window (window, strided)")
    g.add_argument("--attn_block", type=positive_int, default=64, help="block size (block_global)")
    g.add_argument("--attn_num_global", type=non_negative_int, default=1, help="leading global tokens (block_global)")
    g.add_argument("--attn_stride", type=non_negative_int, default=0,
                   help="strided: 0 = LogSparse (2^k), s = multiples of s")
    g.add_argument("--attn_sparse_impl", choices=("blockwise", "mask"), default="blockwise")
    return parser


def attention_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """GPT2Config fields from the sparse-attention flags (those the parser defined)."""
    keys = ("attn_pattern", "attn_window", "attn_block", "attn_num_global", "attn_stride", "attn_sparse_impl")
    return {k: getattr(args, k) for k in keys if hasattr(args, k)}


def add_pretrain_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--pretrain_corpus`` and its epochs/batch/lr, for a task script that pretrains first."""
    g = parser.add_argument_group("causal-LM pretraining before fine-tuning")
    g.add_argument("--pretrain_corpus", type=str, default=None,
                   help="plain-text corpus or Poetry Foundation CSV (Title,Poem,Poet,Tags)")
    add_corpus_format_arg(g, "--pretrain_corpus_format")
    g.add_argument("--pretrain_epochs", type=non_negative_int, default=10)
    g.add_argument("--pretrain_batch_size", type=positive_int, default=4)
    g.add_argument("--pretrain_lr", type=positive_float, default=1e-5)
    g.add_argument("--pretrain_block_size", type=non_negative_int, default=0, help="tokens per block (0: the context)")
    return parser


def add_corpus_format_arg(group: Any, flag: str = "--corpus_format") -> None:
    """The corpus-format flag of ``pretrain.py`` and of ``--pretrain_corpus``."""
    group.add_argument(flag, choices=FORMATS, default="auto",
                       help="csv: a Poetry Foundation CSV, its poems joined by <|endoftext|>; text: the file as "
                            "it is; auto: csv for a .csv name")


def pretrain_from_args(
    model: nn.Module, tokenizer: Any, args: argparse.Namespace, device: torch.device, output_dir: str | Path,
    trainable_only: bool = False,
) -> dict[str, Any]:
    """``--pretrain_corpus`` for a task script: pretraining with the task's engine flags
    but ``--pretrain_epochs/_batch_size/_lr``, in ``<output_dir>/pretrain`` (so ``--resume``
    resumes it too). With LoRA only the adapters train, as in the fine-tuning after it."""
    cfg = train_config_from_args(args, device, epochs=args.pretrain_epochs, lr=args.pretrain_lr,
                                 output_dir=str(Path(output_dir) / "pretrain"), save_trainable_only=trainable_only)
    return pretrain_lm(model, tokenizer, args.pretrain_corpus, cfg, batch_size=args.pretrain_batch_size,
                       block_size=args.pretrain_block_size, limit=args.limit, num_workers=args.num_workers,
                       corpus_format=getattr(args, "pretrain_corpus_format", "auto"))


def run_pretraining(args: argparse.Namespace) -> dict[str, Any]:
    """``pretrain.py``: pretrain the ``--model_size`` model on ``--corpus`` and save it as
    ``<output_dir>/model.pt``; returns the best held-out metrics."""
    args.output_dir = str(open_run(args, default_output_dir("pretrain", Path(args.corpus).stem), trains=True))
    device = start(args)
    model, tokenizer = build_from_args(args, hidden_dropout_prob=args.hidden_dropout_prob, **attention_overrides(args))
    if args.load:  # continue from a model an earlier run saved (model.pt)
        model = load_model(args.load)
    cfg = train_config_from_args(args, device)
    best = pretrain_lm(model, tokenizer, args.corpus, cfg, batch_size=args.batch_size, block_size=args.max_length,
                       held_out_fraction=args.held_out_fraction, limit=args.limit, num_workers=args.num_workers,
                       corpus_format=args.corpus_format)
    save_model(model, Path(args.output_dir) / "model.pt", corpus=args.corpus)
    print(f"best held-out {best}; weights in {Path(args.output_dir) / 'model.pt'}")
    return best

