"""The command line of ``demo.py`` and its reading into ``DemoSettings``."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from cli.defaults import RawTextDefaultsHelpFormatter
from cli.validation import seed_int


@dataclass(frozen=True)
class DemoSettings:
    """A demo server: the ``model`` selected first (None: the newest sonnet run's under ``runs``), the
    address it listens on (``host``, ``port``), the ``tokenizer``, the ``device`` and the ``seed`` that
    sampling starts from for each sonnet (as ``generate.py --seed``)."""

    model: str | None = None
    runs: str = "runs/sonnet"
    host: str = "127.0.0.1"
    port: int = 7860
    tokenizer: str | None = None
    device: str = "auto"
    seed: int = 11711


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """``demo.py``'s flags."""
    p = argparse.ArgumentParser(prog="demo.py", description=description, formatter_class=RawTextDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="the model to select first: a sonnet run folder (or its latest), "
                   "a model file (sonnet-model.pt, best.pt of a full-model run) or a Hugging Face folder "
                   "(default: the newest sonnet run's sonnet-model.pt under --runs)")
    p.add_argument("--runs", default="runs/sonnet", help="where the page looks for sonnet runs to offer")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface; the page "
                   "has no login, so only on a trusted network)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--tokenizer", default=None, help="GPT-2 tokenizer folder (vocab.json + merges.txt)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=seed_int, default=11711, help="seeds sampling, for each sonnet afresh")
    return p


def parse_settings(argv: list[str] | None = None, description: str | None = None) -> DemoSettings:
    args = build_parser(description).parse_args(argv)
    return DemoSettings(model=args.model, runs=args.runs, host=args.host, port=args.port, tokenizer=args.tokenizer,
                        device=args.device, seed=args.seed)


__all__ = ["DemoSettings", "build_parser", "parse_settings"]
