"""Shared fixtures: small random ``transformers`` GPT-2 checkpoints in Hugging Face format,
the course data, and the flags of a quick ``classifier.py`` run."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# Two small configs that exercise different widths, depths, head counts and a non-4d MLP.
HF_CONFIGS = {
    "small": dict(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=1000),
    "wide": dict(n_embd=96, n_layer=3, n_head=6, n_positions=48, vocab_size=777, n_inner=200),
}


def make_hf_folder(folder: Path, seed: int = 0, lm_head: bool = True, safetensors: bool = True, **cfg) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    hf_cfg = GPT2Config(**cfg, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(hf_cfg)
    # Random-init LayerNorms are ones/zeros; perturb them so the test sees their mapping.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    if not lm_head:  # a bare GPT2Model checkpoint: keys without the "transformer." prefix
        model = model.transformer
    if safetensors:
        model.save_pretrained(folder)
    else:  # the older pytorch_model.bin layout, as many local folders still hold
        folder.mkdir(parents=True, exist_ok=True)
        hf_cfg.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


@pytest.fixture(scope="session", params=sorted(HF_CONFIGS))
def hf_folder(request, tmp_path_factory) -> tuple[Path, dict]:
    cfg = HF_CONFIGS[request.param]
    return make_hf_folder(tmp_path_factory.mktemp(request.param), **cfg), cfg


@pytest.fixture(scope="session")
def tokenizer():
    from models.loading import load_tokenizer

    return load_tokenizer(verbose=False)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors run fastest on one thread; two stall under a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


MICRO = dict(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2)  # a micro GPT-2 config.json


@pytest.fixture
def classifier_cli(tmp_path) -> Callable[..., list[str]]:
    """``classifier_cli(mode, *extra)``: ``classifier.py`` flags for a quick run on a micro random
    GPT-2 with the course's sentiment files (8 examples, 1 epoch), everything written under tmp_path."""
    folder = tmp_path / "micro"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(MICRO))

    def make(mode: str, *extra: str) -> list[str]:
        paths = []
        for ds in ("sst", "cfimdb"):
            for split, suffix in (("train", "train"), ("dev", "dev"), ("test", "test-student")):
                paths += [f"--{ds}_{split}", str(SHARED_DATA / f"ids-{ds}-{suffix}.csv")]
        return ["--fine-tune-mode", mode, "--model_size", str(folder), "--random_init",
                "--limit", "8", "--epochs", "1", "--batch_size", "4", "--max_length", "32", "--no_progress",
                "--output_dir", str(tmp_path / "runs"), "--predictions_dir", str(tmp_path / "pred"), *paths, *extra]

    return make
