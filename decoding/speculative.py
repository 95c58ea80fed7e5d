"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a small draft model proposes
``k`` tokens one at a time, the target scores all of them in one forward pass over the k + 1
new positions, and a rejection rule keeps a prefix of the proposals plus one token of the
target's own.

Why it is exact, not an approximation of the target:
- greedy: a proposal is kept while it is the target's argmax at its position, and the first
  disagreement is replaced by the target's argmax, so the tokens are the target's own greedy
  output (``models.generation.generate``) whatever the draft proposes;
- sampling: proposal x drawn from the draft's q is kept with probability min(1, p(x) / q(x)),
  and on rejection a token is drawn from norm(max(0, p - q)); each emitted token then follows
  the target's p exactly. p and q are the processed distributions: temperature, top-k, top-p,
  repetition penalty and n-gram blocking (``models.decoding.logits_processors``) apply to both,
  each at its own position.

Both models keep their own KV cache; after a rejection each is cut back to the accepted length
(``truncate_cache``), so no position is ever recomputed. The gain is the target's forward passes:
one per accepted run instead of one per token, which pays when the draft is much cheaper than
the target and agrees with it often (``SpeculativeStats``). One prompt at a time (batch 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from errors import InputError
from models.decoding import DecoderLM, Processor, logits_processors
from models.generation import check_prompts
from models.generation_config import GenerationConfig
from modules.kv_cache import BaseKVCache, KVCache


@dataclass
class SpeculativeStats:
    """Counts over one or more ``speculative_generate`` calls (pass the same object to each)."""

    proposed: int = 0  # draft tokens the target scored
    accepted: int = 0  # of those, the ones kept
    target_forwards: int = 0
    generated: int = 0  # tokens emitted (accepted drafts + one target token per forward)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    def summary(self) -> str:
        """The line a command prints after decoding."""
        per = self.generated / self.target_forwards if self.target_forwards else 0.0
        return (f"speculative decoding: {self.accepted} of {self.proposed} drafted tokens accepted "
                f"(acceptance rate {self.acceptance_rate:.1%}), {per:.2f} tokens per target forward")


class DraftMismatch(InputError, ValueError):
    """A draft model that cannot propose tokens for the target (a command prints it as one error line)."""


def check_draft(target: DecoderLM, draft: DecoderLM) -> None:
    """Refuse a draft whose token ids mean something else: both must share one vocabulary."""
    tv, dv = target.config.vocab_size, draft.config.vocab_size
    if tv != dv:
        raise DraftMismatch(f"the draft model's vocabulary has {dv} tokens and the target's {tv}: "
                         "speculative decoding needs a draft with the target's tokenizer")


class PrunedDraft(nn.Module):
    """A draft that proposes only tokens of ``keep`` (e.g. a corpus's most frequent ones,
    ``frequent_tokens``): its logits come from those rows of the (V, d) ``embedding`` alone and are
    -inf elsewhere, so its vocabulary head costs len(keep) / V of the full one. The output stays
    exact: greedy verification catches any token the draft cannot propose, and for sampling the
    rejection rule's residual max(0, p - q) is p itself where q is 0 (after FR-Spec, Zhao et al. 2025)."""

    def __init__(self, model: DecoderLM, embedding: torch.Tensor, keep: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("keep", keep.to(embedding.device))
        self.register_buffer("rows", embedding.detach()[self.keep].clone())  # (n, d)
        self.train(model.training)  # an inference copy refuses train(True)

    @property
    def config(self):
        return self.model.config

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return self.model(*args, **kwargs)

    def hidden_state_to_token(self, hidden_state: torch.Tensor) -> torch.Tensor:
        full = hidden_state.new_full((*hidden_state.shape[:-1], self.config.vocab_size), float("-inf"))
        full[..., self.keep] = F.linear(hidden_state, self.rows)
        return full  # (..., V)

    def new_cache(self, batch_size: int, max_length: int, dtype: torch.dtype | None = None) -> BaseKVCache:
        return self.model.new_cache(batch_size, max_length, dtype)


def frequent_tokens(token_ids: torch.Tensor, n: int, vocab_size: int) -> torch.Tensor:
    """The ``n`` most frequent ids of a tokenised corpus, the vocabulary a ``PrunedDraft`` keeps."""
    return torch.bincount(token_ids.flatten(), minlength=vocab_size).topk(min(n, vocab_size)).indices.sort().values


def truncate_cache(cache: BaseKVCache, length: int) -> None:
    """Forget every cached position from ``length`` on (a rejected proposal's keys and values).
    Only ``KVCache`` itself can simply go back: it holds every position at its own slot and
    counts them in ``length`` alone, whereas a ring overwrites old slots and a static cache
    keeps its position on the device too."""
    if type(cache) is not KVCache:
        raise ValueError(f"speculative decoding rolls back a KVCache only: {type(cache).__name__} cannot be "
                         "rolled back")
    if not 0 <= length <= cache.length:
        raise ValueError(f"cannot truncate a cache of {cache.length} positions to {length}")
    cache.length = length


def _scores(model: DecoderLM, cache: BaseKVCache, seqs: torch.Tensor, end: int, last: int,
            process: Processor | None) -> torch.Tensor:
    """Processed float32 scores (last, V) after positions end - last .. end - 1 of ``seqs`` (1, T):
    feeds the tokens the cache lacks, each score row processed against its own prefix."""
    hidden = model(seqs[:, cache.length : end], cache=cache)["last_hidden_state"][0, -last:]  # (last, d)
    scores = model.hidden_state_to_token(hidden).float()  # (last, V)
    if process is None:
        return scores
    start = end - last + 1
    return torch.cat([process(scores[i : i + 1], seqs[:, : start + i]) for i in range(last)])


def _accept(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor,
            generator: torch.Generator | None) -> tuple[int, torch.Tensor]:
    """The rejection rule over n proposals: p (n + 1, V) target and q (n, V) draft probabilities.
    Returns the number kept and the token that follows them (a residual draw after a rejection,
    a draw from the target's last row when every proposal is kept)."""
    n = drafts.numel()
    rows = torch.arange(n, device=p.device)
    u = torch.rand(n, device=p.device, generator=generator)
    keep = u * q[rows, drafts] < p[rows, drafts]  # u < p / q without dividing by a small q
    a = int(keep.long().cumprod(0).sum())
    dist = p[a]
    if a < n:
        residual = (p[a] - q[a]).clamp(min=0)
        dist = residual if bool(residual.sum() > 0) else p[a]  # p == q to rounding: nothing to correct
    return a, torch.multinomial(dist, 1, generator=generator)


def _pick(scores: torch.Tensor, do_sample: bool, generator: torch.Generator | None
          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The draft's proposal from its (1, V) scores, and the distribution it was drawn from."""
    if not do_sample:
        return scores.argmax(-1), None
    probs = scores.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0], probs


def _finished(seqs: torch.Tensor, start: int, end: int, config: GenerationConfig) -> int | None:
    """The length after the first new token in [start, end) that ends the row (EOS or ``stop``)."""
    for t in range(start, end):
        if config.eos_token_id is not None and int(seqs[0, t]) == config.eos_token_id:
            return t + 1
        if config.stop is not None and bool(config.stop(seqs[:, : t + 1])[0]):
            return t + 1
    return None


@torch.no_grad()
def speculative_generate(target: DecoderLM, draft: DecoderLM, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor | None = None, *, config: GenerationConfig, k: int = 4,
                         generator: torch.Generator | None = None,
                         stats: SpeculativeStats | None = None) -> torch.Tensor:
    """``generate(target, ...)``'s output (1, P + new) for greedy decoding or sampling, with
    ``draft`` proposing up to ``k`` tokens per target forward. Greedy tokens equal the target's
    own; samples follow the target's distribution. Counts go to ``stats`` if given."""
    if input_ids.size(0) != 1:
        raise ValueError(f"speculative decoding takes one prompt at a time (batch 1), got {input_ids.size(0)}")
    if config.strategy not in ("greedy", "sample") or config.num_return_sequences != 1:
        raise ValueError(f"speculative decoding runs greedy decoding or sampling of one sequence, "
                         f"not {config.strategy} with num_return_sequences={config.num_return_sequences}")
    if not config.use_cache or config.on_token is not None:
        raise ValueError("speculative decoding needs the KV cache (use_cache=True) and streams nothing (on_token)")
    if k < 1:
        raise ValueError(f"k (draft tokens per target forward) must be >= 1, got {k}")
    check_draft(target, draft)
    mask = check_prompts(input_ids, attention_mask)
    padding = input_ids[:, :0]
    if mask is not None:  # one left-padded row: the same result as its real tokens alone
        padding, input_ids = input_ids[:, ~mask[0].bool()], input_ids[:, mask[0].bool()]
    stats = stats if stats is not None else SpeculativeStats()
    was_training = target.training, draft.training
    target.train(False)
    draft.train(False)
    try:
        out = _decode(target, draft, input_ids, config, k, generator, stats)
    finally:
        target.train(was_training[0])
        draft.train(was_training[1])
    return torch.cat([padding, out], 1)


def _decode(target: DecoderLM, draft: DecoderLM, input_ids: torch.Tensor, config: GenerationConfig, k: int,
            generator: torch.Generator | None, stats: SpeculativeStats) -> torch.Tensor:
    P = input_ids.size(1)
    total = P + config.max_new_tokens
    process = logits_processors(config, None)
    seqs = torch.zeros(1, total, dtype=torch.long, device=input_ids.device)
    seqs[:, :P] = input_ids
    target_cache, draft_cache = target.new_cache(1, total), draft.new_cache(1, total)
    cur = P
    while cur < total:
        n = min(k, total - cur - 1)  # proposals this round; the target adds one token of its own
        q = []
        for j in range(n):
            tok, probs = _pick(_scores(draft, draft_cache, seqs, cur + j, 1, process), config.do_sample, generator)
            seqs[:, cur + j] = tok
            q.append(probs)
        scores = _scores(target, target_cache, seqs, cur + n, n + 1, process)  # (n + 1, V)
        drafts = seqs[0, cur : cur + n]
        if config.do_sample:
            a, nxt = _accept(scores.softmax(-1), torch.cat(q) if n else scores[:0], drafts, generator)
        else:
            best = scores.argmax(-1)  # (n + 1,)
            a = int((best[:n] == drafts).long().cumprod(0).sum())
            nxt = best[a]
        seqs[0, cur + a] = nxt
        stats.proposed, stats.accepted, stats.target_forwards = stats.proposed + n, stats.accepted + a, \
            stats.target_forwards + 1
        end = _finished(seqs, cur, cur + a + 1, config)
        stats.generated += (end or cur + a + 1) - cur
        if end is not None:
            return seqs[:, :end]
        cur += a + 1
        truncate_cache(target_cache, cur - 1)  # every token but the newest is cached, and right
        truncate_cache(draft_cache, min(draft_cache.length, cur - 1))
    return seqs
