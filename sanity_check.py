"""Graders' check: our GPT-2 gives the same hidden states as ``transformers``.

Whenever the pretrained ``gpt2`` can be had -- from the Hugging Face cache first, else
downloaded -- both models load that same snapshot folder and are compared on it (the
course's check; no network is needed once it is cached). Only when it cannot be had does
it build a random ``transformers`` GPT-2, save it in Hugging Face format and load that
folder into our model, so the comparison still goes through the real loading path. It
prints which comparison it made and why. Tolerance is 1e-5 absolute plus 1e-5 relative
in float32 (the course starter used 1e-1). Runnable as ``python sanity_check.py`` and
collected by pytest.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from models.gpt2 import GPT2Model
from models.loading import CheckpointError, cached_hub_file, load_tokenizer, resolve_weights_dir

ATOL = RTOL = 1e-5
SENTENCES = ["Hello, I am a language model,", "Paris is the capital of"]


def random_hf_folder(folder: str, seed: int = 0, **hf_config) -> str:
    """A random-init ``transformers`` GPT-2 LM saved in Hugging Face format."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = dict(n_embd=96, n_layer=3, n_head=4, n_positions=64, vocab_size=50257)
    cfg.update(hf_config)
    GPT2LMHeadModel(GPT2Config(**cfg)).save_pretrained(folder)
    return folder


def compare(name_or_dir: str | Path, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> float:
    """Max over real tokens of |ours - transformers| beyond RTOL * |transformers|
    (<= ATOL passes), for the last hidden state."""
    from transformers import GPT2Model as HFGPT2Model

    ours = GPT2Model.from_pretrained(name_or_dir)
    assert not ours.training, "from_pretrained must return the model in eval mode, as transformers does"
    theirs = HFGPT2Model.from_pretrained(str(name_or_dir)).eval()
    # Positions count real tokens only, as our model derives them from the mask.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = ours(input_ids, attention_mask)["last_hidden_state"]
        b = theirs(input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
    real = attention_mask.bool()
    return ((a - b)[real].abs() - RTOL * b[real].abs()).max().item()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    tok = load_tokenizer(verbose=False)
    enc = tok(SENTENCES, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def pretrained_gpt2() -> tuple[Path | None, str]:
    """The snapshot folder of the pretrained ``gpt2`` (cache, else download) and where it came
    from, or None and the reason it cannot be had."""
    cached = cached_hub_file("gpt2", "config.json") is not None
    try:
        folder = resolve_weights_dir("gpt2")
    except CheckpointError as e:
        return None, str(e)
    return folder, ("the Hugging Face cache" if cached else "the hub") + f" ({folder})"


def test_gpt2() -> None:
    input_ids, attention_mask = batch()
    folder, where = pretrained_gpt2()
    if folder is not None:
        source = f"pretrained 'gpt2' from {where}"
        print(f"sanity check: {source}")
        diff = compare(folder, input_ids, attention_mask)
    else:
        source = "a random-init GPT-2 saved in Hugging Face format"
        print(f"sanity check: {source} (pretrained 'gpt2' unavailable: {where})")
        with tempfile.TemporaryDirectory() as d:
            diff = compare(random_hf_folder(d), input_ids, attention_mask)
    print(f"max difference from transformers beyond rtol {RTOL:.0e}: {diff:.2e} (tolerance {ATOL:.0e})")
    assert diff < ATOL, f"our GPT-2 differs from transformers on {source} by {diff:.2e}"


if __name__ == "__main__":
    test_gpt2()
    print("Your GPT2 implementation is correct!")
    sys.exit(0)
