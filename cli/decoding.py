"""The flags of every command that decodes: the weights decoding multiplies by."""

from __future__ import annotations

import argparse

from decoding.gptq import CALIBRATION_TEXT, GPTQ_CHOICES
from decoding.quant import QUANTIZE_CHOICES


def add_inference_args(parser: argparse.ArgumentParser) -> None:
    """``--quantize`` and ``--calibration`` (``decoding.inference.prepare_for_decoding`` acts on them),
    ``--compile_decode`` (``decoding.compiled.compile_decoding``)."""
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES + GPTQ_CHOICES, default="none",
                        help="decode with weight-only bf16, int8 (per-row scales) or int4 "
                             "(groups of 128, CPU only), rounded to nearest or, with -gptq, by GPTQ "
                             "on --calibration; none: float32 as trained")
    parser.add_argument("--calibration", type=str, default=CALIBRATION_TEXT,
                        help="plain text whose first 90%% calibrates --quantize int8-gptq / int4-gptq")
    parser.add_argument("--compile_decode", action="store_true",
                        help="static KV cache and a torch.compile'd decoding step (CUDA graphs on a GPU); "
                             "eager with one warning if compilation fails")
