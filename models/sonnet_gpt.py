"""The sonnet task's model: GPT-2 as a language model (the course starter's ``SonnetGPT``), also
what pretraining on plain text trains."""

from __future__ import annotations

import torch
from torch import nn

from models.generation import generate
from models.gpt2 import GPT2Model
from modules.losses import lm_loss, shifted_targets


class SonnetGPT(nn.Module):
    """GPT-2 as a language model for sonnets: next-token logits through the tied
    embedding at every position, a padding-aware LM loss, and decoding through
    ``models.generation`` (every strategy, with the KV cache)."""

    head: tuple[str, ...] = ()  # no parameters outside the body: LoRA trains only the adapters

    def __init__(self, gpt: GPT2Model) -> None:
        super().__init__()
        self.gpt = gpt

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) token ids -> (B, T, V) next-token logits (the starter's ``SonnetGPT.forward``)."""
        return self.gpt.hidden_state_to_token(self.gpt(input_ids, attention_mask)["last_hidden_state"])

    def loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over real tokens only: a target counts when it and the
        position predicting it are real (the starter averaged over padding too; under left
        padding the first real token was also "predicted" from a pad). Chunked over the
        vocabulary, so the (B, T, V) logits are never held at once."""
        h = self.gpt(input_ids, attention_mask)["last_hidden_state"]  # (B, T, d)
        targets = shifted_targets(input_ids, attention_mask)  # (B, T-1)
        return lm_loss(h[:, :-1], self.gpt.wte.weight, targets)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """``models.generation.generate`` on the body: (B, P) left-padded prompts -> (B, P + new)."""
        return generate(self.gpt, input_ids, attention_mask, **kwargs)
