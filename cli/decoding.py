"""The flags of every command that decodes: the weights decoding multiplies by."""

from __future__ import annotations

import argparse

from decoding.quant import QUANTIZE_CHOICES


def add_inference_args(parser: argparse.ArgumentParser) -> None:
    """``--quantize`` (``decoding.inference.prepare_for_decoding`` acts on it)."""
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES, default="none",
                        help="decode with weight-only bf16, int8 (per-row scales) or int4 "
                             "(groups of 128, CPU only); none: float32 as trained")
