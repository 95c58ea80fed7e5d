"""Quora paraphrase detection as a cloze question that GPT-2 answers with its own LM head.

    python paraphrase_detection.py --use_gpu                       # full model, lr 1e-5 (the starter's run)
    python paraphrase_detection.py --use_gpu --recipe recommended  # the same, gradients clipped at norm 1
    python paraphrase_detection.py --fine_tune_mode lora --lr 3e-4  # LoRA adapters only
    python paraphrase_detection.py --model_size tiny --random_init --limit 2000 --epochs 2   # offline smoke run

Each pair becomes one prompt (``tasks.course_data.PARAPHRASE_PROMPT``, the same for train, dev
and test) and the answer is read at its last real token as "yes" (8505) or "no" (3919).
Without the course's Quora files (offline), train/dev/test are carved from
``data/quora-minbert-dev.csv`` and a notice says so. Writes
``predictions/para-{dev,test}-output.csv`` in the starter's format (in the run folder; in
``predictions/`` too from a complete run, not one on carved splits: ``tasks.publish``), and the best model as a
plain GPT-2 checkpoint (LoRA merged) that ``tasks.restore.restore_task_model`` reads back.

The task (scoring, the run) is ``tasks.paraphrase``, its flags ``cli.paraphrase``; this file only
parses and calls.
"""

from __future__ import annotations

from typing import Any

from cli.common import run_main
from cli.paraphrase import parse_args, settings_from_args
from tasks.paraphrase import run


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command-line entry; also callable as ``main(["--para_train", "pairs.tsv", ...])``."""
    return run(settings_from_args(parse_args(argv, __doc__.split("\n")[0])))


if __name__ == "__main__":
    run_main(main)
