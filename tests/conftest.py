"""Shared fixtures: small random ``transformers`` GPT-2 checkpoints in Hugging Face format."""

from __future__ import annotations

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
