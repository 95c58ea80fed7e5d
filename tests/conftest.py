"""Shared fixtures: small random ``transformers`` GPT-2 checkpoints in Hugging Face format, and
Hugging Face hub caches (``$HF_HOME/hub/models--gpt2/...``) holding them, as a download leaves."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared"
SHARED_DATA = SHARED / "data"
GPT2_TOKENIZER_FILES = ("vocab.json", "merges.txt")
CACHE_COMMIT = "607a30d783dfa663caf39e06633721c8d4cfcd7e"  # any 40-hex name; the cache folder of a snapshot
# A small GPT-2 with the real vocabulary and context, so the real tokenizer and every task run on it.
SMALL_GPT2 = dict(n_embd=64, n_layer=2, n_head=4, n_positions=1024, vocab_size=50257)

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


def write_hub_cache(home: Path, weights: str | None = "model.safetensors", seed: int = 0, **cfg) -> Path:
    """``home`` laid out as HF_HOME after ``gpt2`` was downloaded: ``hub/models--gpt2/refs/main``
    naming ``snapshots/<commit>/`` with config.json, the weights (``model.safetensors``,
    ``pytorch_model.bin``, or none: a partial cache) and the real tokenizer files.
    Returns the snapshot folder."""
    import shutil

    repo = home / "hub" / "models--gpt2"
    snapshot = repo / "snapshots" / CACHE_COMMIT
    make_hf_folder(snapshot, seed=seed, safetensors=weights != "pytorch_model.bin", **(cfg or SMALL_GPT2))
    if weights is None:
        (snapshot / "model.safetensors").unlink()
    for name in GPT2_TOKENIZER_FILES:
        shutil.copy(SHARED / "gpt2-tokenizer" / name, snapshot / name)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(CACHE_COMMIT)
    return snapshot


@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory) -> Path:
    """HF_HOME with a complete cached ``gpt2`` (small random weights in model.safetensors)."""
    home = tmp_path_factory.mktemp("hf_home")
    write_hub_cache(home)
    return home


@pytest.fixture
def use_hub_cache(monkeypatch):
    """A function pointing the hub at an HF_HOME for this test only: HF_HUB_OFFLINE=1, or unset as
    on a machine without network. The memoised hub and tokenizer lookups are cleared when it is
    called and after the test, so no other test sees this cache."""
    from models import loading

    def use(home: Path, offline: bool = True) -> None:
        monkeypatch.setenv("HF_HOME", str(home))
        monkeypatch.delenv("HF_HUB_CACHE", raising=False)
        if offline:
            monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        else:
            monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        loading.hub_reachable.cache_clear()
        loading.load_tokenizer.cache_clear()

    yield use
    loading.hub_reachable.cache_clear()
    loading.load_tokenizer.cache_clear()


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
