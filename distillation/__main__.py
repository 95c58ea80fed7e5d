"""``python -m distillation <step>``: the Impossible Distillation pipeline
(contexts -> generate -> filter -> train -> self-distill) and knowledge distillation (kd).

Each step is a module with ``add_args(parser)``, ``DEFAULTS`` (its defaults for the
shared flags of ``cli.common``) and ``run(args, settings)``: its own flags, and the shared
ones read once here into ``tasks.settings.TaskSettings``. This file only parses and dispatches.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cli.common import add_common_args, run_main, task_settings_from_args
from cli.defaults import DefaultsHelpFormatter
from distillation import contexts, filter_step, generate, kd, self_distill, train

STEPS = {
    "contexts": (contexts, "sample short contexts from GPT-2 or read them from a file"),
    "generate": (generate, "sample one-sentence continuations per context (resumable)"),
    "filter": (filter_step, "form and filter candidate paraphrase pairs"),
    "train": (train, "write Quora-format pair files and train the paraphrase models"),
    "self-distill": (self_distill, "the trained student paraphrases, the filters keep the best"),
    "kd": (kd, "knowledge distillation of a sentiment classifier into a small student"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m distillation", description=__doc__,
                                     formatter_class=DefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True, metavar="STEP")
    for name, (module, help_text) in STEPS.items():
        p = sub.add_parser(name, help=help_text, description=module.__doc__,
                           formatter_class=DefaultsHelpFormatter)
        module.add_args(p)
        add_common_args(p, **getattr(module, "DEFAULTS", {}))
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    return STEPS[args.step][0].run(args, task_settings_from_args(args))


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
