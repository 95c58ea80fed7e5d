"""Decoding for ``GPT2Model``: greedy, sampling (temperature, top-k, top-p),
beam search, contrastive search, repetition penalties, and MBR selection.

Why it is written this way:
- greedy and beam search reproduce ``transformers``' ``generate`` token for token
  on the same weights (tests/test_generation.py), so the order of logits
  processors, the beam bookkeeping (length penalty, early stopping, EOS) and the
  padding of finished rows all follow ``transformers`` 5.x;
- with the key/value cache each new token costs one position; the loop keeps
  Python work per step small and reads back from the device only to decide
  whether every row has finished;
- contrastive search follows Su et al. 2022 ("A Contrastive Framework for Neural
  Text Generation"), which ``transformers`` 5 no longer ships in its core.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

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


def _processors(
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


class _Runner:
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
            return _beam_search(model, input_ids, attention_mask, max_new_tokens, num_beams, length_penalty,
                                early_stopping, do_sample, temperature, top_k, top_p, repetition_penalty,
                                no_repeat_ngram_size, generator, **common)
        return _decode(model, input_ids, attention_mask, max_new_tokens, do_sample, temperature, top_k, top_p,
                       repetition_penalty, no_repeat_ngram_size, penalty_alpha, generator, **common)
    finally:
        model.train(was_training)


def _ignore_mask(attention_mask: torch.Tensor | None, total: int) -> torch.Tensor | None:
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
    process = _processors(do_sample=do_sample, temperature=temperature, top_k=0 if contrastive else top_k,
                          top_p=top_p, repetition_penalty=repetition_penalty,
                          no_repeat_ngram_size=no_repeat_ngram_size, ignore=_ignore_mask(attention_mask, total))
    seqs = torch.full((B, total), pad if pad is not None else 0, dtype=torch.long, device=input_ids.device)
    seqs[:, :P] = input_ids
    runner = _Runner(model, attention_mask, P, total, use_cache)
    hidden = runner.prefill(input_ids)  # (B, P, d)
    logits = model.hidden_state_to_token(hidden[:, -1]).float()  # (B, V)
    if contrastive:
        search = _Contrastive(model, runner, hidden, attention_mask, top_k, penalty_alpha, total)
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


class _Contrastive:
    """Su et al. 2022: among the top-k tokens pick the one maximising
    (1 - alpha) * p(token) - alpha * max cosine(h_token, h_previous).

    With the cache, every prompt keeps k rows that share their history; the k
    candidates are scored in one batched step and the chosen row's new key/value
    is copied to its siblings (one position, not the whole cache)."""

    def __init__(self, model, runner: _Runner, prompt_hidden, attention_mask, k: int, alpha: float, total: int):
        B, P, d = prompt_hidden.shape
        self.model, self.runner, self.k, self.alpha, self.B = model, runner, k, alpha, B
        self.context = prompt_hidden.new_zeros(B, total, d)  # hidden states of the tokens so far
        self.context[:, :P] = prompt_hidden
        self.valid = torch.ones(B, total, dtype=torch.bool, device=prompt_hidden.device)
        if attention_mask is not None:
            self.valid[:, :P] = attention_mask.bool()
        runner.expand(k)
        self.rows = torch.arange(B, device=prompt_hidden.device)

    def select(self, scores: torch.Tensor, seqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Next token (B,) and the logits (B, V) that follow it."""
        B, k, cur = self.B, self.k, seqs.size(1)
        probs, cand = scores.softmax(-1).topk(k, dim=-1)  # (B, k)
        if self.runner.use_cache:
            h = self.runner.step(cand.reshape(-1, 1), cur + 1)  # (B*k, d)
        else:
            h = self.runner.step(torch.cat([seqs.repeat_interleave(k, 0), cand.reshape(-1, 1)], 1))
        h = h.view(B, k, -1)
        ctx = F.normalize(self.context[:, :cur], dim=-1)  # (B, cur, d)
        cos = torch.einsum("bkd,btd->bkt", F.normalize(h, dim=-1), ctx)  # (B, k, cur)
        cos = cos.masked_fill(~self.valid[:, None, :cur], float("-inf"))
        score = (1.0 - self.alpha) * probs - self.alpha * cos.max(-1).values  # (B, k)
        best = score.argmax(-1)  # (B,)
        chosen = h[self.rows, best]  # (B, d)
        self.context[:, cur] = chosen
        cache = self.runner.cache
        if cache is not None:  # siblings take the chosen candidate's key/value at this position
            src = (self.rows * k + best).repeat_interleave(k)
            t = (cache.length - 1) % cache.k.size(3)  # the slot of this position (ring caches wrap around)
            cache.k[:, :, :, t] = cache.k[:, :, :, t].index_select(1, src)
            cache.v[:, :, :, t] = cache.v[:, :, :, t].index_select(1, src)
        return cand[self.rows, best], self.model.hidden_state_to_token(chosen).float()


# ------------------------------------------------------------------ beam search


def _beam_search(model, input_ids, attention_mask, max_new, nb, length_penalty, early_stopping, do_sample,
                 temperature, top_k, top_p, repetition_penalty, no_repeat_ngram_size, generator, *, eos, pad, stop,
                 use_cache) -> torch.Tensor:
    """Beam search with ``transformers``' bookkeeping: keep the 2*nb best continuations
    of all beams, retire those ending in EOS (or stopped) into a finished set
    scored by logprob / length**length_penalty, continue with the best nb others."""
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    B, P = input_ids.shape
    total = P + max_new
    dev = input_ids.device
    keep = max(2, 1 + (eos is not None)) * nb  # candidates kept per prompt
    fill = pad if pad is not None else (eos if eos is not None else -1)
    ignore = _ignore_mask(attention_mask, total)
    process = _processors(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                          repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                          ignore=None if ignore is None else ignore.repeat_interleave(nb, 0), keep=keep // nb)
    runner = _Runner(model, attention_mask, P, total, use_cache)
    logits = model.hidden_state_to_token(runner.prefill(input_ids)[:, -1]).float().repeat_interleave(nb, 0)
    runner.expand(nb)
    running = torch.full((B, nb, total), fill, dtype=torch.long, device=dev)
    running[:, :, :P] = input_ids[:, None]
    finished = running.clone()
    running_scores = torch.zeros(B, nb, device=dev)
    running_scores[:, 1:] = -1e9  # only the first beam expands at the first step
    fin_scores = torch.full((B, nb), -1e9, device=dev)
    fin_len = torch.zeros(B, nb, dtype=torch.long, device=dev)  # generated length of each finished hypothesis
    fin_done = torch.zeros(B, nb, dtype=torch.bool, device=dev)
    can_improve = torch.ones(B, 1, dtype=torch.bool, device=dev)
    top_nb = torch.arange(keep, device=dev) < nb
    offset = torch.arange(B, device=dev)[:, None] * nb
    cur = P
    while True:
        flat = running[:, :, :cur].reshape(B * nb, cur)
        logp = F.log_softmax(logits, -1)
        if process is not None:
            logp = process(logp, flat)
        V = logp.size(-1)
        logp = (logp.view(B, nb, V) + running_scores[:, :, None]).view(B, nb * V)
        if do_sample:
            idx = torch.multinomial(logp.softmax(-1), keep, generator=generator)
            top_scores = logp.gather(1, idx)
        else:
            top_scores, idx = logp.topk(keep)  # (B, keep)
        beam, tok = idx // V, idx % V
        cand = running.gather(1, beam[:, :, None].expand(-1, -1, total)).clone()  # (B, keep, total)
        cand[:, :, cur] = tok
        hits = torch.full((B, keep), cur + 1 >= total, dtype=torch.bool, device=dev)
        if eos is not None:
            hits |= tok == eos
        if stop is not None:
            hits |= stop(cand[:, :, : cur + 1].reshape(B * keep, cur + 1)).view(B, keep)
        # e. the best nb candidates that have not finished keep running
        run_scores = top_scores + hits.float() * -1.0e9
        nxt = run_scores.topk(nb)[1]  # (B, nb)
        running = cand.gather(1, nxt[:, :, None].expand(-1, -1, total))
        running_scores = run_scores.gather(1, nxt)
        src = (beam.gather(1, nxt) + offset).view(-1)  # flat row each new beam continues
        # f. finished candidates among the top nb enter the finished set if good enough
        just_done = hits & top_nb[None, :]
        s = top_scores / ((cur + 1 - P) ** length_penalty)
        s = s + (fin_done.all(-1, keepdim=True) & (early_stopping is True)).float() * -1.0e9
        s = s + (~can_improve).float() * -1.0e9
        s = s + (~just_done) * -1.0e9
        m_scores = torch.cat((fin_scores, s), 1)
        best = m_scores.topk(nb)[1]
        finished = torch.cat((finished, cand), 1).gather(1, best[:, :, None].expand(-1, -1, total))
        fin_scores = m_scores.gather(1, best)
        fin_len = torch.cat((fin_len, torch.full_like(s, cur + 1 - P, dtype=torch.long)), 1).gather(1, best)
        fin_done = torch.cat((fin_done, just_done), 1).gather(1, best)
        cur += 1
        # g. stop when no running beam can beat the worst finished one
        hyp_len = (total - P) if (early_stopping == "never" and length_penalty > 0.0) else (cur - P)
        best_running = running_scores[:, :1] / (hyp_len**length_penalty)
        worst_fin = torch.where(fin_done, fin_scores.min(1, keepdim=True)[0], -1.0e9)
        can_improve = can_improve & (best_running > worst_fin).any(-1, keepdim=True)
        open_beam = not (bool(fin_done.all()) and early_stopping is True)
        if not (bool(can_improve.any()) and open_beam and not bool(hits.all())):
            break
        runner.reorder(src)
        logits = model.hidden_state_to_token(runner.step(running[:, :, :cur].reshape(B * nb, cur))).float()
    out_len = P + int(fin_len[:, 0].max())
    return finished[:, 0, :out_len]


# ------------------------------------------------------------------------- MBR


def mbr_select(candidates: Sequence[str], utility: Callable[[str, str], float]) -> int:
    """Index of the candidate with the highest mean utility against the others
    (minimum Bayes risk with the samples as pseudo-references)."""
    n = len(candidates)
    if n == 0:
        raise ValueError("mbr_select needs at least one candidate")
    if n == 1:
        return 0
    means = [sum(utility(c, r) for j, r in enumerate(candidates) if j != i) / (n - 1) for i, c in enumerate(candidates)]
    return max(range(n), key=means.__getitem__)


@torch.no_grad()
def mbr_generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    num_candidates: int,
    decode: Callable[[list[int]], str],
    utility: Callable[[str, str], float],
    **sample_kwargs,
) -> list[list[int]]:
    """Draw ``num_candidates`` samples per prompt and keep the one with the highest
    mean ``utility`` (chrF for sonnets) against the others. Returns token lists
    (prompt included, padding and what follows EOS removed) per prompt."""
    B, P = input_ids.shape
    ids = input_ids.repeat_interleave(num_candidates, 0)
    mask = None if attention_mask is None else attention_mask.repeat_interleave(num_candidates, 0)
    sample_kwargs.setdefault("do_sample", True)
    out = generate(model, ids, mask, **sample_kwargs)  # (B*N, T)
    eos = sample_kwargs.get("eos_token_id")
    rows = [trim(out[i], P, None if mask is None else int((mask[i] == 0).sum()), eos) for i in range(out.size(0))]
    chosen = []
    for b in range(B):
        group = rows[b * num_candidates : (b + 1) * num_candidates]
        texts = [decode(r) for r in group]
        chosen.append(group[mbr_select(texts, utility)])
    return chosen


def trim(row: torch.Tensor, prompt_len: int, num_pad: int | None, eos_token_id: int | None) -> list[int]:
    """One output row as a token list: left padding dropped, cut after the first
    generated EOS (which is dropped too)."""
    toks = row.tolist()
    gen = toks[prompt_len:]
    if eos_token_id is not None and eos_token_id in gen:
        gen = gen[: gen.index(eos_token_id)]
    return toks[num_pad or 0 : prompt_len] + gen
