"""Direct Preference Optimization (Rafailov et al. 2023, "Direct Preference Optimization:
Your Language Model is Secretly a Reward Model"), for sonnet models.

DPO fine-tunes a policy on pairs (prompt x, chosen y_w, rejected y_l) against a frozen
reference copy of the starting model, with no reward model and no sampling during
training. With the implicit reward r(x, y) = beta * (log pi(y|x) - log ref(y|x)),
the loss per pair is the Bradley-Terry negative log-likelihood

    -log sigmoid( beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))) )

where each log-probability is the *sum* over the completion's tokens only: the prompt
is conditioned on, never scored. At the start (policy == reference) the loss is log 2
for every pair; its gradient raises log pi(y_w|x) and lowers log pi(y_l|x), weighted by
how wrongly the implicit reward currently orders the pair (sigmoid of the negated margin).
``beta`` sets how far the policy may move from the reference (the paper uses 0.1-0.5).

The pieces, in the order a run uses them (the handout's extension: sample several
completions per training prompt from a fine-tuned model, rank them, train):

- ``build_pairs``: chosen/rejected pairs from ranked candidates (e.g. by ``tasks.sonnet_dpo.chrf_scores``
  against the true continuation, or by ``tasks.sonnet_form.form_score``), best against worst or every pair
  whose scores differ by more than a margin; deterministic, and ties never form a pair;
- ``encode_pair`` + ``pair_collator``: token ids of prompt + completion with a mask of the
  completion tokens, padded on the right into one batch;
- ``completion_logprobs``: summed log-probabilities of the completions under a causal LM
  (``models.sonnet_gpt.SonnetGPT``, a bare ``GPT2Model``, or anything returning logits);
- ``dpo_loss`` and ``dpo_batch_loss`` / ``make_dpo_loss_fn``: the loss, as a
  ``loss_fn(model, batch)`` for ``engine.trainer.Trainer``, against ``frozen_reference``.

Dropout: the reference runs in eval mode; for the zero-margin start to hold during
training too, build the policy with dropout off (as TRL's DPO trainer does by default).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from engine.data import PadCollator

DEFAULT_BETA = 0.1  # the --dpo_beta of every task
PAIR_STRATEGIES = ("best_worst", "all")
SIDES = ("chosen", "rejected")


# ----------------------------------------------------------------- the loss


class DPOOutput(NamedTuple):
    """The mean loss and, detached, what DPO runs log: the implicit rewards of each side,
    the fraction of pairs they order correctly, and the mean reward margin."""

    loss: torch.Tensor
    chosen_rewards: torch.Tensor  # (B,) beta * (log pi - log ref) of the chosen completions
    rejected_rewards: torch.Tensor  # (B,)
    accuracy: torch.Tensor  # fraction of pairs with chosen reward > rejected reward
    margin: torch.Tensor  # mean (chosen reward - rejected reward)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = DEFAULT_BETA,
) -> DPOOutput:
    """The DPO loss, averaged over pairs, from (B,) summed completion log-probabilities under
    the policy and the reference (the latter carry no gradient)."""
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    shapes = {tuple(t.shape) for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)}
    if len(shapes) != 1:
        raise ValueError(f"log-probability tensors must share one shape, got {sorted(shapes)}")
    chosen = policy_chosen.float() - ref_chosen.float().detach()  # (B,) log pi/ref of y_w
    rejected = policy_rejected.float() - ref_rejected.float().detach()  # (B,)
    logits = beta * (chosen - rejected)  # (B,) reward margin
    loss = -F.logsigmoid(logits).mean()
    cr, rr = (beta * chosen).detach(), (beta * rejected).detach()
    return DPOOutput(loss, cr, rr, (cr > rr).float().mean(), (cr - rr).mean())


# ----------------------------------------------------------------- log-probabilities


def completion_logprobs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    chunk_rows: int = 256,
) -> torch.Tensor:
    """(B,) sum of log p(token | tokens before it) over the tokens where ``completion_mask``
    (B, T) is 1, i.e. log p(completion | prompt): the prompt and padding are masked out.

    ``model`` is a ``SonnetGPT`` (its body ``model.gpt`` is used), a ``GPT2Model`` (anything
    with ``hidden_state_to_token``), or any module returning (B, T, V) logits. For the first two
    the vocabulary logits are computed only at scored positions, ``chunk_rows`` at a time, so a
    reference pass under ``no_grad`` never holds (B, T, V)."""
    if not (input_ids.shape == attention_mask.shape == completion_mask.shape):
        raise ValueError(f"input_ids {tuple(input_ids.shape)}, attention_mask {tuple(attention_mask.shape)} and "
                         f"completion_mask {tuple(completion_mask.shape)} must match")
    # Token t is predicted at position t - 1; the first token of a row is never scored.
    scored = (completion_mask[:, 1:] != 0) & (attention_mask[:, 1:] != 0)  # (B, T-1)
    rows, cols = scored.nonzero(as_tuple=True)  # (N,), (N,)
    targets = input_ids[:, 1:][rows, cols]  # (N,)
    body = getattr(model, "gpt", model)
    if hasattr(body, "hidden_state_to_token"):
        h = body(input_ids, attention_mask)["last_hidden_state"][:, :-1][rows, cols]  # (N, d)
        parts = []
        for s in range(0, h.size(0), chunk_rows):
            logits = body.hidden_state_to_token(h[s:s + chunk_rows]).float()  # (c, V)
            parts.append(logits.log_softmax(-1).gather(-1, targets[s:s + chunk_rows, None])[:, 0])
        token_lp = torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)  # (N,)
    else:
        logits = model(input_ids, attention_mask)[:, :-1].float()  # (B, T-1, V)
        token_lp = logits.log_softmax(-1)[rows, cols].gather(-1, targets[:, None])[:, 0]  # (N,)
    out = torch.zeros(input_ids.size(0), dtype=torch.float32, device=input_ids.device)
    return out.index_add(0, rows, token_lp)  # (B,)


# ----------------------------------------------------------------- pairs


@dataclass(frozen=True)
class PreferencePair:
    """One DPO training pair: two completions of the same prompt, the better-scored chosen."""

    prompt_index: int
    prompt: str
    chosen: str
    rejected: str
    chosen_score: float
    rejected_score: float

    @property
    def margin(self) -> float:
        return self.chosen_score - self.rejected_score


def build_pairs(
    prompts: Sequence[str],
    candidates: Sequence[Sequence[str]],
    scores: Sequence[Sequence[float]],
    *,
    strategy: str = "best_worst",
    min_margin: float = 0.0,
) -> list[PreferencePair]:
    """Chosen/rejected pairs from each prompt's candidate completions and their scores (higher
    is better). ``best_worst``: one pair per prompt, the best candidate against the worst (the
    first of equals, in candidate order); ``all``: every two candidates, in candidate order.
    A pair is formed only when the scores differ by more than ``min_margin`` (>= 0: ties never
    pair, and a larger margin keeps only preferences the scorer is sure of) and the two texts
    differ. The same inputs always give the same pairs in the same order."""
    if strategy not in PAIR_STRATEGIES:
        raise ValueError(f"strategy must be one of {PAIR_STRATEGIES}, got {strategy!r}")
    if min_margin < 0:
        raise ValueError(f"min_margin must be >= 0, got {min_margin}")
    if not (len(prompts) == len(candidates) == len(scores)):
        raise ValueError(f"{len(prompts)} prompts, {len(candidates)} candidate lists and {len(scores)} score lists")
    pairs: list[PreferencePair] = []
    for p, (prompt, texts, sc) in enumerate(zip(prompts, candidates, scores, strict=True)):
        if len(texts) != len(sc):
            raise ValueError(f"prompt {p}: {len(texts)} candidates but {len(sc)} scores")
        if any(not math.isfinite(s) for s in sc):
            raise ValueError(f"prompt {p}: scores must be finite, got {list(sc)}")
        if strategy == "best_worst":
            if not texts:
                continue
            best = max(range(len(sc)), key=lambda i: (sc[i], -i))  # first of the best
            worst = min(range(len(sc)), key=lambda i: (sc[i], i))  # first of the worst
            candidates_ij = [(best, worst)]
        else:
            candidates_ij = [(i, j) if sc[i] >= sc[j] else (j, i)
                             for i in range(len(texts)) for j in range(i + 1, len(texts))]
        for c, r in candidates_ij:
            if sc[c] - sc[r] > min_margin and texts[c] != texts[r]:
                pairs.append(PreferencePair(p, prompt, texts[c], texts[r], float(sc[c]), float(sc[r])))
    return pairs


# ----------------------------------------------------------------- batches


def encode_completion(tokenizer: Any, prompt: str, completion: str, max_length: int) -> tuple[list[int], list[int]]:
    """(ids, completion mask) of prompt + completion, tokenised apart and joined, as decoding
    produces them (prompt ids, then generated ids; joint BPE could merge across the seam).
    A completion the model ended with EOS (its text ends with ``tokenizer.eos_token``, as
    ``tasks.sonnet.continue_prompts(keep_eos=True)`` decodes it) is scored with that EOS token, as
    TRL's DPOTrainer appends one: the ending is part of what is preferred. One cut off at
    ``max_new_tokens`` has none, so a finished sonnet can be preferred over a cut one.
    Too long: the completion is cut on the right (its EOS first), the prompt is kept whole."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    eos = getattr(tokenizer, "eos_token", None)
    ended = bool(eos) and completion.endswith(eos)
    c = tokenizer(completion.removesuffix(eos) if ended else completion, add_special_tokens=False)["input_ids"]
    c = c + [tokenizer.eos_token_id] if ended else c
    if not c:
        raise ValueError("empty completion: nothing to score")
    room = max_length - len(p)
    if room < 1:
        raise ValueError(f"prompt of {len(p)} tokens leaves no room for a completion within {max_length}")
    c = c[:room]
    return p + c, [0] * len(p) + [1] * len(c)


def encode_pair(tokenizer: Any, pair: PreferencePair, max_length: int) -> dict[str, list[int]]:
    """One example for ``pair_collator``: ids, attention and completion masks of both sides."""
    ex: dict[str, list[int]] = {}
    for side in SIDES:
        ids, mask = encode_completion(tokenizer, pair.prompt, getattr(pair, side), max_length)
        ex.update({f"{side}_input_ids": ids, f"{side}_attention_mask": [1] * len(ids),
                   f"{side}_completion_mask": mask})
    return ex


def pair_collator(pad_id: int) -> PadCollator:
    """Pads ``encode_pair`` examples on the right (ids with ``pad_id``, masks with 0)."""
    pads = {f"{side}_{k}": v for side in SIDES
            for k, v in (("input_ids", pad_id), ("attention_mask", 0), ("completion_mask", 0))}
    return PadCollator(pad_id, pads)


def _stack_sides(batch: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """(2B, T): the chosen rows, then the rejected rows, right-padded with 0 to one length."""
    a, b = batch[f"chosen_{key}"], batch[f"rejected_{key}"]
    T = max(a.size(1), b.size(1))
    return torch.cat([F.pad(a, (0, T - a.size(1))), F.pad(b, (0, T - b.size(1)))])


def pair_logprobs(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed completion log-probabilities, (B,) each, from one forward pass
    over both sides (pad ids beyond a row's mask are never attended to or scored)."""
    ids, att, comp = (_stack_sides(batch, k) for k in ("input_ids", "attention_mask", "completion_mask"))
    lp = completion_logprobs(model, ids, att, comp)  # (2B,)
    B = batch["chosen_input_ids"].size(0)
    return lp[:B], lp[B:]


def disable_dropout(model: nn.Module) -> nn.Module:
    """Every dropout of ``model`` set to 0 (``nn.Dropout`` modules, LoRA's included, and the
    attention-probability dropout that ``modules.attention`` applies functionally)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attn_dropout", None), float):
            m.attn_dropout = 0.0
    return model


def frozen_reference(model: nn.Module) -> nn.Module:
    """A frozen copy of the starting policy: eval mode (no dropout), no gradients."""
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of ``model``'s weights as it runs: its token embedding's (a GPT-2 body's ``wte``),
    else its first floating parameter's. Under FSDP2 the loss runs inside the root's forward, where
    the root's own weights (embeddings, final LayerNorm) are unsharded in the policy's parameter
    dtype while the blocks' are still float32 shards."""
    wte = getattr(getattr(model, "gpt", model), "wte", None)
    if isinstance(wte, nn.Embedding):
        return wte.weight.dtype
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def follow_policy(reference: nn.Module, policy: nn.Module, device: torch.device) -> None:
    """The reference computes as the policy does: on ``device``, its weights in the policy's dtype.
    FSDP2 on CUDA runs the policy with bf16 weights, embeddings and LayerNorms included, where
    autocast alone would keep a float32 reference's in float32, and the loss would not start at
    log 2. Cast in place, once: a bf16 copy of the reference is what FSDP2 makes of its weights."""
    weight = next(reference.parameters())
    dtype = compute_dtype(policy)
    if weight.device != device or weight.dtype != dtype:
        reference.to(device=device, dtype=dtype)


def dpo_batch_loss(policy: nn.Module, reference: nn.Module, batch: dict[str, torch.Tensor],
                   beta: float = DEFAULT_BETA) -> DPOOutput:
    """DPO on a ``pair_collator`` batch: policy log-probabilities with gradients, the reference's
    without (moved first to the batch's device and the policy's dtype: ``follow_policy``)."""
    follow_policy(reference, policy, batch["chosen_input_ids"].device)
    policy_c, policy_r = pair_logprobs(policy, batch)
    with torch.no_grad():
        ref_c, ref_r = pair_logprobs(reference, batch)
    return dpo_loss(policy_c, policy_r, ref_c, ref_r, beta)


def make_dpo_loss_fn(reference: nn.Module, beta: float = DEFAULT_BETA) -> Callable[[nn.Module, Any], torch.Tensor]:
    """``loss_fn(model, batch)`` for ``engine.trainer.Trainer``: the DPO loss against ``reference``."""

    def loss_fn(model: nn.Module, batch: Any) -> torch.Tensor:
        return dpo_batch_loss(model, reference, batch, beta).loss

    return loss_fn
