"""Sonnet generation: fine-tune GPT-2 on Shakespeare's sonnets, then complete held-out prompts.

    python sonnet_generation.py --use_gpu                                  # full model, nucleus sampling
    python sonnet_generation.py --fine-tune-mode lora --lr 3e-4            # LoRA on attention and MLP
    python sonnet_generation.py --decoding beam --num_beams 4 --no_repeat_ngram_size 3
    python sonnet_generation.py --generate_only --checkpoint runs/sonnet/full-model-gpt2/sonnet-model.pt --decoding mbr
    python sonnet_generation.py --model_size tiny --random_init --epochs 1 --limit 8 --max_new_tokens 24  # smoke run
    python sonnet_generation.py --checkpoint runs/pretrain/tinyshakespeare/<run>/model.pt --lr 1e-3  # from pretrain.py
    python sonnet_generation.py --dpo --checkpoint runs/sonnet/full-model-gpt2/<run>/sonnet-model.pt --epochs 2 \
        --dpo_samples 4 --dpo_beta 0.1 --dpo_rank chrf                      # DPO on ranked samples

Training: the LM loss over every real token of each sonnet (padding ignored, an EOS
appended so the model learns where a sonnet ends), through the shared Trainer
(warm-up, clipping, early stopping, the top-3 checkpoints by dev chrF). Each epoch the
dev prompts (the first 3 lines of each held-out sonnet) are completed and scored with
sacrebleu chrF against the true sonnets. Then ``predictions/generated_sonnets.txt``
(test prompts) and ``predictions/generated_sonnets_dev.txt`` are written in the
starter's format, and the best model is saved as a plain GPT-2 checkpoint.

Evaluation, each epoch (``metrics.jsonl``): dev chrF, the held-out loss and perplexity of the
whole true dev sonnets (the handout's metric; an EOS appended as in training), and the form of
the generated dev sonnets (``form_*``: lines, syllables per line, rhyme adherence;
``tasks.sonnet_form``). ``--early_stop_metric chrf|loss`` picks the best epoch by either;
``--train_size F`` trains on a seeded random fraction F of the training sonnets and judges
epochs on the rest, so the dev set only scores the final model. The final files' form goes to
``<run>/form.json`` with dev chrF and perplexity. ``--checkpoint`` with training starts from a
saved model (``pretrain.py``'s ``model.pt``); with ``--random_init`` too, from that architecture
with fresh weights. ``--dpo`` preference-tunes a fine-tuned ``--checkpoint`` (``tasks.sonnet_dpo``).

Decoding (``--decoding``): greedy, sample (temperature, top-k, top-p), beam, contrastive
(``--penalty_alpha``, ``--top_k``) or mbr (``--mbr_candidates`` samples, or any pool
such as ``--mbr_pool beam:4,sample:8,contrastive``; keep the candidate with the highest mean
chrF against the others); every sonnet stops at EOS or at
``--num_lines`` lines. The defaults are nucleus sampling with top-p 0.9 and
temperature 1.2, the starter's settings and the best reported for this task.

The task (training, decoding, the run) is ``tasks.sonnet``; this file only parses and calls.
"""

from __future__ import annotations

import argparse
from typing import Any

from cli.common import add_common_args, run_main
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
from decoding.inference import add_inference_args
from decoding.mbr import CandidatePool
from methods.fine_tune import default_lr, mode_names, modes_help
from tasks.lm import add_attention_args, add_pretrain_args
from tasks.sonnet import CONTRASTIVE_K, DECODINGS, run
from tasks.sonnet_dpo import PAIRINGS, RANKINGS
from tasks.sonnet_eval import EARLY_STOP_METRICS


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    modes = mode_names(has_head=False)  # SonnetGPT has no head to train alone
    g = parser.add_argument_group("files")
    g.add_argument("--sonnet_path", type=str, default="data/sonnets.txt")
    g.add_argument("--held_out_sonnet_path", type=str, default="data/sonnets_held_out.txt")
    g.add_argument("--sonnet_out", type=str, default="predictions/generated_sonnets.txt")
    g.add_argument("--dev_held_out_sonnet_path", type=str, default="data/sonnets_held_out_dev.txt")
    g.add_argument("--dev_true_sonnet_path", type=str, default="data/TRUE_sonnets_held_out_dev.txt")
    g.add_argument("--dev_sonnet_out", type=str, default="predictions/generated_sonnets_dev.txt")
    g.add_argument("--fine-tune-mode", dest="fine_tune_mode", choices=modes, default="full-model",
                   help=modes_help(modes))
    g.add_argument("--generate_only", action="store_true", help="decode from --checkpoint without training")
    g.add_argument("--checkpoint", type=str, default=None,
                   help="a saved sonnet model (sonnet-model.pt) or a Trainer checkpoint (best-epochN.pt)")

    g = parser.add_argument_group("decoding")
    g.add_argument("--decoding", choices=DECODINGS, default="sample")
    g.add_argument("--temperature", type=positive_float, default=1.2, help="softmax temperature (sample, mbr)")
    g.add_argument("--top_p", type=probability, default=0.9, help="nucleus mass (sample, mbr)")
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
    g.add_argument("--max_new_tokens", type=positive_int, default=192, help="cap on generated tokens per sonnet")
    g.add_argument("--num_lines", type=positive_int, default=14, help="stop a sonnet when it has this many lines")
    g.add_argument("--gen_batch_size", type=positive_int, default=12, help="prompts decoded together")
    g.add_argument("--no_cache", action="store_true", help="decode without the key/value cache (slow; checks)")
    g = parser.add_argument_group("evaluation")
    g.add_argument("--early_stop_metric", choices=sorted(EARLY_STOP_METRICS), default="chrf",
                   help="what picks the best epoch and stops early: dev chrF (higher) or dev sonnet loss (lower)")
    g.add_argument("--train_size", type=float_in(0.0, 1.0, low_open=True), default=1.0,
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
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command-line entry; also callable as ``main(["--model_size", "tiny", ...])``."""
    return run(get_args(argv))


if __name__ == "__main__":
    run_main(main)
