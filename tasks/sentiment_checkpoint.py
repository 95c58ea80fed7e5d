"""A trained sentiment classifier rebuilt from its checkpoint alone: what a KD teacher and an
ensemble member need.

A ``classifier.py`` checkpoint (``best.pt``, ``last.pt``) holds the run's flags (``extra["args"]``),
its ``dataset``, ``num_labels`` and ``fine_tune`` (the ``FineTuneConfig``), and the weights (all of
them, or only the trainable ones of a frozen-body or LoRA run, whose frozen body is rebuilt from the
same weights or the same seed). ``load_classifier`` rebuilds the model the way ``tasks.sentiment``
built it, so adapters are where the weights expect them, then loads the weights.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from engine.checkpoints import load_checkpoint, load_checkpoint_weights
from engine.rng import seed_everything
from methods.fine_tune import FineTuneConfig, set_fine_tune_mode
from models.heads import GPT2SentimentClassifier, pooling_of
from models.loading import CheckpointError
from tasks.common import build_body
from tasks.settings import ModelSettings, fine_tune_from_flags, from_flags


@dataclass
class LoadedClassifier:
    """A rebuilt classifier (eval mode, on the device asked) with what its run knew."""

    model: GPT2SentimentClassifier
    tokenizer: Any
    flags: dict[str, Any]  # the run's command-line values (its checkpoints' ``extra["args"]``)
    dataset: str | None
    num_labels: int
    path: Path


def load_classifier(path: str | Path, device: str | torch.device = "cpu",
                    check: Callable[[Mapping[str, Any]], None] | None = None) -> LoadedClassifier:
    """Rebuild a ``classifier.py`` checkpoint's model and load its weights. A checkpoint of
    another kind (no saved args / num_labels) is a ``CheckpointError`` naming what to pass;
    ``check(extra)`` may refuse one trained on another task (raise ``CheckpointError``) before
    any model is built."""
    ckpt = load_checkpoint(path, device)
    extra = ckpt.get("extra", {})
    if "args" not in extra or "num_labels" not in extra:
        raise CheckpointError(f"{path}: not a classifier.py checkpoint (no saved args / num_labels); "
                              "pass runs/classifier/<mode>-<dataset>/<run>/best.pt")
    if check is not None:
        check(extra)
    flags = dict(extra["args"])
    seed_everything(flags["seed"])  # a frozen random-init body is rebuilt from the run's seed
    model_settings = replace(from_flags(ModelSettings, flags), compile=False)
    gpt, tokenizer = build_body(model_settings)  # as the run built it
    model = GPT2SentimentClassifier(gpt, extra["num_labels"], model_settings.hidden_dropout_prob, pooling_of(extra))
    # Checkpoints written before the config was saved carry only the flags (maybe without --use_dora).
    fine_tune = FineTuneConfig.from_dict(extra["fine_tune"]) if "fine_tune" in extra else fine_tune_from_flags(flags)
    set_fine_tune_mode(model, fine_tune, model.head)
    load_checkpoint_weights(model, ckpt, path, fits="the classifier its saved flags build")
    return LoadedClassifier(model.to(device).eval(), tokenizer, flags, extra.get("dataset"),
                            int(extra["num_labels"]), Path(path))


__all__ = ["LoadedClassifier", "load_classifier"]
