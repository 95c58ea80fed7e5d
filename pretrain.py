"""Continued causal-LM pretraining of GPT-2 on a plain-text corpus (e.g. poems
before sonnet fine-tuning), through the shared training engine.

The corpus is read as one token stream: a plain-text file as it is (write
``<|endoftext|>`` between documents if it has several), a Poetry Foundation CSV
(``Title,Poem,Poet,Tags``, multi-line quoted poems) as its poems joined by that
token (``--corpus_format auto|csv|text``; auto means csv for a ``.csv`` name).
It is cut into blocks of the context length, and the model learns next-token
prediction on them; a small tail of blocks is held out so that the best epoch
is picked by held-out loss. Resume, checkpoints and logs are the Trainer's
(``--resume`` continues from ``<output_dir>/last.pt``).

    python pretrain.py --corpus data/sonnets.txt --model_size gpt2 --epochs 10 --batch_size 4
    python pretrain.py --corpus PoetryFoundationData.csv --model_size gpt2 --epochs 1

The task is ``tasks.lm`` (``pretrain_lm``, which ``sonnet_generation.py --pretrain_corpus``
also runs before fine-tuning); this file only parses and calls.
"""

from __future__ import annotations

import argparse
from typing import Any

from cli.common import add_common_args, run_main
from cli.validation import unit_fraction
from tasks.lm import add_attention_args, add_corpus_format_arg, run_pretraining


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=str, required=True,
                        help="plain-text corpus, or a Poetry Foundation CSV (Title,Poem,Poet,Tags)")
    add_corpus_format_arg(parser)
    parser.add_argument("--held_out_fraction", type=unit_fraction, default=0.05)
    add_common_args(parser, batch_size=4, lr=1e-5, epochs=10, hidden_dropout_prob=0.1)
    add_attention_args(parser)
    args = parser.parse_args(argv)
    return run_pretraining(args)

if __name__ == "__main__":
    run_main(main)
