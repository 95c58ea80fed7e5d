"""Pretrained GPT-2 weights (hub id or local Hugging Face folder) and the tokenizer.

This is the only module that knows Hugging Face parameter names. Our own checkpoint
files (atomic saves, saved models) are the training engine's: ``training.checkpoints``.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from config import GPT2Config

HUB_IDS = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED_TOKENIZER = PROJECT_ROOT.parent / "shared" / "gpt2-tokenizer"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Hugging Face Conv1D stores (in, out); our nn.Linear stores (out, in).
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Non-parameter buffers some older checkpoints carry (the causal mask); they hold no weights.
IGNORED_SUFFIXES = ("attn.bias", "attn.masked_bias")
OFFLINE_HINT = (
    "Pass a local folder in Hugging Face format (config.json + model.safetensors or "
    "pytorch_model.bin) with --model_size DIR, or use --random_init to train from random weights."
)


class CheckpointError(RuntimeError):
    """A checkpoint or weight folder that cannot be used, with the reason."""


# --------------------------------------------------------------------------- hub


@lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect to the hub; False at once offline instead of a long hang."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_file(repo_id: str, filename: str) -> Path | None:
    """A hub file from the local cache, else downloaded when the hub is reachable, else None."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=True))
    except Exception:
        pass
    if not hub_reachable():
        return None
    try:
        return Path(hf_hub_download(repo_id, filename, etag_timeout=5))
    except Exception as e:  # missing file in the repo, network dropped mid-way...
        print(f"note: could not fetch {repo_id}/{filename}: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def resolve_weights_dir(name_or_dir: str | Path) -> Path:
    """A local folder as given, or the cached/downloaded hub snapshot of a hub id."""
    path = Path(name_or_dir)
    if path.is_dir():
        return path
    name = str(name_or_dir)
    if name not in HUB_IDS:
        raise CheckpointError(f"{name!r} is neither a local folder nor a GPT-2 hub id {HUB_IDS}. {OFFLINE_HINT}")
    config_file = hub_file(name, "config.json")
    if config_file is None:
        raise CheckpointError(f"cannot download {name!r}: the Hugging Face hub is unreachable. {OFFLINE_HINT}")
    for weights in WEIGHT_FILES:
        if hub_file(name, weights) is not None:
            return config_file.parent
    raise CheckpointError(f"could not download the weights of {name!r} from the hub. {OFFLINE_HINT}")


# ------------------------------------------------------------ Hugging Face format


def config_from_hf(hf: dict[str, Any], **overrides: Any) -> GPT2Config:
    """Our config from a Hugging Face GPT-2 ``config.json`` dict."""
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise CheckpointError(f"activation_function {act!r} is not GPT-2's tanh GELU; unsupported")
    for flag, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                       ("reorder_and_upcast_attn", False)):
        if hf.get(flag, want) != want:
            raise CheckpointError(f"config.json sets {flag}={hf[flag]}; only the GPT-2 default {want} is supported")
    fields = dict(
        vocab_size=hf["vocab_size"],
        max_position_embeddings=hf["n_positions"],
        hidden_size=hf["n_embd"],
        num_hidden_layers=hf["n_layer"],
        num_attention_heads=hf["n_head"],
        intermediate_size=hf.get("n_inner") or 4 * hf["n_embd"],
        hidden_dropout_prob=hf.get("resid_pdrop", 0.1),
        attention_probs_dropout_prob=hf.get("attn_pdrop", 0.1),
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        initializer_range=hf.get("initializer_range", 0.02),
    )
    fields.update(overrides)
    return GPT2Config(**fields)


def read_hf_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    for name in WEIGHT_FILES:
        f = folder / name
        if f.exists():
            try:
                if name.endswith(".safetensors"):
                    from safetensors.torch import load_file

                    return load_file(str(f))
                return torch.load(f, map_location="cpu", weights_only=True)
            except Exception as e:
                raise CheckpointError(f"{f}: cannot read weights ({type(e).__name__}: {e})") from e
    raise CheckpointError(f"{folder}: no weights file; expected one of {WEIGHT_FILES}")


def convert_hf_state_dict(hf_sd: dict[str, torch.Tensor], config: GPT2Config) -> dict[str, torch.Tensor]:
    """Map a GPT2Model / GPT2LMHeadModel state dict onto our parameter names.

    Every tensor is used or explicitly ignored (mask buffers, a tied lm_head),
    every parameter of ours is filled, and every shape is checked."""
    from models.gpt2 import GPT2Model

    with torch.device("meta"):
        expected = GPT2Model(config).state_dict()
    out: dict[str, torch.Tensor] = {}
    unexpected, wrong_shape, misshapen = [], [], set()
    lm_head = None
    for key, tensor in hf_sd.items():
        name = key.removeprefix("transformer.")
        if name == "lm_head.weight":
            lm_head = tensor
            continue
        if name.endswith(IGNORED_SUFFIXES) and name not in expected:
            continue
        if name not in expected:
            unexpected.append(key)
            continue
        if name.endswith(TRANSPOSED):
            tensor = tensor.t()
        if tensor.shape != expected[name].shape:
            wrong_shape.append(f"{key}: checkpoint {tuple(tensor.shape)} vs model {tuple(expected[name].shape)}")
            misshapen.add(name)
            continue
        out[name] = tensor.contiguous()
    missing = sorted(set(expected) - set(out) - misshapen)
    problems = []
    if wrong_shape:
        problems.append("wrong shapes:\n  " + "\n  ".join(wrong_shape))
    if missing:
        problems.append("missing keys: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected keys: " + ", ".join(unexpected))
    if problems:
        raise CheckpointError("checkpoint does not match GPT-2 config " + json.dumps(config.architecture())
                              + "\n" + "\n".join(problems))
    if lm_head is not None and not torch.equal(lm_head, out["wte.weight"]):
        raise CheckpointError("lm_head.weight differs from the token embedding; GPT-2 ties them and so does this model")
    return out


def load_pretrained(name_or_dir: str | Path, **config_overrides: Any):
    """GPT2Model with pretrained weights; the size is read from the checkpoint's config.json."""
    from models.gpt2 import GPT2Model

    folder = resolve_weights_dir(name_or_dir)
    cfg_file = folder / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{folder}: no config.json (a Hugging Face GPT-2 folder holds config.json and weights)")
    try:
        hf_cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: line {e.lineno}: invalid JSON ({e.msg})") from e
    try:
        config = config_from_hf(hf_cfg, **config_overrides)
    except KeyError as e:
        raise CheckpointError(f"{cfg_file}: missing field {e.args[0]!r}") from e
    state = convert_hf_state_dict(read_hf_state_dict(folder), config)
    with torch.device("meta"):
        model = GPT2Model(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def build_model(model_size: str, random_init: bool = False, **config_overrides: Any):
    """What every CLI calls for ``--model_size`` and ``--random_init``: a named size
    or a local folder, pretrained unless ``random_init``."""
    from config import get_config
    from models.gpt2 import GPT2Model

    if random_init:
        if Path(model_size).is_dir():
            hf_cfg = json.loads((Path(model_size) / "config.json").read_text())
            return GPT2Model(config_from_hf(hf_cfg, **config_overrides))
        return GPT2Model(get_config(model_size, **config_overrides))
    if model_size == "tiny":
        raise CheckpointError("there are no pretrained 'tiny' weights; add --random_init")
    return load_pretrained(model_size, **config_overrides)


# --------------------------------------------------------------------- tokenizer


@lru_cache(maxsize=4)
def load_tokenizer(path: str | None = None, verbose: bool = True):
    """The GPT-2 tokenizer, loaded once: ``path`` if given, else the hub's ``gpt2``
    (cache or download), else the offline copy in ../shared/gpt2-tokenizer.
    The pad token is EOS, as GPT-2 has none of its own."""
    from transformers import GPT2TokenizerFast

    if path is None:
        vocab = hub_file("gpt2", "vocab.json")
        merges = hub_file("gpt2", "merges.txt") if vocab is not None else None
        if vocab is not None and merges is not None:
            tok = GPT2TokenizerFast(vocab_file=str(vocab), merges_file=str(merges))
        elif SHARED_TOKENIZER.is_dir():
            if verbose:
                print(f"note: hub unreachable; using the GPT-2 tokenizer files in {SHARED_TOKENIZER}", file=sys.stderr)
            tok = GPT2TokenizerFast.from_pretrained(str(SHARED_TOKENIZER))
        else:
            raise CheckpointError(
                "GPT-2 tokenizer unavailable: the hub is unreachable and "
                f"{SHARED_TOKENIZER} does not exist; pass --tokenizer DIR (vocab.json + merges.txt)"
            )
    else:
        if not Path(path).is_dir():
            raise CheckpointError(f"tokenizer folder {path} does not exist")
        tok = GPT2TokenizerFast.from_pretrained(str(path))
    tok.pad_token = tok.eos_token
    return tok
