"""The command line of ``export.py``: a run's model out to ``transformers`` and PEFT (``tasks.export``)."""

from __future__ import annotations

import argparse

from methods.export import push_to_hub
from tasks.export import FORMATS, export_run


def get_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="export.py", description="Export a run's GPT-2 to the Hugging Face format (transformers) or a PEFT "
        "adapter folder.")
    p.add_argument("source", metavar="RUN_OR_CHECKPOINT",
                   help="a run folder (runs/<task>/<mode>-.../<run> or its latest) or one of its files "
                        "(sonnet-model.pt, best.pt, best-epochN.pt, last.pt)")
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to write (new or empty)")
    p.add_argument("--format", choices=FORMATS, default="hf",
                   help="hf: a transformers folder, adapters merged; peft: the LoRA/DoRA adapters as a PEFT "
                        "folder; both: hf in DIR and peft in DIR/adapter (default: hf)")
    p.add_argument("--tokenizer", metavar="DIR", help="GPT-2 tokenizer folder to save with the model "
                   "(default: the run's, else the cached or shared gpt2 one)")
    p.add_argument("--push_to_hub", metavar="REPO", help="then upload DIR to this hub repository")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in DIR")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = get_args(argv)
    found = export_run(args.source, args.out, args.format, args.tokenizer, args.overwrite)
    print(f"exported {found.path} ({args.format}) to {args.out}")
    if args.push_to_hub:
        print(f"pushed to {push_to_hub(args.out, args.push_to_hub)}")
