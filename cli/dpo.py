"""The DPO flags every task that preference-tunes shares (``--dpo``, ``--dpo_beta``): the sonnet
task adds its pair-making flags to the group, the paraphrase task uses them as they are."""

from __future__ import annotations

import argparse

from cli.validation import positive_float
from methods.dpo import DEFAULT_BETA


def add_dpo_args(parser: argparse.ArgumentParser, title: str, dpo_help: str) -> argparse._ArgumentGroup:
    """A ``title`` group holding ``--dpo`` (``dpo_help``: what it trains on in this task) and
    ``--dpo_beta``; returned so that a task can add its own DPO flags beside them."""
    g = parser.add_argument_group(title)
    g.add_argument("--dpo", action="store_true", help=dpo_help)
    g.add_argument("--dpo_beta", type=positive_float, default=DEFAULT_BETA,
                   help="how far the policy may leave the reference")
    return g


__all__ = ["add_dpo_args"]
