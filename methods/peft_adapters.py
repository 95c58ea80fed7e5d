"""LoRA and DoRA adapters in PEFT's folder format (``adapter_config.json`` + ``adapter_model.safetensors``),
written from our ``LoRALinear`` layers and read back into them.

Why the mapping is one to one: PEFT adapts ``transformers``' GPT-2, whose ``c_attn``/``c_proj``/``c_fc`` are
Conv1D layers storing (in, out) weights, but its adapters are ``nn.Linear`` pairs whatever the base layer:
``lora_A`` (r, in) and ``lora_B`` (out, r), exactly ours (``fan_in_fan_out`` only tells PEFT how to merge
into the base). Our attention keeps GPT-2's fused q/k/v projection (``attn.c_attn``), so an adapter on it is
an adapter on PEFT's ``c_attn``: no block structure, no transpose. DoRA's per-row magnitude is PEFT's
``lora_magnitude_vector``, its norm taken over the same (out, in) rows. Both sides scale by alpha / r; what
PEFT can do and we cannot (rsLoRA scaling, per-layer ranks or alphas, trained biases, whole modules saved
beside the adapters) is refused in one line, never loaded approximately.

Loading is plain file reading (no ``peft`` import, nor ``methods.lora``): a task run with
``--load_adapter DIR`` needs neither ``peft`` nor ``transformers``' model code. Writing the folder
uses ``peft.LoraConfig``, so that ``adapter_config.json`` is the one the installed PEFT expects.
"""

from __future__ import annotations

import json
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from errors import CheckpointError
from models.loading import read_first_weight_file

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
BODY_PREFIX = "transformer."
# PEFT's tensor suffix -> our LoRALinear attribute.
TENSORS = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B", "lora_magnitude_vector": "lora_magnitude"}
# adapter_config.json fields with no counterpart here, and the value that means "not used".
UNSUPPORTED = {"use_rslora": False, "rank_pattern": {}, "alpha_pattern": {}, "bias": "none", "lora_bias": False,
               "modules_to_save": None, "layer_replication": None, "target_parameters": None,
               "trainable_token_indices": None}
_LAYER = re.compile(r"(?:^|\.)(h\.\d+\..+)$")


def layer_key(module_name: str) -> str:
    """A module's name from its block on (``gpt.h.3.attn.c_attn`` -> ``h.3.attn.c_attn``): the part
    ours and PEFT's names share, whatever wraps the body (``gpt.``, ``base_model.model.transformer.``)."""
    m = _LAYER.search(module_name)
    if m is None:
        raise CheckpointError(f"{module_name}: not a layer of a GPT-2 block (h.N....)")
    return m.group(1)


def targets_of(keys: Sequence[str]) -> tuple[str, ...]:
    """The target names that wrap exactly the layers ``keys`` (``h.N.attn.c_attn``...): the suffixes
    (``attn.c_attn``) when every block has the same ones, else the layer names themselves."""
    by_block: dict[str, set[str]] = {}
    for key in keys:
        block, _, rest = key.partition(".")[2].partition(".")
        by_block.setdefault(block, set()).add(rest)
    suffixes = set().union(*by_block.values())
    if all(s == suffixes for s in by_block.values()):
        return tuple(sorted(suffixes))
    return tuple(sorted(keys))


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``methods.lora.LoRALinear`` layers by their block names, known by their adapter pair (this module
    does not import ``methods.lora``: the task scripts import it for ``--load_adapter``, and a run
    without adapters never loads the adapter machinery)."""
    return {layer_key(n): m for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "lora_B")}


def adapter_settings(model: nn.Module) -> dict[str, Any]:
    """The ``methods.fine_tune.LoraConfig`` fields the model's adapters were built with, read off the
    layers themselves."""
    layers = _lora_layers(model)
    if not layers:
        raise CheckpointError("the model has no LoRA/DoRA adapters to export")
    shapes = {(m.r, float(m.alpha), m.use_dora) for m in layers.values()}
    if len(shapes) > 1:
        raise CheckpointError(f"adapters of different ranks/alphas {sorted(shapes)}; PEFT needs one r and alpha")
    (r, alpha, use_dora), = shapes
    first = next(iter(layers.values())).lora_dropout
    dropout = first.p if isinstance(first, nn.Dropout) else 0.0
    return {"r": r, "alpha": alpha, "dropout": dropout, "targets": targets_of(list(layers)), "use_dora": use_dora}


def adapter_state_dict(model: nn.Module, body_prefix: str = BODY_PREFIX) -> dict[str, torch.Tensor]:
    """Every adapter tensor of ``model`` under PEFT's names (the adapters must not be merged)."""
    out = {}
    for key, m in _lora_layers(model).items():
        if m.merged:
            raise CheckpointError(f"{key}: the adapter is merged into its base; unmerge it to export it")
        for suffix, attr in TENSORS.items():
            if hasattr(m, attr):
                out[f"{PEFT_PREFIX}{body_prefix}{key}.{suffix}"] = getattr(m, attr).detach().cpu().contiguous()
    return out


def write_peft_adapter(model: nn.Module, folder: str | Path, base_model: str | None, task_type: str = "CAUSAL_LM",
                       modules: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """``model``'s adapters as a PEFT folder for ``peft.PeftModel.from_pretrained`` on ``base_model``
    (a hub id or a Hugging Face folder); ``modules``: whole tensors saved beside them (PEFT's
    ``modules_to_save``, e.g. ``score.weight`` of a classifier), under their ``transformers`` names."""
    import peft  # optional here: only writing an adapter folder needs it

    settings = adapter_settings(model)
    saved = sorted({name.rsplit(".", 1)[0] for name in modules or {}}) or None
    config = peft.LoraConfig(task_type=task_type, r=settings["r"], lora_alpha=settings["alpha"],
                             lora_dropout=settings["dropout"], target_modules=list(settings["targets"]),
                             fan_in_fan_out=True, use_dora=settings["use_dora"], modules_to_save=saved,
                             base_model_name_or_path=base_model, inference_mode=True)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    tensors = adapter_state_dict(model)
    tensors.update({PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in (modules or {}).items()})
    save_file(tensors, str(folder / WEIGHT_FILES[0]), metadata={"format": "pt"})
    return settings


def _read_json(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder}: no {CONFIG_FILE} (a PEFT adapter folder holds it and "
                              f"{WEIGHT_FILES[0]})")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from e


def tensor_names(path: Path) -> dict[str, None]:
    """A weight file's tensor names, none of its tensors read: a safetensors header, or a torch file
    memory-mapped. A legacy (pre-zip) torch file cannot be mapped, so it is read whole, as
    ``read_weight_file`` reads it."""
    if path.name.endswith(".safetensors"):
        with safe_open(str(path), "pt") as f:
            return dict.fromkeys(f.keys())
    return dict.fromkeys(torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path)))


def read_peft_adapter(folder: str | Path, tensors: bool = True) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(the ``methods.fine_tune.LoraConfig`` fields that rebuild a PEFT LoRA/DoRA adapter here, its tensors by layer:
    ``{"h.0.attn.c_attn": {"lora_A": ..., "lora_B": ...}}``); anything we cannot compute exactly is
    refused in one line naming the field. Without ``tensors`` only the names are read (each tensor is
    None): what the command line needs for the settings, the weights being read once, when they load."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such adapter folder")
    cfg = _read_json(folder)
    if cfg.get("peft_type") != "LORA":
        raise CheckpointError(f"{folder / CONFIG_FILE}: peft_type {cfg.get('peft_type')!r}; only LORA adapters "
                              "(LoRA, DoRA) load here")
    for key, plain in UNSUPPORTED.items():
        if cfg.get(key) not in (plain, None, [], {}, False):
            raise CheckpointError(f"{folder / CONFIG_FILE}: {key}={cfg[key]!r} has no counterpart in this "
                                  f"project's LoRA (it needs {key}={plain!r})")
    layers: dict[str, dict[str, torch.Tensor]] = {}
    read = None if tensors else tensor_names
    for name, tensor in read_first_weight_file(folder, WEIGHT_FILES, "adapter weights", read=read).items():
        suffix = next((s for s in TENSORS if name.endswith("." + s)), None)
        if suffix is None:
            raise CheckpointError(f"{folder}: {name} is not a LoRA/DoRA tensor")
        layers.setdefault(layer_key(name.removesuffix("." + suffix)), {})[TENSORS[suffix]] = tensor
    if not layers:
        raise CheckpointError(f"{folder}: the adapter holds no tensors")
    dora = {"lora_magnitude" in t for t in layers.values()}
    if dora != {bool(cfg.get("use_dora"))}:
        raise CheckpointError(f"{folder}: use_dora={cfg.get('use_dora')} but the weights "
                              f"{'lack' if cfg.get('use_dora') else 'hold'} DoRA magnitudes")
    settings = {"r": int(cfg["r"]), "alpha": float(cfg["lora_alpha"]), "dropout": float(cfg.get("lora_dropout") or 0),
                "targets": targets_of(list(layers)), "use_dora": bool(cfg.get("use_dora"))}
    return settings, layers


@torch.no_grad()
def load_peft_adapter(model: nn.Module, folder: str | Path) -> int:
    """Fill ``model``'s adapters (built from ``read_peft_adapter``'s settings) with a PEFT folder's
    tensors: every layer filled, every tensor used, every shape checked. Returns the layers loaded."""
    settings, tensors = read_peft_adapter(folder)
    layers = _lora_layers(model)
    missing, unexpected = sorted(set(layers) - set(tensors)), sorted(set(tensors) - set(layers))
    problems = [f"{what}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
                for what, names in (("adapters the model has and the folder lacks", missing),
                                    ("adapters the folder has and the model lacks", unexpected)) if names]
    for key in sorted(set(layers) & set(tensors)):
        m = layers[key]
        want = (settings["r"], settings["alpha"], settings["use_dora"])
        if (m.r, float(m.alpha), m.use_dora) != want:
            problems.append(f"{key}: r, alpha, dora = {m.r}, {m.alpha}, {m.use_dora} vs the folder's {want}")
        for attr, t in tensors[key].items():
            p = getattr(m, attr)
            if p.shape != t.shape:
                problems.append(f"{key}.{attr}: folder {tuple(t.shape)} vs model {tuple(p.shape)}")
            else:
                p.copy_(t.to(p.dtype))
    if problems:
        raise CheckpointError(f"{folder}: the adapter does not fit the model: " + "; ".join(problems))
    return len(layers)


__all__ = ["adapter_settings", "adapter_state_dict", "layer_key", "load_peft_adapter", "read_peft_adapter",
           "targets_of", "tensor_names", "write_peft_adapter"]
