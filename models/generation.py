"""Decoding for ``GPT2Model``: ``generate``, the one entry point, with greedy and
sampling (temperature, top-k, top-p), repetition penalties, and the pieces every
decoding loop shares (the step-by-step model runner, the logits processors, stop
conditions). Beam search lives in ``models.beam_search`` and contrastive search in
``models.contrastive``; ``generate`` dispatches to both. MBR selection, a layer
above ``generate``, is ``models.mbr``.

Why it is written this way:
- greedy decoding (and beam search) reproduce ``transformers``' ``generate`` token
  for token on the same weights (tests/test_generation.py), so the order of logits
  processors and the padding of finished rows follow ``transformers`` 5.x;
- with the key/value cache each new token costs one position; the loop keeps
  Python work per step small and reads back from the device only to decide
  whether every row has finished.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from models.contrastive import Contrastive

StopFn = Callable[[torch.Tensor], torch.Tensor]  # (N, T) token ids -> (N,) bool: this row is done


class LineStop:
    """Stop condition "the text holds ``num_lines`` newlines" (a sonnet: 14 lines).

    GPT-2's tokenizer never merges a newline with letters, so counting the
    newlines of each vocabulary entry once gives an exact, vectorised count.
    """

    def __init__(self, tokenizer, num_lines: int) -> None:
        (newline,) = tokenizer.convert_ids_to_tokens(tokenizer.encode("\n"))  # "Ċ" in byte-level BPE
        vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        counts = [t.count(newline) for t in vocab]
        self.newlines = torch.tensor(counts, dtype=torch.long)  # (V,)
        self.num_lines = num_lines

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.newlines.device != tokens.device:
            self.newlines = self.newlines.to(tokens.device)
        table = self.newlines
        return table[tokens.clamp(max=table.numel() - 1)].sum(-1) >= self.num_lines  # (N,)


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


def _top_k(scores: torch.Tensor, k: int, keep: int = 1) -> torch.Tensor:
    k = min(max(k, keep), scores.size(-1))
    return scores.masked_fill(scores < torch.topk(scores, k)[0][..., -1:], float("-inf"))


def _top_p(scores: torch.Tensor, p: float, keep: int = 1) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of tokens whose probability reaches ``p``."""
    sorted_scores, order = torch.sort(scores, descending=False)
    cum = sorted_scores.softmax(-1).cumsum(-1)
    remove = cum <= (1 - p)
    remove[..., -keep:] = False
    return scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))


def logits_processors(
    *,
    do_sample: bool,
    temperature: float,
    top_k: int,
    top_p: float,
    repetition_penalty: float,
    no_repeat_ngram_size: int,
    ignore: torch.Tensor | None,
    keep: int = 1,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """The score transforms in ``transformers``' order, or None when there are none."""
    steps: list[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = []
    if repetition_penalty != 1.0:
        steps.append(lambda s, ids: _repetition_penalty(s, ids, ignore, repetition_penalty))
    if no_repeat_ngram_size > 0:
        steps.append(lambda s, ids: _no_repeat_ngram(s, ids, no_repeat_ngram_size))
    if do_sample:
        if temperature != 1.0:
            steps.append(lambda s, ids: s / temperature)
        if top_k:
            steps.append(lambda s, ids: _top_k(s, top_k, keep))
        if top_p < 1.0:
            steps.append(lambda s, ids: _top_p(s, top_p, keep))
    if not steps:
        return None

    def apply(scores: torch.Tensor, seqs: torch.Tensor) -> torch.Tensor:
        for f in steps:
            scores = f(scores, seqs)
        return scores

    return apply


# ---------------------------------------------------------------- model runner


class Runner:
    """Feeds the model one step at a time with or without the KV cache, so the
    decoding loops are written once. Rows may be expanded (beams, candidates)."""

    def __init__(self, model, attention_mask: torch.Tensor | None, prompt_len: int, total: int, use_cache: bool):
        self.model, self.use_cache, self.total, self.P = model, use_cache, total, prompt_len
        self.mask = None  # (N, total) 1 = real token; None when there is no padding
        self.pos0 = None  # (N, 1) number of real prompt tokens = position of the first new token
        if attention_mask is not None:
            self.mask = torch.ones(attention_mask.size(0), total, dtype=torch.long, device=attention_mask.device)
            self.mask[:, :prompt_len] = attention_mask
            self.pos0 = attention_mask.long().sum(-1, keepdim=True)
        self.cache = None

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
            n = self.cache.k.size(1)
            self.cache.reorder(torch.arange(n, device=self.cache.k.device).repeat_interleave(k))

    def reorder(self, index: torch.Tensor) -> None:
        """Row i becomes old row index[i] (rows of one prompt share mask and positions)."""
        if self.cache is not None:
            self.cache.reorder(index)


# --------------------------------------------------------------------- generate


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    no_repeat_ngram_size: int = 0,
    penalty_alpha: float = 0.0,
    repetition_penalty: float = 1.0,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    stop: StopFn | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Continue left-padded prompts (B, P); returns (B, P + new) token ids like
    ``transformers``' ``generate``: finished rows are filled with ``pad_token_id``
    (default: EOS) and the output ends when every row has finished.

    Beam search when ``num_beams > 1``; contrastive search when ``penalty_alpha > 0``
    and ``top_k > 1``; otherwise greedy or sampling. ``stop`` marks rows as done
    (e.g. ``LineStop(tokenizer, 14)``) in addition to EOS.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if do_sample and temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("generate needs left padding: the last position of every row must be a real token")
        if bool(attention_mask.all()):
            attention_mask = None  # no padding: plain causal attention, no mask to build per step
    if pad_token_id is None:
        pad_token_id = eos_token_id
    if stop is not None and pad_token_id is None:
        raise ValueError("a stop condition needs pad_token_id (or eos_token_id) to fill the rows it ends")
    was_training = model.training
    model.eval()
    try:
        common = dict(eos=eos_token_id, pad=pad_token_id, stop=stop, use_cache=use_cache)
        if num_beams > 1:
            from models.beam_search import beam_search  # here: beam search builds on this module's pieces

            return beam_search(model, input_ids, attention_mask, max_new_tokens, num_beams, length_penalty,
                               early_stopping, do_sample, temperature, top_k, top_p, repetition_penalty,
                               no_repeat_ngram_size, generator, **common)
        return _decode(model, input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k, top_p,
                       repetition_penalty, no_repeat_ngram_size, penalty_alpha, generator, **common)
    finally:
        model.train(was_training)


def ignore_mask(attention_mask: torch.Tensor | None, total: int) -> torch.Tensor | None:
    """(N, total) True on left padding, which repetition penalty must not count."""
    if attention_mask is None:
        return None
    ignore = torch.zeros(attention_mask.size(0), total, dtype=torch.bool, device=attention_mask.device)
    ignore[:, : attention_mask.size(1)] = attention_mask == 0
    return ignore


def _decode(model, input_ids, attention_mask, max_new, do_sample, temperature, top_k, top_p, repetition_penalty,
            no_repeat_ngram_size, penalty_alpha, generator, *, eos, pad, stop, use_cache) -> torch.Tensor:
    """Greedy, sampling and contrastive search: one token per row per step."""
    B, P = input_ids.shape
    total = P + max_new
    contrastive = penalty_alpha > 0 and top_k > 1
    process = logits_processors(do_sample=do_sample, temperature=temperature, top_k=0 if contrastive else top_k,
                                top_p=top_p, repetition_penalty=repetition_penalty,
                                no_repeat_ngram_size=no_repeat_ngram_size, ignore=ignore_mask(attention_mask, total))
    seqs = torch.full((B, total), pad if pad is not None else 0, dtype=torch.long, device=input_ids.device)
    seqs[:, :P] = input_ids
    runner = Runner(model, attention_mask, P, total, use_cache)
    hidden = runner.prefill(input_ids)  # (B, P, d)
    logits = model.hidden_state_to_token(hidden[:, -1]).float()  # (B, V)
    if contrastive:
        search = Contrastive(model, runner, hidden, attention_mask, top_k, penalty_alpha, total)
    track = eos is not None or stop is not None
    unfinished = torch.ones(B, dtype=torch.bool, device=input_ids.device)
    steps_alive = torch.zeros(B, dtype=torch.long, device=input_ids.device)  # generated length of each row
    check_every = 1 if input_ids.device.type == "cpu" else 4  # host syncs are free on CPU, not on GPU
    cur = P
    for step in range(max_new):
        scores = logits if process is None else process(logits, seqs[:, :cur])
        if contrastive:
            nxt, logits = search.select(scores, seqs[:, :cur])
        elif do_sample:
            nxt = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
        else:
            nxt = scores.argmax(-1)
        if track:
            steps_alive += unfinished
            nxt = torch.where(unfinished, nxt, pad)
        seqs[:, cur] = nxt
        cur += 1
        if track:
            if eos is not None:
                unfinished &= nxt != eos
            if stop is not None:
                unfinished &= ~stop(seqs[:, :cur])
            if (step + 1) % check_every == 0 and not bool(unfinished.any()):
                break
        if step + 1 == max_new:
            break
        if not contrastive:
            logits = model.hidden_state_to_token(runner.step(seqs[:, :cur])).float()
    if track:
        cur = P + int(steps_alive.max())
    return seqs[:, :cur]


def trim(row: torch.Tensor, prompt_len: int, num_pad: int | None, eos_token_id: int | None) -> list[int]:
    """One output row as a token list: left padding dropped, cut after the first
    generated EOS (which is dropped too)."""
    toks = row.tolist()
    gen = toks[prompt_len:]
    if eos_token_id is not None and eos_token_id in gen:
        gen = gen[: gen.index(eos_token_id)]
    return toks[num_pad or 0 : prompt_len] + gen
