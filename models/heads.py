"""Task models built on GPT2Model.

Each head keeps the body under ``self.gpt`` (the starter's name) and names its own new
modules in ``head``, so that ``methods.fine_tune.set_fine_tune_mode`` and checkpoints treat
every task alike. The sentiment classifier is also the KD pipeline's small GPT-2 student.
Add new task heads below the sentiment classifier. The sonnet LM is ``models.sonnet_gpt``
(it decodes, so it brings the decoding strategies; the classification heads need none).

Pooling (``pool``): sentence representations from GPT-2 hidden states, ``--pooling last|mean``
(the classifier head's and the training objectives'). ``last`` is the course's choice: with
causal attention only the last real token has read the whole sentence. ``mean`` averages the
hidden states of the real tokens, which SimCSE-style contrastive objectives often prefer (every
position contributes, so no single state carries the whole sentence). Both read the attention
mask, so they give the same vector for a text whether the batch was padded on the left or on the right.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from models.gpt2 import GPT2Model, last_index

POOLINGS = ("last", "mean")


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None, pooling: str = "last") -> torch.Tensor:
    """(B, T, d) hidden states and (B, T) mask (1 = real token; None = all real) -> (B, d).

    ``mean`` divides by the number of real tokens of each row, so pad positions, whatever
    their states hold, contribute nothing. A row with no real token gives zeros."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    B, T, _ = hidden.shape
    if pooling == "last":
        return hidden[torch.arange(B, device=hidden.device), last_index(attention_mask, T)]  # (B, d)
    if attention_mask is None:
        return hidden.mean(1)
    m = attention_mask[:, -T:].to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, d)


class GPT2SentimentClassifier(nn.Module):
    """GPT-2, dropout, and a linear layer on a sentence representation: by default the hidden
    state of the last real token (the course starter's design: with causal attention only that
    position has read the whole sentence), or with ``pooling="mean"`` the mean over the real
    tokens (``pool``; the same under left and right padding). The pooling has no
    parameters, so a checkpoint does not show it: runs save it beside the weights
    (``extra["pooling"]``) and rebuild the head with ``pooling_of(extra)``."""

    head = ("classifier",)

    def __init__(self, gpt: GPT2Model, num_labels: int, hidden_dropout_prob: float = 0.3,
                 pooling: str = "last") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.gpt = gpt
        self.num_labels = num_labels
        self.pooling = pooling
        self.dropout = nn.Dropout(hidden_dropout_prob)
        self.classifier = nn.Linear(gpt.config.hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids and mask -> (B, num_labels) logits."""
        out = self.gpt(input_ids, attention_mask)
        if self.pooling == "last":
            sentence = out["last_token"]  # (B, d)
        else:
            sentence = pool(out["last_hidden_state"], attention_mask, self.pooling)  # (B, d)
        return self.classifier(self.dropout(sentence))  # (B, num_labels)


def pooling_of(extra: Mapping[str, Any]) -> str:
    """The pooling a classifier checkpoint's ``extra`` records (``extra["pooling"]``, else its saved
    flags); checkpoints written before ``--pooling`` existed used the last token."""
    return extra.get("pooling") or extra.get("args", {}).get("pooling") or "last"


YES_TOKEN_ID = 8505  # GPT-2's "yes"
NO_TOKEN_ID = 3919  # GPT-2's "no"


class ClozeParaphraseScorer(nn.Module):
    """GPT-2 answering "Are these questions asking the same thing?" with its own LM head:
    the logits of "no" and "yes" at the last real token of the prompt (right or left padded).

    No new parameters: the answer comes through the tied embedding, so a pretrained model
    starts from its language prior instead of a random linear head. Column 0 of
    ``answer_logits`` is "no" and column 1 "yes", so a 0/1 label indexes it directly."""

    head: tuple[str, ...] = ()  # nothing outside the body: LoRA trains only the adapters
    answer_ids: tuple[int, int] = (NO_TOKEN_ID, YES_TOKEN_ID)

    def __init__(self, gpt: GPT2Model) -> None:
        super().__init__()
        self.gpt = gpt

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) prompts -> (B, V) vocabulary logits of the token after each prompt."""
        last_token = self.gpt(input_ids, attention_mask)["last_token"]  # (B, d)
        return self.gpt.hidden_state_to_token(last_token)  # (B, V)

    def answer_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) prompts -> (B, 2) logits of ("no", "yes"): the same numbers as columns
        (3919, 8505) of ``forward``, from two embedding rows instead of all V."""
        last_token = self.gpt(input_ids, attention_mask)["last_token"]  # (B, d)
        return nn.functional.linear(last_token, self.gpt.wte.weight[list(self.answer_ids)])  # (B, 2)

    def loss(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor,
        full_vocab: bool = False,
    ) -> torch.Tensor:
        """Cross-entropy of the right answer token for 0/1 ``labels`` (B,): among the two
        answers only (a binary classifier; the default), or over the whole vocabulary (the
        starter's loss, which also spends effort pushing every other token down)."""
        return self.answer_loss(self.scores(input_ids, attention_mask, full_vocab), labels, full_vocab)

    def scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               full_vocab: bool = False) -> torch.Tensor:
        """The logits ``loss`` reads: (B, V) over the vocabulary with ``full_vocab``, else the
        (B, 2) answer logits (what the training objectives regularise)."""
        return self(input_ids, attention_mask) if full_vocab else self.answer_logits(input_ids, attention_mask)

    @classmethod
    def answer_loss(cls, logits: torch.Tensor, labels: torch.Tensor, full_vocab: bool = False) -> torch.Tensor:
        """Cross-entropy of the right answer for 0/1 ``labels`` given ``scores``' logits."""
        if full_vocab:
            targets = torch.tensor(cls.answer_ids, device=labels.device)[labels]  # (B,) token ids
            return nn.functional.cross_entropy(logits.float(), targets)
        return nn.functional.cross_entropy(logits.float(), labels)

    def p_yes(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) probability of "yes" given that the answer is "yes" or "no"."""
        return self.answer_logits(input_ids, attention_mask).float().softmax(-1)[:, 1]

    @classmethod
    def answer_token(cls, labels: Sequence[int] | torch.Tensor) -> list[int]:
        """0/1 labels as the answer token ids (3919/8505) the course's prediction files hold."""
        return [cls.answer_ids[int(y)] for y in labels]
