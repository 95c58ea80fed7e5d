"""The flags of the causal-LM runs, defined once for both scripts that train one: sparse attention
(``add_attention_args``) and the corpus format (``pretrain.py`` and ``sonnet_generation.py``),
pretraining before fine-tuning (``add_pretrain_args``: ``sonnet_generation.py --pretrain_corpus``),
and ``pretrain.py``'s command line, read into ``tasks.lm.PretrainSettings``."""

from __future__ import annotations

import argparse
from typing import Any

from cli.common import add_common_args, task_settings_from_args
from cli.defaults import DefaultsHelpFormatter
from cli.validation import non_negative_int, positive_float, positive_int, unit_fraction
from methods.qat import QAT_CHOICES
from methods.sparse_attention import ATTENTION_PATTERNS, SparseAttention
from tasks.lm import CorpusPretraining, PretrainSettings
from tasks.poetry_corpus import FORMATS


def add_attention_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Sparse-attention flags (see methods/sparse_attention.py); weights are unaffected."""
    g = parser.add_argument_group("sparse attention")
    g.add_argument("--attn_pattern", choices=ATTENTION_PATTERNS, default="dense")
    g.add_argument("--attn_window", type=positive_int, default=256, help="local window (window, strided)")
    g.add_argument("--attn_block", type=positive_int, default=64, help="block size (block_global)")
    g.add_argument("--attn_num_global", type=non_negative_int, default=1, help="leading global tokens (block_global)")
    g.add_argument("--attn_stride", type=non_negative_int, default=0,
                   help="strided: 0 = LogSparse (2^k), s = multiples of s")
    g.add_argument("--attn_sparse_impl", choices=("blockwise", "mask"), default="blockwise")
    return parser


def attention_from_args(args: argparse.Namespace) -> SparseAttention:
    """The attention of the sparse-attention flags (those the parser defined; dense without them),
    which ``apply_sparse_attention`` gives a built model: the flags win over a saved model's."""
    return SparseAttention.from_fields(vars(args))


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


def pretraining_from_args(args: argparse.Namespace) -> CorpusPretraining:
    """The ``--pretrain_*`` flags (``add_pretrain_args``)."""
    return CorpusPretraining(corpus=args.pretrain_corpus, corpus_format=args.pretrain_corpus_format,
                             epochs=args.pretrain_epochs, batch_size=args.pretrain_batch_size, lr=args.pretrain_lr,
                             block_size=args.pretrain_block_size)


def add_corpus_format_arg(group: Any, flag: str = "--corpus_format") -> None:
    """The corpus-format flag of ``pretrain.py`` and of ``--pretrain_corpus``."""
    group.add_argument(flag, choices=FORMATS, default="auto",
                       help="csv: a Poetry Foundation CSV, its poems joined by <|endoftext|>; text: the file as "
                            "it is; auto: csv for a .csv name")


def build_pretrain_parser(description: str | None = None) -> argparse.ArgumentParser:
    """``pretrain.py``'s command line."""
    parser = argparse.ArgumentParser(description=description, formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--corpus", type=str, required=True,
                        help="plain-text corpus, or a Poetry Foundation CSV (Title,Poem,Poet,Tags)")
    add_corpus_format_arg(parser)
    parser.add_argument("--held_out_fraction", type=unit_fraction, default=0.05)
    parser.add_argument("--qat", choices=QAT_CHOICES, default="none",
                        help="quantisation-aware training: the forward uses the weights --quantize int8/int4 "
                             "will store (straight-through gradients); model.pt holds the float weights")
    add_common_args(parser, batch_size=4, lr=1e-5, epochs=10, hidden_dropout_prob=0.1)
    add_attention_args(parser)
    return parser


def pretrain_settings_from_args(args: argparse.Namespace) -> PretrainSettings:
    """A ``pretrain.py`` run's typed settings from its parsed flags."""
    return task_settings_from_args(args, PretrainSettings, corpus=args.corpus, corpus_format=args.corpus_format,
                                   held_out_fraction=args.held_out_fraction, attention=attention_from_args(args),
                                   qat=args.qat)


__all__ = ["add_attention_args", "add_corpus_format_arg", "add_pretrain_args", "attention_from_args",
           "build_pretrain_parser", "pretrain_settings_from_args", "pretraining_from_args"]
