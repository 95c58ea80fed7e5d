"""Graders' check: our GPT-2 gives the same hidden states as ``transformers``.

With the hub reachable it compares on the pretrained ``gpt2`` weights (the
course's check); offline it builds a random ``transformers`` GPT-2, saves it in
Hugging Face format and loads that folder into our model, so the comparison
still goes through the real loading path. It prints which it did. Tolerance is
1e-5 in float32 (the course starter used 1e-1). Runnable as
``python sanity_check.py`` and collected by pytest.
"""

from __future__ import annotations

import sys
import tempfile

import torch

from models.gpt2 import GPT2Model
from models.loading import hub_reachable

ATOL = 1e-5
SENTENCES = ["Hello, I am a language model,", "Paris is the capital of"]


def random_hf_folder(folder: str, seed: int = 0, **hf_config) -> str:
    """A random-init ``transformers`` GPT-2 LM saved in Hugging Face format."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = dict(n_embd=96, n_layer=3, n_head=4, n_positions=64, vocab_size=50257)
    cfg.update(hf_config)
    GPT2LMHeadModel(GPT2Config(**cfg)).save_pretrained(folder)
    return folder


def compare(name_or_dir: str, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> float:
    """Max |ours - transformers| of the last hidden state over real tokens."""
    from transformers import GPT2Model as HFGPT2Model

    ours = GPT2Model.from_pretrained(name_or_dir).eval()
    theirs = HFGPT2Model.from_pretrained(name_or_dir).eval()
    # Positions count real tokens only, as our model derives them from the mask.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        a = ours(input_ids, attention_mask)["last_hidden_state"]
        b = theirs(input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
    real = attention_mask.bool()
    return (a - b)[real].abs().max().item()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    from models.loading import load_tokenizer

    tok = load_tokenizer(verbose=False)
    enc = tok(SENTENCES, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def test_gpt2() -> None:
    input_ids, attention_mask = batch()
    if hub_reachable():
        source = "gpt2"
        print("sanity check: pretrained 'gpt2' from the hub")
        diff = compare("gpt2", input_ids, attention_mask)
    else:
        source = "a random-init GPT-2 saved in Hugging Face format (hub unreachable)"
        print(f"sanity check: {source}")
        with tempfile.TemporaryDirectory() as d:
            diff = compare(random_hf_folder(d), input_ids, attention_mask)
    print(f"max abs difference from transformers: {diff:.2e} (tolerance {ATOL:.0e})")
    assert diff < ATOL, f"our GPT-2 differs from transformers on {source} by {diff:.2e}"


if __name__ == "__main__":
    test_gpt2()
    print("Your GPT2 implementation is correct!")
    sys.exit(0)
