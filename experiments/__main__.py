"""``python -m experiments seeds|ensemble|sweep|plot|quantize ...``; ``--help`` on each says what it does.
The task's flags (seeds, sweep) follow a lone ``--``. Bad input ends in one ``error:`` line and
exit status 2, before any training."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import experiments
from cli.common import run_main
from cli.defaults import DefaultsHelpFormatter
from experiments import ensemble, plot, quantize, seeds, sweep
from experiments.launch import ExperimentError, split_task_argv

COMMANDS = {"seeds": seeds, "ensemble": ensemble, "sweep": sweep, "plot": plot, "quantize": quantize}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments", description=experiments.__doc__,
                                     formatter_class=DefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        doc = module.__doc__ or ""
        p = sub.add_parser(name, help=doc.split("\n")[0], description=doc,
                           formatter_class=DefaultsHelpFormatter)
        module.add_args(p)
    return parser


def main(argv: Sequence[str] | None = None) -> Any:
    """Parse and run one command; ``ExperimentError`` becomes one error line and exit status 2."""
    own, task_argv = split_task_argv(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(own)
    if task_argv and args.command in ("ensemble", "plot", "quantize"):
        build_parser().error(f"{args.command} takes no task flags after --")
    try:
        return COMMANDS[args.command].main(args, task_argv)
    except ExperimentError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    run_main(main)
