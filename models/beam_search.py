"""Beam search for ``models.generation.generate`` (``num_beams > 1``).

Why it is written this way: its output equals ``transformers``' ``generate`` token
for token on the same weights (tests/test_generation.py), so the hypothesis
bookkeeping (2 * num_beams candidates per step, a finished set scored by
logprob / length**length_penalty, the three ``early_stopping`` modes, EOS and
``stop`` retiring a hypothesis) and the padding of finished rows follow
``transformers`` 5.x step for step. The model runner and the logits processors
are the ones every strategy uses, from ``models.decoding``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.decoding import DecoderLM, Runner, ignore_mask, logits_processors
from models.generation_config import GenerationConfig


def beam_search(model: DecoderLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                config: GenerationConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Beam search with ``transformers``' bookkeeping: keep the 2*nb best continuations
    of all beams, retire those ending in EOS (or stopped) into a finished set
    scored by logprob / length**length_penalty, continue with the best nb others.
    Returns the best ``config.num_return_sequences`` hypotheses of each prompt, best
    first: rows b*n .. b*n+n-1 belong to prompt b."""
    nb, length_penalty, early_stopping = config.num_beams, config.length_penalty, config.early_stopping
    eos, stop = config.eos_token_id, config.stop
    B, P = input_ids.shape
    runner = Runner(model, attention_mask, P, config)
    total = runner.total
    dev = input_ids.device
    keep = max(2, 1 + (eos is not None)) * nb  # candidates kept per prompt
    fill = config.pad if config.pad is not None else -1
    ignore = ignore_mask(attention_mask, total)
    process = logits_processors(config, None if ignore is None else ignore.repeat_interleave(nb, 0), keep=keep // nb)
    logits = runner.logits(runner.prefill(input_ids)[:, -1]).repeat_interleave(nb, 0)
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
        if config.do_sample:
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
        logits = runner.logits(runner.step(running[:, :, :cur].reshape(B * nb, cur)))
    n = config.num_return_sequences
    out_len = P + int(fin_len[:, :n].max())
    return finished[:, :n, :out_len].reshape(B * n, out_len)
