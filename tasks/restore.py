"""A trained model back from whatever a run wrote: ``restore_task_model`` is the one way scripts,
tasks, distillation, experiments and benchmarks get one, so every file kind is read, checked and
refused in one place and a bad file reads the same whoever asked for it.

What a run writes, and the ``task`` that reads it:

- ``model``: a GPT-2 body a task script saved (``methods.restore.save_model``: ``model.pt`` of
  ``pretrain.py``, ``sonnet-model.pt``, ``paraphrase-model.pt``); a Trainer checkpoint is refused
  with the name of the file to pass. ``random_init``: its architecture with fresh weights.
- ``body``: a GPT-2 body from anything that holds a whole one: such a file, a Trainer checkpoint
  with every weight (a task head's ``gpt.`` keys), or a Hugging Face folder / hub id
  (``generate.py --model``).
- ``classifier``: a ``classifier.py`` Trainer checkpoint (``best.pt``, ``last.pt``), rebuilt from
  the flags it saved (``extra["args"]``) the way the run built it, so adapters are where the
  weights (all of them, or only the trainable ones) expect them: a KD teacher, an ensemble member.
- ``paraphrase``: the ``ClozeParaphraseScorer`` of a ``paraphrase_detection.py`` model file.
- ``sonnet``: the ``SonnetGPT`` of a ``sonnet-model.pt``, or of a Trainer checkpoint of a run
  with ``settings``' model size and fine-tune mode (``best-epochN.pt``, ``last.pt``).

``methods.restore`` keeps the mechanics of a saved body (its file format, its attention and
prefix); this module decides which file a caller may pass and what it becomes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.checkpoints import load_checkpoint, load_checkpoint_weights
from engine.rng import seed_everything
from errors import CheckpointError
from methods.fine_tune import FineTuneConfig, set_fine_tune_mode
from methods.restore import load_model, rebuild_model
from methods.sparse_attention import SparseAttention, apply_sparse_attention
from models.gpt2 import GPT2Model
from models.heads import ClozeParaphraseScorer, GPT2SentimentClassifier, pooling_of
from models.loading import load_tokenizer
from models.sonnet_gpt import SonnetGPT
from tasks.common import build_body, build_task_model
from tasks.settings import ModelSettings, TaskSettings, fine_tune_from_flags, from_flags

TASKS = ("model", "body", "classifier", "paraphrase", "sonnet")


@dataclass
class RestoredModel:
    """A restored model with what its file told: the tokenizer (the run's for a classifier, else
    ``settings``' when they were given), the run's flags, and a classifier's dataset and labels."""

    model: nn.Module
    path: Path
    tokenizer: Any = None
    flags: dict[str, Any] = field(default_factory=dict)  # a classifier run's command-line values
    dataset: str | None = None
    num_labels: int | None = None


def sonnet_head(attention: SparseAttention) -> Callable[[Any], SonnetGPT]:
    """``tasks.common.build_task_model``'s head for the sonnet task, shared by building and
    restoring: the body under ``attention`` (given before the fine-tune mode: a prefix needs
    dense attention), as a ``SonnetGPT``."""
    return lambda gpt: SonnetGPT(apply_sparse_attention(gpt, attention))


def restore_task_model(path: str | Path, task: str = "model", settings: TaskSettings | None = None, *,
                       device: str | torch.device = "cpu",
                       check: Callable[[Mapping[str, Any]], None] | None = None, random_init: bool = False,
                       **config_overrides: Any) -> RestoredModel:
    """The ``task`` model (see ``TASKS`` and the module's docstring) that ``path`` holds, its
    tensors read onto ``device``. ``settings``: the current run's (its tokenizer; for ``sonnet``
    also the model a Trainer checkpoint must fit, required). ``check(extra)`` may refuse a
    classifier trained on another task (raise ``CheckpointError``) before any model is built.
    ``config_overrides`` change fields of a saved body's config that do not touch the weights
    (e.g. ``hidden_dropout_prob`` for a model trained further). A file of another kind is one
    ``CheckpointError`` naming what to pass."""
    if task == "classifier":
        return _classifier(path, device, check)
    if task == "body":
        return RestoredModel(_any_body(path, device), Path(path))
    if task == "sonnet":
        if settings is None:
            raise ValueError("restoring a sonnet model needs the run's settings")
        return _sonnet(path, settings)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    model: nn.Module = load_model(path, map_location=device, random_init=random_init, **config_overrides)
    if task == "paraphrase":
        model = ClozeParaphraseScorer(model)
    tokenizer = None if settings is None else load_tokenizer(settings.model.tokenizer)
    return RestoredModel(model, Path(path), tokenizer)


def _any_body(spec: str | Path, device: str | torch.device) -> GPT2Model:
    """A GPT2Model from a saved model file, a Trainer checkpoint with every weight, or a Hugging
    Face folder / hub id."""
    if not Path(spec).is_file():
        return GPT2Model.from_pretrained(spec)
    ckpt = load_checkpoint(spec, device)
    if "config" in ckpt:  # a saved model: built from the file already read
        return rebuild_model(ckpt["config"], ckpt["model"], ckpt.get("extra"))
    if "model" not in ckpt or "model_config" not in ckpt:
        raise CheckpointError(f"{spec}: neither a saved model, a Trainer checkpoint nor a Hugging Face folder")
    if ckpt.get("trainable_only", False):
        raise CheckpointError(f"{spec} holds only the trained parameters (LoRA, prefix, ReFT or a frozen body); "
                              "pass the model file the run saved (e.g. sonnet-model.pt)")
    state = {k.removeprefix("gpt."): v for k, v in ckpt["model"].items()}
    try:
        return rebuild_model(ckpt["model_config"], state, ckpt.get("extra"))
    except RuntimeError as e:
        raise CheckpointError(f"{spec}: not a plain GPT-2 language model ({str(e).splitlines()[0]})") from e


def _classifier(path: str | Path, device: str | torch.device,
                check: Callable[[Mapping[str, Any]], None] | None) -> RestoredModel:
    """A ``classifier.py`` checkpoint's model rebuilt from its saved flags, its weights loaded, in
    eval mode on ``device``."""
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
    return RestoredModel(model.to(device).eval(), Path(path), tokenizer, flags, extra.get("dataset"),
                         int(extra["num_labels"]))


def _sonnet(path: str | Path, settings: TaskSettings) -> RestoredModel:
    """A sonnet model file (a plain GPT-2) or a Trainer checkpoint of a run with ``settings``'
    model size and fine-tune mode, rebuilt with them."""
    ckpt = load_checkpoint(path)
    if "config" in ckpt:  # a saved model: built from the file already read
        gpt = rebuild_model(ckpt["config"], ckpt["model"], ckpt.get("extra"))
        return RestoredModel(SonnetGPT(gpt), Path(path), load_tokenizer(settings.model.tokenizer))
    if "model" not in ckpt:
        raise CheckpointError(f"{path}: neither a saved sonnet model nor a Trainer checkpoint")
    model, tokenizer, _ = build_task_model(settings, sonnet_head(settings.attention),
                                           hidden_dropout_prob=settings.model.hidden_dropout_prob)
    load_checkpoint_weights(model, ckpt, path, fits=f"--model_size {settings.model.model_size} --fine-tune-mode "
                                                    f"{settings.fine_tune.mode}")
    return RestoredModel(model, Path(path), tokenizer)


__all__ = ["TASKS", "RestoredModel", "restore_task_model", "sonnet_head"]
