"""What every decoding strategy shares: the step-by-step model runner, the logits
processors, and the one-token-per-step loop that greedy decoding, sampling and
contrastive search run (beam search has its own loop in ``models.beam_search``).
``models.generation.generate`` validates the inputs and dispatches here.

Why it is written this way:
- greedy decoding and sampling reproduce ``transformers``' ``generate`` token for
  token on the same weights (tests/test_generation.py), so the order of logits
  processors and the padding of finished rows follow ``transformers`` 5.x;
- with the key/value cache each new token costs one position; the loop keeps Python
  work per step small and reads back from the device only to decide whether every
  row has finished;
- strategies see the model only through ``DecoderLM`` and the cache only through
  ``modules.kv_cache.BaseKVCache``, so a plain ``GPT2Model`` and one prepared by
  ``decoding.inference.prepare_for_inference`` decode alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F

from models.generation_config import GenerationConfig
from modules.kv_cache import BaseKVCache


class DecoderLM(Protocol):
    """The model interface decoding uses (``GPT2Model``, ``decoding.inference.InferenceModel``)."""

    training: bool

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None,
                 cache: BaseKVCache | None = None) -> dict[str, torch.Tensor]: ...

    def hidden_state_to_token(self, hidden_state: torch.Tensor) -> torch.Tensor: ...

    def new_cache(self, batch_size: int, max_length: int, dtype: torch.dtype | None = None) -> BaseKVCache: ...

    def train(self, mode: bool = True): ...


class Strategy(Protocol):
    """A decoding strategy: (B, P) left-padded prompts -> (B, P + new) token ids. ``generate``
    calls it with the validated config and the sampling generator by name."""

    def __call__(self, model: DecoderLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, *,
                 config: GenerationConfig, generator: torch.Generator | None = None) -> torch.Tensor: ...


# ----------------------------------------------------------------- processors


def _repetition_penalty(scores: torch.Tensor, seqs: torch.Tensor, ignore: torch.Tensor | None, penalty: float):
    """CTRL's penalty as ``transformers`` applies it: divide positive scores and
    multiply negative ones of every token already in the row, left padding excluded."""
    V = scores.size(-1)
    ids = seqs.clamp(max=V)
    if ignore is not None:
        ids = ids.masked_fill(ignore[:, : seqs.size(1)], V)  # padding goes to a spare column
    padded = F.pad(scores, (0, 1))  # (N, V + 1)
    s = padded.gather(1, ids)
    s = torch.where(s < 0, s * penalty, s / penalty)
    return padded.scatter(1, ids, s)[:, :V]


def _no_repeat_ngram(scores: torch.Tensor, seqs: torch.Tensor, n: int) -> torch.Tensor:
    """Ban every token that would complete an n-gram already present in the row."""
    T = seqs.size(1)
    if T < n:
        return scores
    V = scores.size(-1)
    prefix = seqs[:, T + 1 - n :]  # (N, n - 1)
    windows = seqs.unfold(1, n, 1)  # (N, T - n + 1, n)
    matches = (windows[..., :-1] == prefix.unsqueeze(1)).all(-1)
    banned = scores.new_zeros((scores.size(0), V + 1), dtype=torch.bool)
    banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=V), V), True)
    return scores.masked_fill(banned[:, :V], float("-inf"))


def top_k_filter(scores: torch.Tensor, k: int, keep: int = 1) -> torch.Tensor:
    k = min(max(k, keep), scores.size(-1))
    return scores.masked_fill(scores < torch.topk(scores, k)[0][..., -1:], float("-inf"))


def top_p_filter(scores: torch.Tensor, p: float, keep: int = 1) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of tokens whose probability reaches ``p``."""
    sorted_scores, order = torch.sort(scores, descending=False)
    cum = sorted_scores.softmax(-1).cumsum(-1)
    remove = cum <= (1 - p)
    remove[..., -keep:] = False
    return scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))


Processor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (scores (N, V), seqs (N, T)) -> scores


def logits_processors(config: GenerationConfig, ignore: torch.Tensor | None, *, keep: int = 1,
                      filter_top_k: bool = True) -> Processor | None:
    """The score transforms of ``config`` in ``transformers``' order, or None when there are
    none. ``ignore`` (N, total) marks left padding; ``keep`` tokens always survive the
    filters (beam search keeps 2 per beam); ``filter_top_k=False`` when ``top_k`` means
    something else (contrastive search's candidates)."""
    c = config
    steps: list[Processor] = []
    if c.repetition_penalty != 1.0:
        steps.append(lambda s, ids: _repetition_penalty(s, ids, ignore, c.repetition_penalty))
    if c.no_repeat_ngram_size > 0:
        steps.append(lambda s, ids: _no_repeat_ngram(s, ids, c.no_repeat_ngram_size))
    if c.do_sample:
        if c.temperature != 1.0:
            steps.append(lambda s, ids: s / c.temperature)
        if c.top_k and filter_top_k:
            steps.append(lambda s, ids: top_k_filter(s, c.top_k, keep))
        if c.top_p < 1.0:
            steps.append(lambda s, ids: top_p_filter(s, c.top_p, keep))
    if not steps:
        return None

    def apply(scores: torch.Tensor, seqs: torch.Tensor) -> torch.Tensor:
        for f in steps:
            scores = f(scores, seqs)
        return scores

    return apply


def ignore_mask(attention_mask: torch.Tensor | None, total: int) -> torch.Tensor | None:
    """(N, total) True on left padding, which repetition penalty must not count."""
    if attention_mask is None:
        return None
    ignore = torch.zeros(attention_mask.size(0), total, dtype=torch.bool, device=attention_mask.device)
    ignore[:, : attention_mask.size(1)] = attention_mask == 0
    return ignore


# ---------------------------------------------------------------- model runner


class Runner:
    """Feeds the model one step at a time with or without the KV cache, so the
    decoding loops are written once. Rows may be expanded (beams, candidates)."""

    def __init__(self, model: DecoderLM, attention_mask: torch.Tensor | None, prompt_len: int,
                 config: GenerationConfig) -> None:
        self.model, self.use_cache, self.P = model, config.use_cache, prompt_len
        self.total = prompt_len + config.max_new_tokens
        self.mask = None  # (N, total) 1 = real token; None when there is no padding
        self.pos0 = None  # (N, 1) number of real prompt tokens = position of the first new token
        if attention_mask is not None:
            self.mask = torch.ones(attention_mask.size(0), self.total, dtype=torch.long,
                                   device=attention_mask.device)
            self.mask[:, :prompt_len] = attention_mask
            self.pos0 = attention_mask.long().sum(-1, keepdim=True)
        self.cache: BaseKVCache | None = None

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Hidden states (N, P, d) of the prompt; fills the cache."""
        if self.use_cache:
            self.cache = self.model.new_cache(ids.size(0), self.total)
        mask = None if self.mask is None else self.mask[:, : self.P]
        return self.model(ids, mask, cache=self.cache)["last_hidden_state"]

    def step(self, seqs: torch.Tensor, cur: int | None = None) -> torch.Tensor:
        """Hidden state (N, d) after the last token of ``seqs`` (N, cur). With the cache
        only the last column is read, so ``seqs`` may be just that column if ``cur`` is given."""
        cur = cur or seqs.size(1)
        mask = None if self.mask is None else self.mask[:, :cur]
        if not self.use_cache:
            return self.model(seqs, mask)["last_hidden_state"][:, -1]
        pos = None if self.pos0 is None else self.pos0 + (cur - 1 - self.P)
        return self.model(seqs[:, -1:], mask, position_ids=pos, cache=self.cache)["last_hidden_state"][:, -1]

    def expand(self, k: int) -> None:
        """Repeat every row k times (row b -> rows b*k .. b*k+k-1)."""
        if self.mask is not None:
            self.mask = self.mask.repeat_interleave(k, 0)
            self.pos0 = self.pos0.repeat_interleave(k, 0)
        if self.cache is not None:
            self.cache.repeat_rows(k)

    def reorder(self, index: torch.Tensor) -> None:
        """Row i becomes old row index[i] (rows of one prompt share mask and positions)."""
        if self.cache is not None:
            self.cache.reorder(index)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 vocabulary logits of hidden states (N, d)."""
        return self.model.hidden_state_to_token(hidden).float()


# ------------------------------------------------------- one token per step

# (processed scores (N, V), tokens so far (N, cur)) -> the next token of each row (N,), and the
# logits (N, V) that follow it when the picker computed them anyway (else None: the loop runs the model).
Picker = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
# Builds a strategy's picker once the prompt is encoded: (runner, prompt hidden states (B, P, d)).
PickerFactory = Callable[[Runner, torch.Tensor], Picker]


def one_token_per_step(model: DecoderLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                       config: GenerationConfig, picker: PickerFactory, *, filter_top_k: bool = True
                       ) -> torch.Tensor:
    """The decoding loop of every strategy that extends each row by one token per step:
    logits processors, the strategy's pick, EOS / ``stop`` bookkeeping, padding of
    finished rows, early exit when all rows are done; ``config.on_token`` (streaming) sees the
    tokens after each step."""
    B, P = input_ids.shape
    runner = Runner(model, attention_mask, P, config)
    eos, pad, stop, total = config.eos_token_id, config.pad, config.stop, runner.total
    process = logits_processors(config, ignore_mask(attention_mask, total), filter_top_k=filter_top_k)
    seqs = torch.full((B, total), pad if pad is not None else 0, dtype=torch.long, device=input_ids.device)
    seqs[:, :P] = input_ids
    hidden = runner.prefill(input_ids)  # (B, P, d)
    logits = runner.logits(hidden[:, -1])  # (B, V)
    pick = picker(runner, hidden)
    track = eos is not None or stop is not None
    unfinished = torch.ones(B, dtype=torch.bool, device=input_ids.device)
    steps_alive = torch.zeros(B, dtype=torch.long, device=input_ids.device)  # generated length of each row
    check_every = 1 if input_ids.device.type == "cpu" else 4  # host syncs are free on CPU, not on GPU
    cur = P
    for step in range(config.max_new_tokens):
        scores = logits if process is None else process(logits, seqs[:, :cur])
        nxt, logits = pick(scores, seqs[:, :cur])
        if track:
            steps_alive += unfinished
            nxt = torch.where(unfinished, nxt, pad)
        seqs[:, cur] = nxt
        cur += 1
        if config.on_token is not None:
            config.on_token(seqs[:, :cur])
        if track:
            if eos is not None:
                unfinished &= nxt != eos
            if stop is not None:
                unfinished &= ~stop(seqs[:, :cur])
            if (step + 1) % check_every == 0 and not bool(unfinished.any()):
                break
        if step + 1 == config.max_new_tokens:
            break
        if logits is None:
            logits = runner.logits(runner.step(seqs[:, :cur]))
    if track:
        cur = P + int(steps_alive.max())
    return seqs[:, :cur]


def greedy_or_sample(model: DecoderLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     config: GenerationConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Greedy decoding (argmax) or sampling (``do_sample``) from the processed scores."""

    def pick(scores: torch.Tensor, seqs: torch.Tensor) -> tuple[torch.Tensor, None]:
        if config.do_sample:
            return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1), None
        return scores.argmax(-1), None

    return one_token_per_step(model, input_ids, attention_mask, config, lambda runner, hidden: pick)
