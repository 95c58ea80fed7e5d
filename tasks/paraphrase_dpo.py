"""DPO for paraphrase detection: the cloze answer as a preference (``paraphrase_detection.py
--dpo``, ``--dpo_beta``).

The cloze scorer (``models.heads.ClozeParaphraseScorer``) answers a prompt with the next token,
"yes" or "no". Read as a preference pair, each labelled prompt x has the right answer as the chosen
completion y_w and the other as the rejected y_l, one token each, so the completion
log-probabilities of DPO (``methods.dpo``) are the log-softmax over the whole vocabulary of the
token after the prompt, at the two answer ids:

    loss = -log sigmoid(beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))))

against a frozen copy of the starting scorer (``methods.dpo.frozen_reference``; with ``--resume``,
the model the run started from, as the run rebuilds it before the trainer loads ``last.pt``). With the policy
equal to the reference the loss is log 2 for every prompt; unlike the cross-entropy of the answer
token it moves the two answers only relative to the reference, so a pretrained model's language
prior is kept within ``beta``. Use it where a task takes a ``loss_fn(model, batch)`` over
``tasks.quora_data.paraphrase_features`` batches (``input_ids``, ``attention_mask``, ``labels``):

    loss_fn = dpo_training_loss(scorer, beta=0.1)  # dropout off, then a frozen copy as the reference
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from methods.dpo import DEFAULT_BETA, DPOOutput, disable_dropout, dpo_loss, follow_policy, frozen_reference


def answer_logprobs(scorer: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, 2) log p("no" | prompt), log p("yes" | prompt) over the whole vocabulary (the completion
    log-probabilities of one-token answers)."""
    logits = scorer(input_ids, attention_mask).float()  # (B, V) the token after each prompt
    return logits.log_softmax(-1)[:, list(scorer.answer_ids)]  # (B, 2)


def chosen_rejected(logprobs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) log-probabilities of the right answer (column ``label``) and of the other one."""
    rows = torch.arange(labels.size(0), device=labels.device)
    labels = labels.long()
    return logprobs[rows, labels], logprobs[rows, 1 - labels]


def paraphrase_dpo_loss(policy: nn.Module, reference: nn.Module, batch: Mapping[str, torch.Tensor],
                        beta: float = DEFAULT_BETA) -> DPOOutput:
    """DPO on a batch of labelled cloze prompts: the right answer chosen, the other rejected."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    follow_policy(reference, policy, ids.device)
    policy_c, policy_r = chosen_rejected(answer_logprobs(policy, ids, mask), labels)
    with torch.no_grad():
        ref_c, ref_r = chosen_rejected(answer_logprobs(reference, ids, mask), labels)
    return dpo_loss(policy_c, policy_r, ref_c, ref_r, beta)


def make_paraphrase_dpo_loss_fn(reference: nn.Module,
                                beta: float = DEFAULT_BETA) -> Callable[[nn.Module, Any], torch.Tensor]:
    """``loss_fn(model, batch)`` for ``engine.trainer.Trainer``: ``paraphrase_dpo_loss``'s loss."""

    def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        return paraphrase_dpo_loss(model, reference, batch, beta).loss

    return loss_fn


def dpo_training_loss(scorer: nn.Module, beta: float) -> Callable[[nn.Module, Any], torch.Tensor]:
    """The loss of a ``--dpo`` run, made before training: ``scorer``'s dropout is turned off, so
    that the policy starts equal to the reference (loss log 2) and stays comparable with it, and a
    frozen copy of it is the reference."""
    return make_paraphrase_dpo_loss_fn(frozen_reference(disable_dropout(scorer)), beta)


__all__ = ["answer_logprobs", "chosen_rejected", "dpo_training_loss", "make_paraphrase_dpo_loss_fn",
           "paraphrase_dpo_loss"]
