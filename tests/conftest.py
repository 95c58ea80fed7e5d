"""Shared fixtures: small random ``transformers`` GPT-2 checkpoints in Hugging Face format,
Hugging Face hub caches (``$HF_HOME/hub/models--gpt2/...``) holding them, as a download leaves,
the course data, the flags of quick task runs, and a toy model for Trainer tests."""

from __future__ import annotations

import json
from collections.abc import Callable
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


@pytest.fixture(scope="session")
def tiny_sonnet_model(tmp_path_factory) -> Path:
    """A tiny random GPT-2 saved as a sonnet run saves its model (the demo's tests serve it)."""
    from config import get_config
    from methods.restore import save_model
    from models.gpt2 import GPT2Model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("demo") / "sonnet-model.pt"
    save_model(GPT2Model(get_config("tiny")), path)
    return path


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors run fastest on one thread; two stall under a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


MICRO = dict(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2)  # a micro GPT-2 config.json


def classifier_cli_args(tmp_path: Path, mode: str, *extra: str) -> list[str]:
    """``classifier.py`` flags for a quick run on a micro random GPT-2 (``tmp_path/micro``) with the
    course's sentiment files (8 examples, 1 epoch), everything written under tmp_path."""
    folder = tmp_path / "micro"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(MICRO))
    paths = []
    for ds in ("sst", "cfimdb"):
        for split, suffix in (("train", "train"), ("dev", "dev"), ("test", "test-student")):
            paths += [f"--{ds}_{split}", str(SHARED_DATA / f"ids-{ds}-{suffix}.csv")]
    return ["--fine-tune-mode", mode, "--model_size", str(folder), "--random_init",
            "--limit", "8", "--epochs", "1", "--batch_size", "4", "--max_length", "32", "--no_progress",
            "--output_dir", str(tmp_path / "runs"), "--predictions_dir", str(tmp_path / "pred"), *paths, *extra]


@pytest.fixture
def classifier_cli(tmp_path) -> Callable[..., list[str]]:
    """``classifier_cli(mode, *extra)``: ``classifier_cli_args`` in the test's tmp_path."""
    return lambda mode, *extra: classifier_cli_args(tmp_path, mode, *extra)


def sonnet_data_flags(tmp_path: Path) -> list[str]:
    """``sonnet_generation.py`` file flags: the course's sonnets, outputs and run folder under tmp_path."""
    return ["--sonnet_path", str(SHARED_DATA / "sonnets.txt"),
            "--held_out_sonnet_path", str(SHARED_DATA / "sonnets_held_out.txt"),
            "--dev_held_out_sonnet_path", str(SHARED_DATA / "sonnets_held_out_dev.txt"),
            "--dev_true_sonnet_path", str(SHARED_DATA / "TRUE_sonnets_held_out_dev.txt"),
            "--sonnet_out", str(tmp_path / "pred" / "generated_sonnets.txt"),
            "--dev_sonnet_out", str(tmp_path / "pred" / "generated_sonnets_dev.txt"),
            "--output_dir", str(tmp_path / "run"), "--no_progress"]


def make_toy_data(n: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """A linearly separable 2-class toy set for Trainer tests."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, 6, generator=g)
    y = (X[:, 0] + X[:, 1] > 0).long()
    return X, y


def make_toy_model(dropout: float = 0.2) -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(dropout),
                               torch.nn.Linear(16, 2))


def toy_loss_fn(model: torch.nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])


@pytest.fixture
def fresh_kernel_state(monkeypatch):
    """A monkeypatch under which ``decoding.cpu_kernels`` looks the kernel up again (it is looked
    up once per process), before the test and after it (e.g. ``setenv("GPT2_CPU_KERNELS", "0")``
    for PyTorch's kernels)."""
    from decoding import cpu_kernels

    cpu_kernels._load.cache_clear()
    yield monkeypatch
    monkeypatch.undo()
    cpu_kernels._load.cache_clear()
