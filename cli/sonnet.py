"""The command line of a sonnet run (``sonnet_generation.py``) and its reading into
``tasks.sonnet.SonnetSettings``.

The decoding flags keep their names, defaults and meanings; ``--decoding`` selects which of them
make the run's ``GenerationConfig`` (``generation_config``: sample and mbr take the temperature,
top-p and top-k; beam the beams and length penalty; contrastive the degeneration penalty and its
candidates), the one vocabulary ``generate.py`` decodes with too. The config is checked by
``GenerationConfig`` itself while the command line is parsed, as in ``generate.py``.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any

from cli.common import add_common_args, task_settings_from_args
from cli.decoding import add_inference_args
from cli.lm import add_attention_args, add_pretrain_args, attention_from_args, pretraining_from_args
from cli.validation import (
    check_decoding,
    float_in,
    int_in,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
    unit_interval,
)
from decoding.mbr import CONTRASTIVE_K, CandidatePool  # candidates per step when --top_k is not given
from methods.fine_tune import default_lr, mode_names, modes_help
from models.generation_config import GenerationConfig
from tasks.settings import TaskSettings
from tasks.sonnet import SonnetDecoding, SonnetSettings
from tasks.sonnet_dpo import PAIRINGS, RANKINGS, DpoSettings
from tasks.sonnet_eval import EARLY_STOP_METRICS

DECODINGS = ("greedy", "sample", "beam", "contrastive", "mbr")


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The flags of a sonnet run (``sonnet_generation.py``'s command line)."""
    parser = argparse.ArgumentParser(description=description)
    d, dec = SonnetSettings(), SonnetDecoding()
    modes = mode_names(has_head=False)  # SonnetGPT has no head to train alone
    g = parser.add_argument_group("files")
    g.add_argument("--sonnet_path", type=str, default=d.sonnet_path)
    g.add_argument("--held_out_sonnet_path", type=str, default=d.held_out_sonnet_path)
    g.add_argument("--sonnet_out", type=str, default=d.sonnet_out)
    g.add_argument("--dev_held_out_sonnet_path", type=str, default=d.dev_held_out_sonnet_path)
    g.add_argument("--dev_true_sonnet_path", type=str, default=d.dev_true_sonnet_path)
    g.add_argument("--dev_sonnet_out", type=str, default=d.dev_sonnet_out)
    g.add_argument("--fine-tune-mode", dest="fine_tune_mode", choices=modes, default="full-model",
                   help=modes_help(modes))
    g.add_argument("--generate_only", action="store_true", help="decode from --checkpoint without training")
    g.add_argument("--checkpoint", type=str, default=None,
                   help="a saved sonnet model (sonnet-model.pt) or a Trainer checkpoint (best-epochN.pt)")

    g = parser.add_argument_group("decoding")
    g.add_argument("--decoding", choices=DECODINGS, default="sample")
    g.add_argument("--temperature", type=positive_float, default=dec.config.temperature,
                   help="softmax temperature (sample, mbr)")
    g.add_argument("--top_p", type=probability, default=dec.config.top_p, help="nucleus mass (sample, mbr)")
    g.add_argument("--top_k", type=non_negative_int, default=None,
                   help=f"top-k filter (sample, mbr: 0 = off) or contrastive candidates (default {CONTRASTIVE_K})")
    g.add_argument("--num_beams", type=positive_int, default=4)
    g.add_argument("--length_penalty", type=float, default=1.0)
    g.add_argument("--penalty_alpha", type=unit_interval, default=0.6, help="contrastive search degeneration penalty")
    g.add_argument("--contrastive_mean_sim", action="store_true", help="contrastive: mean, not max, similarity")
    g.add_argument("--contrastive_dynamic_alpha", action="store_true", help="contrastive: alpha follows uncertainty")
    g.add_argument("--repetition_penalty", type=positive_float, default=1.0)
    g.add_argument("--no_repeat_ngram_size", type=non_negative_int, default=0)
    g.add_argument("--mbr_candidates", type=positive_int, default=8, help="samples per prompt for MBR selection")
    g.add_argument("--mbr_pool", type=str, default=None, metavar="SPEC",
                   help="mbr: the candidate pool instead of --mbr_candidates samples, e.g. "
                        "beam:4,sample:8,contrastive (strategies greedy, beam, sample, contrastive)")
    g.add_argument("--max_new_tokens", type=positive_int, default=dec.config.max_new_tokens,
                   help="cap on generated tokens per sonnet")
    g.add_argument("--num_lines", type=positive_int, default=dec.num_lines,
                   help="stop a sonnet when it has this many lines")
    g.add_argument("--gen_batch_size", type=positive_int, default=dec.batch_size, help="prompts decoded together")
    g.add_argument("--no_cache", action="store_true", help="decode without the key/value cache (slow; checks)")
    g = parser.add_argument_group("evaluation")
    g.add_argument("--early_stop_metric", choices=sorted(EARLY_STOP_METRICS), default=d.early_stop_metric,
                   help="what picks the best epoch and stops early: dev chrF (higher) or dev sonnet loss (lower)")
    g.add_argument("--train_size", type=float_in(0.0, 1.0, low_open=True), default=d.train_size,
                   help="train on this seeded random fraction of the training sonnets and judge epochs on the "
                        "rest instead of the dev sonnets (1: no split)")

    g = parser.add_argument_group("DPO (preference tuning of a fine-tuned --checkpoint)")
    g.add_argument("--dpo", action="store_true",
                   help="sample --dpo_samples completions per training prompt, rank, pair, train with DPO")
    g.add_argument("--dpo_beta", type=positive_float, default=0.1, help="how far the policy may leave the reference")
    g.add_argument("--dpo_samples", type=int_in(2), default=4, help="sampled completions per training prompt")
    g.add_argument("--dpo_rank", choices=RANKINGS, default="chrf",
                   help="chrf against the true continuation, or form_score (lines, syllables, rhyme)")
    g.add_argument("--dpo_pairs", choices=PAIRINGS, default="best_worst",
                   help="best against worst per prompt, or every differently scored two")
    g.add_argument("--dpo_min_margin", type=non_negative_float, default=0.0,
                   help="pair only candidates whose scores differ by more than this")
    add_common_args(parser, batch_size=8, lr=None, epochs=50, hidden_dropout_prob=0.1, scheduler="linear",
                    warmup_ratio=0.1, patience=3)
    add_attention_args(parser)
    add_pretrain_args(parser)
    add_inference_args(parser)  # --quantize
    parser.set_defaults(save_top_k=3)
    return parser


def parse_args(argv: list[str] | None = None, description: str | None = None) -> argparse.Namespace:
    """The parsed flags, with every check that needs no file or model done (a bad value or
    combination is one usage error line, exit status 2), ``--lr`` defaulted by the fine-tune
    mode and ``--load`` read as ``--checkpoint``."""
    parser = build_parser(description)
    args = parser.parse_args(argv)
    check_decoding(parser, args)
    if args.mbr_pool is not None:
        if args.decoding != "mbr":
            parser.error("--mbr_pool selects among candidates by MBR: add --decoding mbr")
        try:
            CandidatePool.parse(args.mbr_pool)
        except ValueError as e:
            parser.error(f"--mbr_pool: {e}")
    if args.lr is None:
        args.lr = default_lr(args.fine_tune_mode)
    args.checkpoint = args.checkpoint or args.load  # the shared --load names the same thing here
    if args.generate_only and not args.checkpoint:
        parser.error("--generate_only needs --checkpoint PATH")
    if args.dpo and (not args.checkpoint or args.generate_only or args.pretrain_corpus or args.random_init
                     or args.epochs == 0):
        parser.error("--dpo tunes a fine-tuned model: give --checkpoint PATH (a sonnet-model.pt) and --epochs >= 1, "
                     "and no --generate_only, --pretrain_corpus or --random_init")
    try:
        generation_config(args, args.decoding)
    except ValueError as e:  # a combination GenerationConfig refuses (e.g. dynamic alpha with --penalty_alpha 1)
        parser.error(f"--{e}")
    return args


def generation_config(args: argparse.Namespace, decoding: str) -> GenerationConfig:
    """The ``GenerationConfig`` of ``decoding`` (a ``--decoding`` choice) and the flags that apply to
    it; EOS and the stop rule come with the tokenizer (``tasks.sonnet.SonnetDecoding.generation``)."""
    kw: dict[str, Any] = dict(max_new_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty,
                              no_repeat_ngram_size=args.no_repeat_ngram_size, use_cache=not args.no_cache)
    if decoding in ("sample", "mbr"):
        kw.update(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k or 0)
    if decoding == "mbr":  # what beam and contrastive members of an --mbr_pool use
        kw.update(length_penalty=args.length_penalty, penalty_alpha=args.penalty_alpha,
                  contrastive_mean_sim=args.contrastive_mean_sim,
                  contrastive_dynamic_alpha=args.contrastive_dynamic_alpha)
    elif decoding == "beam":
        kw.update(num_beams=args.num_beams, length_penalty=args.length_penalty)
    elif decoding == "contrastive":
        kw.update(penalty_alpha=args.penalty_alpha, top_k=args.top_k if args.top_k is not None else CONTRASTIVE_K,
                  contrastive_mean_sim=args.contrastive_mean_sim,
                  contrastive_dynamic_alpha=args.contrastive_dynamic_alpha)
    return GenerationConfig(**kw)


def candidate_pool(args: argparse.Namespace) -> CandidatePool:
    """The MBR candidate pool: ``--mbr_pool`` (e.g. ``beam:4,sample:8,contrastive``), else
    ``--mbr_candidates`` samples."""
    if args.mbr_pool:
        return CandidatePool.parse(args.mbr_pool)
    return CandidatePool((("sample", args.mbr_candidates),))


def describe(args: argparse.Namespace) -> str:
    """The decoding strategy and the settings that apply to it, as given, for logs."""
    keys = {"sample": ("temperature", "top_p", "top_k"), "mbr": ("temperature", "top_p", "top_k"),
            "beam": ("num_beams", "length_penalty"), "contrastive": ("penalty_alpha", "top_k"), "greedy": ()}
    shown = {"mbr_pool": str(candidate_pool(args))} if args.decoding == "mbr" else {}
    shown.update({k: getattr(args, k) for k in keys[args.decoding] if getattr(args, k) is not None})
    if args.decoding == "contrastive":
        shown.setdefault("top_k", CONTRASTIVE_K)
        shown.update({k: True for k in ("contrastive_mean_sim", "contrastive_dynamic_alpha") if getattr(args, k)})
    for k, neutral in (("repetition_penalty", 1.0), ("no_repeat_ngram_size", 0)):
        if getattr(args, k) != neutral:
            shown[k] = getattr(args, k)
    return " ".join([args.decoding, *(f"{k}={v}" for k, v in shown.items())])


def decoding_from_args(args: argparse.Namespace) -> SonnetDecoding:
    """The run's decoding: ``--decoding``'s ``GenerationConfig``, its MBR pool, ``--num_lines``,
    ``--gen_batch_size``."""
    return SonnetDecoding(config=generation_config(args, args.decoding),
                          pool=candidate_pool(args) if args.decoding == "mbr" else None,
                          num_lines=args.num_lines, batch_size=args.gen_batch_size, label=describe(args))


def dpo_from_args(args: argparse.Namespace) -> DpoSettings | None:
    """The ``--dpo_*`` flags (None without ``--dpo``); candidates are sampled with the sampling
    flags, whatever ``--decoding`` says (pairs need different completions)."""
    if not args.dpo:
        return None
    return DpoSettings(generation_config(args, "sample"), samples=args.dpo_samples, rank=args.dpo_rank,
                       pairs=args.dpo_pairs, min_margin=args.dpo_min_margin, beta=args.dpo_beta)


STRUCTURED = ("decoding", "attention", "pretraining", "dpo")  # SonnetSettings fields read from several flags


def settings_from_args(args: argparse.Namespace) -> SonnetSettings:
    """The run's typed settings from its parsed flags (``parse_args``)."""
    shared = {f.name for f in fields(TaskSettings)}
    own = {f.name: getattr(args, f.name) for f in fields(SonnetSettings) if f.name not in {*shared, *STRUCTURED}}
    return task_settings_from_args(args, SonnetSettings, decoding=decoding_from_args(args),
                                   attention=attention_from_args(args), pretraining=pretraining_from_args(args),
                                   dpo=dpo_from_args(args), **own)


__all__ = ["CONTRASTIVE_K", "DECODINGS", "build_parser", "candidate_pool", "decoding_from_args", "describe",
           "dpo_from_args", "generation_config", "parse_args", "settings_from_args"]
