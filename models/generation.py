"""Decoding for ``GPT2Model``: ``generate``, the one entry point. It builds one validated
``GenerationConfig`` (``models.generation_config``), checks the prompts, and hands both by
name to the strategy the config selects:

- greedy and sampling: ``models.decoding`` (which also holds the runner and logits
  processors every strategy shares);
- beam search: ``models.beam_search``;
- contrastive search: ``models.contrastive``.

MBR selection, a layer above ``generate``, is ``decoding.mbr``. For fast CPU decoding pass a
model prepared by ``decoding.inference.prepare_for_inference``; the tokens are the same.
Also here: ``LineStop`` (a stop condition) and ``trim`` (an output row as a token list).
"""

from __future__ import annotations

from dataclasses import fields

import torch

from models.beam_search import beam_search
from models.contrastive import contrastive_search
from models.decoding import DecoderLM, Strategy, greedy_or_sample
from models.generation_config import GenerationConfig

# config.strategy -> the code that runs it
STRATEGIES: dict[str, Strategy] = {
    "greedy": greedy_or_sample,
    "sample": greedy_or_sample,
    "beam": beam_search,
    "contrastive": contrastive_search,
}
SETTINGS = frozenset(f.name for f in fields(GenerationConfig))


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


@torch.no_grad()
def generate(
    model: DecoderLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    config: GenerationConfig | None = None,
    generator: torch.Generator | None = None,
    **settings,
) -> torch.Tensor:
    """Continue left-padded prompts (B, P); returns (B, P + new) token ids like
    ``transformers``' ``generate``: finished rows are filled with ``pad_token_id``
    (default: EOS) and the output ends when every row has finished.

    The settings are ``GenerationConfig``'s fields, given either as keywords
    (``max_new_tokens``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``,
    ``num_beams``, ``num_return_sequences``, ``length_penalty``, ``early_stopping``, ``no_repeat_ngram_size``,
    ``penalty_alpha``, ``contrastive_mean_sim``, ``contrastive_dynamic_alpha``,
    ``contrastive_alpha_sensitivity``, ``repetition_penalty``, ``eos_token_id``, ``pad_token_id``,
    ``stop``, ``use_cache``) or as one ``config``, not both. Beam search when
    ``num_beams > 1``; contrastive search when ``penalty_alpha > 0`` and ``top_k > 1``;
    otherwise greedy or sampling (drawing from ``generator``). ``stop`` marks rows as
    done (e.g. ``LineStop(tokenizer, 14)``) in addition to EOS. With
    ``num_return_sequences`` n > 1 the output has B * n rows, those of prompt b at
    b*n .. b*n+n-1 (beam search: its n best hypotheses, best first; sampling: n draws).
    """
    if config is None:
        unknown = sorted(set(settings) - SETTINGS)
        if unknown:
            raise TypeError(f"generate() got unknown settings {unknown}; known: {sorted(SETTINGS)}")
        config = GenerationConfig(**settings)
    elif settings:
        raise TypeError(f"pass settings either in config or as keywords, not both (got config and {sorted(settings)})")
    attention_mask = check_prompts(input_ids, attention_mask)
    n = config.num_return_sequences
    if n > 1 and config.strategy == "sample":  # beam search returns its n best itself
        input_ids = input_ids.repeat_interleave(n, 0)
        attention_mask = None if attention_mask is None else attention_mask.repeat_interleave(n, 0)
    was_training = model.training
    model.train(False)
    try:
        return STRATEGIES[config.strategy](model, input_ids, attention_mask, config=config, generator=generator)
    finally:
        model.train(was_training)


def check_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The mask the strategies use: None when there is no padding (plain causal attention,
    no mask to build per step); raises unless the prompts are left padded."""
    if attention_mask is None:
        return None
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("generate needs left padding: the last position of every row must be a real token")
    return None if bool(attention_mask.all()) else attention_mask


def trim(row: torch.Tensor, prompt_len: int, num_pad: int | None, eos_token_id: int | None) -> list[int]:
    """One output row as a token list: left padding dropped, cut after the first
    generated EOS (which is dropped too)."""
    toks = row.tolist()
    gen = toks[prompt_len:]
    if eos_token_id is not None and eos_token_id in gen:
        gen = gen[: gen.index(eos_token_id)]
    return toks[num_pad or 0 : prompt_len] + gen
