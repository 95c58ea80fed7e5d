"""Sonnet generation: fine-tune GPT-2 on Shakespeare's sonnets, then complete held-out prompts.

    python sonnet_generation.py --use_gpu                                  # full model, nucleus sampling
    python sonnet_generation.py --use_gpu --recipe recommended             # 50 epochs, early stopping, best epoch
    python sonnet_generation.py --fine-tune-mode lora --lr 3e-4            # LoRA on attention and MLP
    python sonnet_generation.py --decoding beam --num_beams 4 --no_repeat_ngram_size 3
    python sonnet_generation.py --generate_only --decoding mbr \
        --checkpoint runs/sonnet/full-model-gpt2/latest/sonnet-model.pt
    python sonnet_generation.py --model_size tiny --random_init --epochs 1 --limit 8 --max_new_tokens 24  # smoke run
    python sonnet_generation.py --checkpoint runs/pretrain/tinyshakespeare/<run>/model.pt --lr 1e-3  # from pretrain.py
    python sonnet_generation.py --dpo --checkpoint runs/sonnet/full-model-gpt2/latest/sonnet-model.pt --epochs 2 \
        --dpo_samples 4 --dpo_beta 0.1 --dpo_rank chrf                      # DPO on ranked samples

Training: the LM loss over every real token of each sonnet (padding ignored, an EOS
appended so the model learns where a sonnet ends), through the shared Trainer. The defaults
are the starter's (``--recipe starter``): 10 epochs at a constant lr, no clipping, no early
stopping, and the sonnets written by the last epoch's weights (``--generate_from last``);
``--recipe recommended`` trains up to 50 epochs with warm-up and linear decay, clipping and
early stopping (patience 3), and writes with the best epoch's. The top-3 checkpoints by dev
chrF are kept either way. Each epoch the
dev prompts (the first 3 lines of each held-out sonnet) are completed and scored with
sacrebleu chrF against the true sonnets. Then ``predictions/generated_sonnets.txt``
(test prompts) and ``predictions/generated_sonnets_dev.txt`` are written in the
starter's format (in the run folder; in ``predictions/`` too from a run without ``--limit``),
and the model they came from is saved as a plain GPT-2 checkpoint.

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

The task (training, decoding, the run) is ``tasks.sonnet``; the flags and their reading into
``tasks.sonnet.SonnetSettings`` are ``cli.sonnet``'s; this file only parses and calls.
"""

from __future__ import annotations

import argparse
from typing import Any

from cli.common import run_main
from cli.sonnet import parse_args, settings_from_args
from tasks.sonnet import run


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed and checked flags (``cli.sonnet``)."""
    return parse_args(argv, description=__doc__.split("\n")[0])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command-line entry; also callable as ``main(["--model_size", "tiny", ...])``."""
    return run(settings_from_args(get_args(argv)))


if __name__ == "__main__":
    run_main(main)
