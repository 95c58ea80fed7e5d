"""What a run left, as a model to export (``methods.export``): which file of a run folder to read, and
the model, tokenizer and PEFT base that file gives.

A run folder is read for its final model file (``sonnet-model.pt``, ``paraphrase-model.pt``, ``model.pt``:
adapters already merged) or, where there is none (``classifier.py``) or the adapters are wanted (``--format
peft``/``both``), its best Trainer checkpoint (``best.pt``, ``best-epochN.pt``), else ``last.pt``. A classifier
checkpoint is restored by ``tasks.restore.restore_task_model`` from its saved flags; a language-model
checkpoint (sonnet, paraphrase, pretraining) is rebuilt here the same way, from its ``extra["args"]``.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch import nn

from engine.checkpoints import load_checkpoint, load_checkpoint_weights
from engine.rng import seed_everything
from engine.run_paths import resolve_latest
from methods.export import ExportError, base_name, export_classifier, export_lm, export_peft
from methods.fine_tune import set_fine_tune_mode
from methods.restore import rebuild_model
from models.heads import GPT2SentimentClassifier
from models.loading import load_tokenizer
from models.sonnet_gpt import SonnetGPT
from tasks.common import build_body
from tasks.restore import restore_task_model
from tasks.settings import ModelSettings, fine_tune_from_flags, from_flags

MODEL_FILES = ("*-model.pt", "model.pt")
BEST_FILES = ("best.pt", "best-epoch*.pt")


@dataclass
class Exportable:
    """A model to export (a ``GPT2Model``, or a task model holding one as ``.gpt``: a classifier, an LM),
    the file it came from, its tokenizer, and its PEFT base (None: exists nowhere, export it too)."""

    model: nn.Module
    path: Path
    tokenizer: Any
    base: str | None = None

    @property
    def has_adapters(self) -> bool:
        return any(hasattr(m, "lora_A") for m in self.model.modules())


def checkpoint_in(folder: Path, adapters: bool) -> Path:
    """The file of a run folder to export: the final model file, else the best checkpoint, else
    ``last.pt`` (with ``adapters``: the model file is skipped, it holds them merged)."""
    groups = [[f for p in BEST_FILES for f in sorted(folder.glob(p))], [folder / "last.pt"]]
    if not adapters:
        groups.insert(0, [f for p in MODEL_FILES for f in sorted(folder.glob(p))])
    for group in groups:
        found = [f for f in group if f.is_file()]
        if len(found) > 1:
            raise ExportError(f"{folder} holds {', '.join(f.name for f in found)}: pass the one to export")
        if found:
            return found[0]
    runs = sorted(d.name for d in folder.iterdir() if d.is_dir() and any(d.glob("*.pt")))
    raise ExportError(f"{folder}: no model file or checkpoint of a run"
                      + (f"; it holds the runs {', '.join(runs)}: pass one of them" if runs else ""))


def _language_model(ckpt: Mapping[str, Any], path: Path, flags: Mapping[str, Any]) -> SonnetGPT:
    """A sonnet, paraphrase or pretraining checkpoint's body as the run built it (the frozen base of a
    LoRA run from the run's weights or seed), under ``SonnetGPT``'s names (``gpt.``) as it was saved."""
    if flags.get("attn_pattern", "dense") != "dense":
        raise ExportError(f"{path}: a sparse-attention run (--attn_pattern {flags['attn_pattern']}) cannot be a "
                          "plain Hugging Face GPT-2")
    fine_tune = fine_tune_from_flags(flags) if "fine_tune_mode" in flags else None
    settings = replace(from_flags(ModelSettings, flags), compile=False, gradient_checkpointing=False)
    if not ckpt.get("trainable_only", False):  # every weight is in the file: no need to read the base's
        settings = replace(settings, random_init=True)
    seed_everything(flags.get("seed", 0))
    gpt, _ = build_body(settings)
    model = SonnetGPT(gpt)
    if fine_tune is not None:
        set_fine_tune_mode(model, fine_tune, ())
    load_checkpoint_weights(model, ckpt, path, fits=f"--model_size {settings.model_size} --fine-tune-mode "
                                                    f"{fine_tune.mode if fine_tune else 'full-model'}")
    return model


def load_exportable(source: str | Path, tokenizer: str | None = None, adapters: bool = False) -> Exportable:
    """The model a run folder or one of its files holds; ``adapters``: the LoRA/DoRA adapters are wanted
    unmerged (a PEFT export), refused for a file without them."""
    path = resolve_latest(source)
    if path.is_dir():
        path = checkpoint_in(path, adapters)
    elif not path.is_file():
        raise ExportError(f"{source}: no such run folder or checkpoint")
    ckpt = load_checkpoint(path)
    extra = ckpt.get("extra") or {}
    if "config" in ckpt:  # a saved model: a plain body, adapters merged
        if adapters:
            raise ExportError(f"{path} holds a model with its adapters merged in; for --format peft pass the run's "
                              "Trainer checkpoint (best.pt, best-epochN.pt or last.pt)")
        model = rebuild_model(ckpt["config"], ckpt["model"], extra)
        return Exportable(model.eval(), path, load_tokenizer(tokenizer))
    if "num_labels" in extra:  # a classifier.py checkpoint
        restored = restore_task_model(path, "classifier")
        flags, model = restored.flags, restored.model
        tok = restored.tokenizer if tokenizer is None else load_tokenizer(tokenizer)
    elif "model" in ckpt and "args" in extra:
        flags = extra["args"]
        model = _language_model(ckpt, path, flags)
        tok = load_tokenizer(tokenizer or flags.get("tokenizer"))
    else:
        raise ExportError(f"{path}: neither a model file nor a Trainer checkpoint of a task run")
    found = Exportable(model.eval(), path, tok, base_name(flags["model_size"], flags.get("random_init", False)))
    if adapters and not found.has_adapters:
        raise ExportError(f"{path}: a --fine-tune-mode {flags.get('fine_tune_mode', 'full-model')} run has no "
                          "LoRA/DoRA adapters to export as PEFT; use --format hf")
    return found




FORMATS = ("hf", "peft", "both")
EXPORT_MARKS = ("config.json", "adapter_config.json")


def _write(found: Exportable, out: Path, fmt: str) -> None:
    if fmt in ("hf", "both"):
        if isinstance(found.model, GPT2SentimentClassifier):
            export_classifier(found.model, out, found.tokenizer)
        else:
            export_lm(getattr(found.model, "gpt", found.model), out, found.tokenizer)
    if fmt in ("peft", "both"):
        export_peft(found.model, out if fmt == "peft" else out / "adapter", found.tokenizer, found.base)


def export_run(source: str | Path, out: str | Path, fmt: str = "hf", tokenizer: str | None = None,
               overwrite: bool = False) -> Exportable:
    """Export what ``source`` (a run folder or one of its files) holds into ``out``: ``hf`` a Hugging Face
    folder (adapters merged), ``peft`` a PEFT adapter folder, ``both`` the first with the second in
    ``out/adapter``. A non-empty ``out`` is replaced only with ``overwrite``; the export is written
    beside it and moved into place whole, so a failure leaves ``out`` as it was."""
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {FORMATS}, got {fmt!r}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; name a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ExportError(f"--out {out} is not empty; pass --overwrite to replace it")
        if not any((out / f).is_file() for f in EXPORT_MARKS):  # never delete a folder that is not an export
            raise ExportError(f"--out {out} is not an earlier export (no {' or '.join(EXPORT_MARKS)}); "
                              "--overwrite replaces exports only: name an empty or new folder")
    if Path(source).resolve().is_relative_to(out.resolve()):
        raise ExportError(f"--out {out} holds the run being exported; name another folder")
    found = load_exportable(source, tokenizer, adapters=fmt != "hf")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write(found, tmp, fmt)
        if out.is_dir():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return found


__all__ = ["FORMATS", "Exportable", "checkpoint_in", "export_run", "load_exportable"]
