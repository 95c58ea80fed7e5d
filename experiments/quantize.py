"""Quantised evaluation: a saved classifier or paraphrase run's dev and test predictions made with
its GPT-2 body quantised as ``generate.py --quantize`` quantises it, and dev accuracy before and after.

    python -m experiments quantize runs/classifier/full-model-sst/<run>/best.pt --quantize int8 --out runs/q/sst
    python -m experiments quantize runs/paraphrase/<run>/paraphrase-model.pt --quantize int4 --out runs/q/para

The checkpoint is rebuilt as ``experiments ensemble`` rebuilds a member (``classifier.py``'s
``best.pt``/``last.pt``, or ``paraphrase_detection.py``'s model file with the flags of the
``last.pt`` beside it), so the data are read and tokenised as its run read them. The body is
prepared by ``decoding.inference.prepare_for_decoding`` (adapters folded in; weight-only bf16,
int8 or int4 linears and tied embedding, GPTQ with ``-gptq``); the classifier's linear head stays
float32. The cloze scorer's two answer logits are products with the answer tokens' rows of the
quantised embedding, as the float scorer reads them from the float one. ``--quantize none``
predicts with the float model: the same prediction files as the run's own.

A separate command and not a flag of ``classifier.py``: a plain classifier run never loads the
decoding wing, and a saved run is evaluated without retraining (as ``classifier.py --epochs 0
--load`` predicts with it). Written to ``--out``: ``predictions/`` in the starter's format (the
run's own file names: ``<mode>-<dataset>-<split>-out.csv``, ``para-<split>-output.csv``),
``quantize.{csv,md}`` (dev metrics of the float32 and the quantised model) and ``quantize.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cli.decoding import add_inference_args
from cli.validation import non_negative_int, positive_int
from decoding.gptq import CALIBRATION_TEXT, GPTQ_CHOICES
from decoding.inference import check_quantize_flag, prepare_for_decoding
from experiments.ensemble import load_members, probabilities, read_split, write_predictions
from experiments.launch import ExperimentError
from experiments.tables import write_tables
from models.heads import ClozeParaphraseScorer
from tasks.metrics import classification_metrics


class QuantizedScorer(ClozeParaphraseScorer):
    """The cloze scorer over a prepared body (``decoding.inference.InferenceModel``): its answer
    logits use the answer rows of the body's input embedding, which a quantised tied embedding
    serves from the head's own bytes (the float scorer reads the same rows of ``wte``)."""

    def answer_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        last_token = self.gpt(input_ids, attention_mask)["last_token"]  # (B, d)
        ids = torch.tensor(self.answer_ids, device=last_token.device)
        return F.linear(last_token, self.gpt.body.wte(ids).to(last_token.dtype))  # (B, 2)


def quantized_copy(model: nn.Module, quantize: str, calibration: str = CALIBRATION_TEXT) -> nn.Module:
    """A copy of a task model (``GPT2SentimentClassifier`` or ``ClozeParaphraseScorer``) whose body
    is prepared for ``quantize``; ``model`` itself is left as it was."""
    model = copy.deepcopy(model).eval()
    body = prepare_for_decoding(model.gpt, quantize, calibration=calibration)
    if isinstance(model, ClozeParaphraseScorer):
        return QuantizedScorer(body).eval()
    model.gpt = body
    return model


def run_quantized(checkpoint: str | Path, out: str | Path, quantize: str = "none", *,
                  calibration: str = CALIBRATION_TEXT, dev: str | None = None, test: str | None = None,
                  prefix: str | None = None, batch_size: int = 32, limit: int | None = None,
                  device: str | torch.device = "cpu") -> dict[str, Any]:
    """Predict dev and test with the quantised model (writing the prediction files), score dev with
    the float one too; returns ``{"dev": {"float32": metrics, quantize: metrics}, "predictions": ...}``."""
    out = Path(out)
    # before the checkpoint loads: int4 off the CPU (the model's width is checked once it is known)
    check_quantize_flag(quantize, torch.device(device))
    if calibration != CALIBRATION_TEXT and quantize not in GPTQ_CHOICES:
        raise ExperimentError(f"--calibration calibrates GPTQ only: it changes nothing with --quantize {quantize}; "
                              f"choose one of {', '.join(GPTQ_CHOICES)} or drop it")
    (member,) = load_members([checkpoint], torch.device(device))
    if prefix is not None and member.task != "classifier":
        raise ExperimentError(f"--prefix names sentiment prediction files: a {member.task} run's files are "
                              "para-<split>-output.csv; drop it")
    fast = replace(member, model=quantized_copy(member.model, quantize, calibration))
    if prefix is None and member.task == "classifier":  # the run's own file names
        prefix = member.settings.flags["fine_tune_mode"]
    result: dict[str, Any] = {"checkpoint": str(checkpoint), "quantize": quantize, "dev": {}, "predictions": {}}
    for split, path in (("dev", dev), ("test", test)):
        rows = read_split(member, split, path, limit)
        if rows is None:
            continue
        preds = probabilities(fast, rows, batch_size, split).argmax(-1).tolist()
        result["predictions"][split] = str(write_predictions(member, split, rows, preds, out / "predictions",
                                                             prefix or "quantized"))
        print(f"wrote {result['predictions'][split]}")
        if split == "dev":
            labels = [r.label for r in rows]
            before = probabilities(member, rows, batch_size, split).argmax(-1).tolist()
            result["dev"] = {"float32": classification_metrics(labels, before),
                             quantize: classification_metrics(labels, preds)}
    if result["dev"]:
        print(dev_line(result["dev"]["float32"], result["dev"][quantize], quantize))
        table = [{"weights": name, **m} for name, m in result["dev"].items()]
        write_tables(table, ["weights", "accuracy", "macro_f1", "matthews_corr"], out / "quantize",
                     f"{member.task}: dev metrics before and after --quantize {quantize} ({checkpoint})")
    (out / "quantize.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out / 'quantize.json'}")
    return result


def dev_line(before: dict[str, float], after: dict[str, float], quantize: str) -> str:
    """The one line a run prints: dev accuracy of the float model, of the quantised one, and the change."""
    change = after["accuracy"] - before["accuracy"]
    return f"dev accuracy {before['accuracy']:.3f} float32 -> {after['accuracy']:.3f} {quantize} ({change:+.3f})"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a classifier.py best.pt/last.pt or a paraphrase_detection.py model file")
    p.add_argument("--out", required=True, help="folder for predictions/, quantize.{csv,md,json}")
    add_inference_args(p)  # --quantize, --calibration (--compile_decode is refused: nothing is decoded)
    p.add_argument("--dev", default=None, help="dev file (default: the one the checkpoint's run used)")
    p.add_argument("--test", default=None, help="test file (default: the one the checkpoint's run used)")
    p.add_argument("--prefix", default=None,
                   help="sentiment prediction files are <prefix>-<dataset>-<split>-out.csv (default: the run's "
                        "fine-tune mode, the course's names)")
    p.add_argument("--batch_size", type=positive_int, default=32)
    p.add_argument("--limit", type=non_negative_int, default=None,
                   help="only the first N examples of each split (default: the run's --limit; 0: all)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1... (int4: cpu only)")


def main(args: argparse.Namespace, task_argv: list[str]) -> dict[str, Any]:
    if args.compile_decode:
        raise ExperimentError("--compile_decode compiles a decoding step; a quantised evaluation decodes nothing")
    return run_quantized(args.checkpoint, args.out, args.quantize, calibration=args.calibration, dev=args.dev,
                         test=args.test, prefix=args.prefix, batch_size=args.batch_size, limit=args.limit,
                         device=args.device)


__all__ = ["QuantizedScorer", "add_args", "dev_line", "main", "quantized_copy", "run_quantized"]
