"""Our trained models as folders ``transformers`` and PEFT load: the way a model leaves this project.

- A GPT-2 body becomes a ``GPT2LMHeadModel`` folder (``config.json``, ``model.safetensors``, the tokenizer,
  ``generation_config.json``): the same logits, and the same greedy text from ``pipeline("text-generation")``.
  LoRA/DoRA adapters are folded in first (on a copy: the caller's model keeps them).
- A classifier with last-token pooling becomes a ``GPT2ForSequenceClassification`` folder. Its ``score`` has no
  bias and ours has one, so the bias is moved into the final LayerNorm's bias: with ``W`` the head's weight
  (num_labels, d) of full row rank, ``W (b + pinv(W) c) = W b + c``, exact up to float rounding (checked).
  The folder's ``ln_f.bias`` then serves the classifier only; ``head.safetensors`` beside it keeps the head as
  trained and the body's own ``ln_f.bias``. Mean pooling has no counterpart in ``transformers``, nor has a head
  with dependent rows: the body is exported alone (``GPT2Model``), ``head.safetensors`` and its pooling beside.
- Sparse attention and prefixes change what attention computes, and ReFT edits hidden states; no plain GPT-2
  computes that, so they are refused in one line.

The adapters' PEFT folder format is ``methods.peft_adapters``; Hugging Face names are ``models.loading``'s.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from errors import InputError
from methods.lora import unwrap_lora
from methods.peft_adapters import write_peft_adapter
from methods.reft import reft_of
from models.gpt2 import GPT2Model
from models.heads import GPT2SentimentClassifier
from models.loading import HUB_IDS, hf_config_dict, hub_reachable, to_hf_state_dict
from modules.attention import CausalSelfAttention

HEAD_FILE = "head.safetensors"
FOLD_TOLERANCE = 1e-5  # the largest logit change the bias fold may cause


class ExportError(InputError):
    """A model or a request that cannot be exported as asked: one ``error:`` line."""


def check_plain(gpt: GPT2Model) -> None:
    """Refuse a body whose attention is not GPT-2's own (sparse patterns, prefixes), or with ReFT interventions."""
    kinds = {type(block.attn).__name__ for block in gpt.h if type(block.attn) is not CausalSelfAttention}
    if kinds:
        raise ExportError(f"a model with {', '.join(sorted(kinds))} cannot be a plain Hugging Face GPT-2 (its "
                          "attention differs from dense causal attention); export a dense, prefix-free run")
    if reft_of(gpt) is not None:
        raise ExportError("a model with ReFT interventions cannot be a plain Hugging Face GPT-2 (they edit hidden "
                          "states at chosen positions, which no GPT-2 weight does); use the run's own model file")


def merged_state(gpt: GPT2Model) -> dict[str, torch.Tensor]:
    """The body's weights with any adapters folded in, its own modules left untouched."""
    check_plain(gpt)
    plain = copy.deepcopy(gpt)
    unwrap_lora(plain)
    return {k: v.detach().cpu() for k, v in plain.state_dict().items()}


def base_state(gpt: GPT2Model) -> dict[str, torch.Tensor]:
    """The body under its adapters: the weights PEFT's adapters go on top of."""
    check_plain(gpt)
    state = {k.replace(".base.", "."): v.detach().cpu() for k, v in gpt.state_dict().items()
             if ".lora_" not in k}
    return state


def write_hf_folder(out: str | Path, gpt: GPT2Model, state: dict[str, torch.Tensor], tokenizer: Any,
                    architecture: str = "GPT2LMHeadModel", modules: dict[str, torch.Tensor] | None = None,
                    **config_fields: Any) -> Path:
    """A Hugging Face folder of ``state`` (our names) and ``modules`` (``transformers``' names, e.g.
    ``score.weight``) with ``gpt``'s config, the tokenizer and greedy-by-default generation settings."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = {**hf_config_dict(gpt.config, architecture), **config_fields}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    eos = config["eos_token_id"]
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos, "do_sample": False}, indent=2) + "\n")
    tensors = {**to_hf_state_dict(state), **(modules or {})}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def export_lm(gpt: GPT2Model, out: str | Path, tokenizer: Any) -> Path:
    """A GPT-2 body (adapters folded) as a ``GPT2LMHeadModel`` folder."""
    return write_hf_folder(out, gpt, merged_state(gpt), tokenizer)


@torch.no_grad()
def fold_head_bias(weight: torch.Tensor, bias: torch.Tensor, ln_bias: torch.Tensor) -> torch.Tensor:
    """The final LayerNorm bias that lets a bias-free head ``weight`` compute ``weight h + bias``: ``ln_bias
    + pinv(weight) bias``, refused when ``weight``'s rows are dependent (then no such bias exists)."""
    w = weight.double()
    shift = torch.linalg.pinv(w) @ bias.double()  # (d,)
    folded = (ln_bias.double() + shift).to(ln_bias.dtype)
    error = (w @ (folded.double() - ln_bias.double()) - bias.double()).abs().max().item()
    if error > FOLD_TOLERANCE * max(1.0, bias.abs().max().item()):
        raise ExportError(f"the classifier head's rows are linearly dependent: its bias cannot move into the "
                          f"final LayerNorm (off by {error:.2g})")
    return folded


def sequence_classification(model: GPT2SentimentClassifier, state: dict[str, torch.Tensor],
                            ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
    """(body state with the head's bias folded into ``ln_f.bias``, ``{"score.weight": ...}``) of a
    classifier, ``state`` being its body's (merged or base); None where no ``GPT2ForSequenceClassification``
    computes it: mean pooling (it reads the last token), a head with dependent rows (a note says so)."""
    if model.pooling != "last":
        return None
    head = model.classifier
    try:
        ln_bias = fold_head_bias(head.weight.detach().cpu(), head.bias.detach().cpu(), state["ln_f.bias"])
    except ExportError as e:
        print(f"note: {e}; exporting the body with {HEAD_FILE} beside it", file=sys.stderr)
        return None
    return {**state, "ln_f.bias": ln_bias}, {"score.weight": head.weight.detach().cpu().contiguous()}


def labels_config(model: GPT2SentimentClassifier, pad_id: int) -> dict[str, Any]:
    n = model.num_labels
    return {"num_labels": n, "id2label": {str(i): f"LABEL_{i}" for i in range(n)},
            "label2id": {f"LABEL_{i}": i for i in range(n)}, "pad_token_id": pad_id}


def write_head(out: Path, model: GPT2SentimentClassifier, ln_bias: torch.Tensor) -> None:
    """The head as trained, and the body's own ``ln_f.bias``, beside an export (``HEAD_FILE``)."""
    head = model.classifier
    tensors = {"weight": head.weight.detach().cpu(), "bias": head.bias.detach().cpu(),
               "ln_f.bias": ln_bias.detach().cpu()}
    save_file(tensors, str(out / HEAD_FILE),
              metadata={"pooling": model.pooling, "num_labels": str(model.num_labels)})


def export_classifier(model: GPT2SentimentClassifier, out: str | Path, tokenizer: Any) -> Path:
    """A classifier as ``GPT2ForSequenceClassification`` (last-token pooling) or as a ``GPT2Model`` body
    with its head beside it (mean pooling); ``head.safetensors`` is written in both cases."""
    state = merged_state(model.gpt)
    out = Path(out)
    pad = tokenizer.pad_token_id if tokenizer is not None else model.gpt.config.vocab_size - 1
    mapped = sequence_classification(model, state)
    if mapped is not None:
        folded, score = mapped
        write_hf_folder(out, model.gpt, folded, tokenizer, "GPT2ForSequenceClassification", score,
                        **labels_config(model, pad))
    else:
        write_hf_folder(out, model.gpt, state, tokenizer, "GPT2Model")
    write_head(out, model, state["ln_f.bias"])
    return out


def base_name(model_size: str, random_init: bool) -> str | None:
    """What PEFT's ``base_model_name_or_path`` can name: a hub id or a Hugging Face folder the run started
    from; None when the base exists nowhere (random weights, a model file of ours) and must be exported."""
    if random_init:
        return None
    if model_size in HUB_IDS:
        return model_size
    path = Path(model_size)
    return str(path.resolve()) if path.is_dir() else None


def export_peft(model: nn.Module, out: str | Path, tokenizer: Any, base: str | None) -> Path:
    """A LoRA/DoRA model's adapters as a PEFT folder; when ``base`` is None the base body is written beside
    them (``out/base``, a Hugging Face folder) and named as the base. A last-token classifier is a
    ``SEQ_CLS`` adapter whose saved modules are the bias-free ``score`` and the ``ln_f`` that carries the
    head's bias (``sequence_classification``); any other model adapts ``GPT2LMHeadModel``."""
    gpt = model.gpt if hasattr(model, "gpt") else model
    out = Path(out)
    state = base_state(gpt)
    classifier = isinstance(model, GPT2SentimentClassifier)
    if base is None:
        base = str((out / "base").resolve())
        write_hf_folder(out / "base", gpt, state, tokenizer)
    if not classifier:
        write_peft_adapter(gpt, out, base)
    elif (mapped := sequence_classification(model, state)) is not None:
        folded, score = mapped
        write_peft_adapter(gpt, out, base, "SEQ_CLS", {**score, "transformer.ln_f.weight": folded["ln_f.weight"],
                                                        "transformer.ln_f.bias": folded["ln_f.bias"]})
    else:  # mean pooling, a head with dependent rows: the adapted body, its head beside it
        write_peft_adapter(gpt, out, base)
        write_head(out, model, state["ln_f.bias"])
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out


def push_to_hub(folder: str | Path, repo: str) -> str:
    """Upload an exported folder; offline (``HF_HUB_OFFLINE=1``, or the hub unreachable) it is one
    ``ExportError`` line that says how to push it later. Returns the repository's address."""
    if not hub_reachable():
        raise ExportError(f"cannot push to the hub: it is unreachable (offline or HF_HUB_OFFLINE=1); the export "
                          f"is in {folder}: push it later with `hf upload {repo} {folder}`")
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(repo_id=repo, folder_path=str(folder))
    except Exception as e:  # no token, no right to the repository, the connection dropped...
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ExportError(f"could not push {folder} to {repo} ({type(e).__name__}: {first}); log in with "
                          f"`hf auth login` and retry with `hf upload {repo} {folder}`") from e
    return f"https://huggingface.co/{repo}"


__all__ = ["ExportError", "base_name", "check_plain", "export_classifier", "export_lm", "export_peft",
           "fold_head_bias", "push_to_hub", "write_hf_folder"]
