"""Pretrained GPT-2 weights (hub id or local Hugging Face folder) and the tokenizer.

This is the only module that knows Hugging Face parameter names. Our own checkpoint
files (atomic saves, saved models) are the training engine's: ``engine.checkpoints``.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Callable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from safetensors.torch import load_file

from config import GPT2Config
from errors import CheckpointError

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


# --------------------------------------------------------------------------- hub


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at each call (``huggingface_hub``
    reads it once at import, so an ``HF_HOME`` set later would otherwise be ignored)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


@lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect to the hub; False at once offline instead of a long hang."""
    if hub_offline():
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def cached_hub_file(repo_id: str, filename: str) -> Path | None:
    """A hub file from the local cache only: no network, whatever HF_HUB_OFFLINE says."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, cache_dir=hub_cache_dir(), local_files_only=True))
    except Exception:
        return None


def hub_file(repo_id: str, filename: str) -> Path | None:
    """A hub file from the local cache, else downloaded when the hub is reachable, else None.
    The cache comes first, so a cached model never waits on the network."""
    from huggingface_hub import hf_hub_download

    cached = cached_hub_file(repo_id, filename)
    if cached is not None or not hub_reachable():
        return cached
    try:
        return Path(hf_hub_download(repo_id, filename, cache_dir=hub_cache_dir(), etag_timeout=5))
    except Exception as e:  # missing file in the repo, network dropped mid-way...
        print(f"note: could not fetch {repo_id}/{filename}: {type(e).__name__}: {e}", file=sys.stderr)
        return None


def cached_snapshot(repo_id: str) -> Path:
    """The cache folder of ``repo_id``'s snapshot that ``refs/main`` names (or of the repo
    itself when there is no such snapshot): the place an error about the cache points to."""
    repo = hub_cache_dir() / f"models--{repo_id.replace('/', '--')}"
    ref = repo / "refs" / "main"
    if ref.is_file():
        snapshot = repo / "snapshots" / ref.read_text().strip()
        if snapshot.is_dir():
            return snapshot
    return repo


def cache_fix(repo_id: str) -> str:
    return (f"To fix it, download it again where the hub is reachable (`hf download {repo_id}`, or delete "
            f"{hub_cache_dir() / ('models--' + repo_id)} and rerun), or pass a complete local folder with "
            "--model_size DIR.")


def resolve_weights_dir(name_or_dir: str | Path) -> Path:
    """A local folder as given, or the snapshot of a hub id: from the cache when it holds
    config.json and weights, else downloaded. Offline, a partial cache is an error naming the
    snapshot folder and the missing file."""
    path = Path(name_or_dir)
    if path.is_dir():
        return path
    name = str(name_or_dir)
    if name not in HUB_IDS:
        raise CheckpointError(f"{name!r} is neither a local folder nor a GPT-2 hub id {HUB_IDS}. {OFFLINE_HINT}")
    config_file = cached_hub_file(name, "config.json")
    cached_weights = any(cached_hub_file(name, w) for w in WEIGHT_FILES)
    if config_file is not None and cached_weights:
        return config_file.parent
    if hub_reachable():
        config_file = hub_file(name, "config.json")
        if config_file is not None and any(hub_file(name, w) for w in WEIGHT_FILES):
            return config_file.parent
        raise CheckpointError(f"could not download {name!r} from the hub. {OFFLINE_HINT}")
    snapshot = cached_snapshot(name)
    if not snapshot.exists():
        raise CheckpointError(f"cannot download {name!r}: the Hugging Face hub is unreachable and the cache "
                              f"{hub_cache_dir()} holds no copy of it. {OFFLINE_HINT}")
    missing = [] if config_file is not None else ["config.json"]
    if not cached_weights:
        missing.append(" or ".join(WEIGHT_FILES))
    broken = [f"{f.name} is a broken link to {os.readlink(f)}" for f in sorted(snapshot.glob("*"))
              if f.is_symlink() and not f.exists()]
    raise CheckpointError(f"{snapshot}: the cached copy of {name!r} is incomplete: it lacks {' and '.join(missing)}"
                          + "".join(f" ({b})" for b in broken) + f", and the hub is unreachable. {cache_fix(name)}")


# ------------------------------------------------------------ Hugging Face format


# Our config field -> (the Hugging Face config.json key, its default there): one table read both ways.
HF_CONFIG_KEYS = {
    "vocab_size": ("vocab_size", None), "max_position_embeddings": ("n_positions", None),
    "hidden_size": ("n_embd", None), "num_hidden_layers": ("n_layer", None), "num_attention_heads": ("n_head", None),
    "intermediate_size": ("n_inner", None), "hidden_dropout_prob": ("resid_pdrop", 0.1),  # n_inner may be null
    "attention_probs_dropout_prob": ("attn_pdrop", 0.1), "layer_norm_eps": ("layer_norm_epsilon", 1e-5),
    "initializer_range": ("initializer_range", 0.02),
}


def config_from_hf(hf: dict[str, Any], **overrides: Any) -> GPT2Config:
    """Our config from a Hugging Face GPT-2 ``config.json`` dict."""
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise CheckpointError(f"activation_function {act!r} is not GPT-2's tanh GELU; unsupported")
    for flag, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                       ("reorder_and_upcast_attn", False)):
        if hf.get(flag, want) != want:
            raise CheckpointError(f"config.json sets {flag}={hf[flag]}; only the GPT-2 default {want} is supported")
    fields = {ours: hf[key] if default is None else hf.get(key, default)
              for ours, (key, default) in HF_CONFIG_KEYS.items() if ours != "intermediate_size"}
    fields["intermediate_size"] = hf.get("n_inner") or 4 * hf["n_embd"]  # null in GPT-2's own files: 4 x width
    fields.update(overrides)
    return GPT2Config(**fields)


def read_hf_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The weights of a Hugging Face folder; a file that cannot be read (truncated download,
    a cache link whose blob is gone) is an error naming it and what to do."""
    return read_first_weight_file(folder, WEIGHT_FILES, "weights", fix=(
        "download it again (for a hub id: delete that file and rerun where the hub is reachable) "
        "or pass another folder with --model_size DIR"))


def read_first_weight_file(folder: Path, names: tuple[str, ...], what: str, fix: str = "",
                           read: Callable[[Path], dict[str, Any]] | None = None) -> dict[str, Any]:
    """The first of ``names`` in ``folder`` that exists, read by ``read`` (default ``read_weight_file``); a
    broken link, an unreadable file or none of them is a ``CheckpointError`` naming the file (``what``: the
    kind of weights, for the message; ``fix``: what to do, appended)."""
    then = f"; {fix}" if fix else ""
    for name in names:
        f = folder / name
        if f.is_symlink() and not f.exists():
            raise CheckpointError(f"{f}: broken link (its cached blob {os.readlink(f)} is missing){then}")
        if f.exists():
            try:
                return (read or read_weight_file)(f)
            except Exception as e:
                raise CheckpointError(f"{f}: cannot read {what} ({type(e).__name__}: {e}){then}") from e
    raise CheckpointError(f"{folder}: no {what} file; expected one of {names}")


def read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` or torch weights file, read onto the CPU without running any code it holds."""
    if path.name.endswith(".safetensors"):
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def convert_hf_state_dict(
    hf_sd: Mapping[str, torch.Tensor], config: GPT2Config, expected: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Map a GPT2Model / GPT2LMHeadModel state dict onto our parameter names; ``expected`` is
    our model's state dict (shapes only: a meta-device model's will do).

    Every tensor is used or explicitly ignored (mask buffers, a tied lm_head),
    every parameter of ours is filled, and every shape is checked."""
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


def read_hf_config(folder: Path, **config_overrides: Any) -> GPT2Config:
    """Our config from a Hugging Face folder's ``config.json``, with clear errors."""
    cfg_file = folder / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{folder}: no config.json (a Hugging Face GPT-2 folder holds config.json and weights)")
    try:
        hf_cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: line {e.lineno}: invalid JSON ({e.msg})") from e
    try:
        return config_from_hf(hf_cfg, **config_overrides)
    except KeyError as e:
        raise CheckpointError(f"{cfg_file}: missing field {e.args[0]!r}") from e


def read_pretrained(
    name_or_dir: str | Path, expect: Mapping[str, int | None] | None = None, **config_overrides: Any
) -> tuple[GPT2Config, dict[str, torch.Tensor]]:
    """(config, the checkpoint's Hugging Face state dict) of a hub id or local folder, for
    ``GPT2Model.from_pretrained``; the size is read from the checkpoint's config.json.
    ``expect`` maps config fields to the values the caller assumed (e.g. the course starter's
    ``d=768, l=12``); a disagreement is an error before any weight is read."""
    folder = resolve_weights_dir(name_or_dir)
    config = read_hf_config(folder, **config_overrides)
    wrong = {k: (v, getattr(config, k)) for k, v in (expect or {}).items() if v is not None and getattr(config, k) != v}
    if wrong:
        detail = ", ".join(f"{k}={asked} asked but the checkpoint has {k}={has}" for k, (asked, has) in wrong.items())
        raise CheckpointError(f"{folder / 'config.json'}: {detail}; drop the size arguments or pick the matching model")
    return config, read_hf_state_dict(folder)


def hf_config_dict(config: GPT2Config, architecture: str = "GPT2LMHeadModel") -> dict[str, Any]:
    """``config_from_hf`` backwards: the ``config.json`` of a Hugging Face GPT-2 folder with our
    weights (``to_hf_state_dict``); GPT-2's end-of-text token is the last of its vocabulary."""
    eos = config.vocab_size - 1
    return {
        "architectures": [architecture], "model_type": "gpt2",
        **{key: getattr(config, ours) for ours, (key, _) in HF_CONFIG_KEYS.items()},
        "n_ctx": config.max_position_embeddings, "embd_pdrop": config.hidden_dropout_prob,
        "activation_function": "gelu_new", "scale_attn_weights": True, "use_cache": True,
        "bos_token_id": eos, "eos_token_id": eos, "tie_word_embeddings": True,
    }


def to_hf_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``convert_hf_state_dict`` backwards: a GPT2Model state dict under ``transformers``' names
    (``transformer.`` prefix, Conv1D weights transposed), the LM head left to the tied embedding."""
    return {f"transformer.{k}": (v.t() if k.endswith(TRANSPOSED) else v).contiguous() for k, v in state.items()}


# --------------------------------------------------------------------- tokenizer

TOKENIZER_SIZE = 50257
TOKENIZER_PROBE = ("Hello world", [15496, 995])  # a known GPT-2 encoding, checked on every load


def read_tokenizer(folder: str | Path, where: str):
    """The GPT-2 tokenizer in ``folder`` (vocab.json + merges.txt, or tokenizer.json), checked:
    50257 entries and the known encoding of "Hello world". ``from_pretrained`` on the folder is
    the construction that works under transformers 5 (``GPT2TokenizerFast(vocab_file=...,
    merges_file=...)`` there gives a 1-entry tokenizer that encodes everything as []), and the
    check makes sure no branch ever returns such a tokenizer silently."""
    from transformers import GPT2TokenizerFast

    folder = Path(folder)
    fix = "pass --tokenizer DIR with GPT-2's vocab.json and merges.txt"
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: tokenizer folder ({where}) does not exist; {fix}")
    missing = [f for f in ("vocab.json", "merges.txt") if not (folder / f).is_file()]
    if missing and not (folder / "tokenizer.json").is_file():
        raise CheckpointError(f"{folder / missing[0]}: missing from the tokenizer folder ({where}); {fix}")
    try:
        tok = GPT2TokenizerFast.from_pretrained(str(folder))
    except Exception as e:
        raise CheckpointError(f"{folder}: cannot read the GPT-2 tokenizer ({where}): {type(e).__name__}: "
                              f"{str(e).strip().splitlines()[-1]}; {fix}") from e
    text, want = TOKENIZER_PROBE
    got = tok.encode(text)
    if len(tok) != TOKENIZER_SIZE or got != want:
        raise CheckpointError(f"{folder}: not the GPT-2 tokenizer ({where}): {len(tok)} entries and {text!r} -> "
                              f"{got}, expected {TOKENIZER_SIZE} and {want} (incomplete or foreign "
                              f"vocab.json/merges.txt); {fix}")
    tok.pad_token = tok.eos_token  # GPT-2 has no pad token of its own
    return tok


@lru_cache(maxsize=4)
def load_tokenizer(path: str | None = None, verbose: bool = True):
    """The GPT-2 tokenizer, loaded once: ``path`` if given, else the hub's ``gpt2``
    (cache first, then download), else the offline copy in ../shared/gpt2-tokenizer.
    Every branch is checked by ``read_tokenizer``. The pad token is EOS."""
    if path is not None:
        return read_tokenizer(path, "--tokenizer")
    vocab = hub_file("gpt2", "vocab.json")
    merges = hub_file("gpt2", "merges.txt") if vocab is not None else None
    if vocab is not None and merges is not None and vocab.parent == merges.parent:
        return read_tokenizer(vocab.parent, "the Hugging Face cache of gpt2")
    if not SHARED_TOKENIZER.is_dir():
        raise CheckpointError(f"GPT-2 tokenizer unavailable: the hub is unreachable, the cache {hub_cache_dir()} "
                              f"holds no complete copy, and {SHARED_TOKENIZER} does not exist; "
                              "pass --tokenizer DIR (vocab.json + merges.txt)")
    if verbose:
        print(f"note: no cached or downloadable gpt2 tokenizer; using the GPT-2 tokenizer files in "
              f"{SHARED_TOKENIZER}", file=sys.stderr)
    return read_tokenizer(SHARED_TOKENIZER, "the offline copy")

