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
also runs before fine-tuning), its flags and their reading into ``tasks.lm.PretrainSettings``
``cli.lm``'s; this file only parses and calls.
"""

from __future__ import annotations

from typing import Any

from cli.common import run_main
from cli.lm import build_pretrain_parser, pretrain_settings_from_args
from tasks.lm import run_pretraining


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = build_pretrain_parser(__doc__.split("\n\n")[0]).parse_args(argv)
    return run_pretraining(pretrain_settings_from_args(args))


if __name__ == "__main__":
    run_main(main)
