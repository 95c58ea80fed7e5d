"""Sampling one sentence at a time from GPT-2: what ``contexts``, ``generate`` and
``self-distill`` share. Decoding itself is ``models.generation.generate``; this
module only batches prompts, stops rows at a sentence boundary, and cuts the
text to one sentence."""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cli.validation import non_negative_int, positive_float, positive_int, probability
from models.generation import generate

# A sentence ends at . ! ? (optionally followed by closing quotes/brackets) before
# whitespace, unless the word is a common abbreviation or a single initial.
_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)")
_ABBREV = re.compile(
    r"(?:\b(?:Mr|Mrs|Ms|Dr|Prof|Sr|Jr|St|vs|etc|Inc|Ltd|Co|Corp|No|U\.S|U\.K|Gen|Gov|Sen|Rep)|\b[A-Z])$")


def first_sentence(text: str, keep_unfinished: bool = False) -> str:
    """The first sentence of ``text`` on one line, or "" if it has no sentence end
    (an unfinished sentence is no paraphrase candidate) unless ``keep_unfinished``,
    which returns the first line as it is (random-weight smoke runs rarely end one)."""
    text = text.strip().split("\n")[0].strip()
    for m in _END.finditer(text):
        if m.group()[0] == "." and _ABBREV.search(text[: m.start()]):
            continue
        return text[: m.end()].strip()
    return text if keep_unfinished else ""


@dataclass
class SamplingConfig:
    max_new_tokens: int = 40
    temperature: float = 1.0
    top_p: float = 0.9
    no_repeat_ngram_size: int = 0
    keep_unfinished: bool = False  # keep a continuation that never ends its sentence (smoke tests)


def add_sampling_args(p: argparse.ArgumentParser, temperature: float, no_repeat_ngram_size: int | None) -> None:
    """The decoding flags of a step, with that step's defaults (``None``: no n-gram flag)."""
    p.add_argument("--max_new_tokens", type=positive_int, default=40)
    p.add_argument("--temperature", type=positive_float, default=temperature)
    p.add_argument("--top_p", type=probability, default=0.9)
    if no_repeat_ngram_size is not None:
        p.add_argument("--no_repeat_ngram_size", type=non_negative_int, default=no_repeat_ngram_size)
    p.add_argument("--keep_unfinished", action="store_true",
                   help="keep text that never ends a sentence (random-weight smoke runs)")


def sampling_config(args: argparse.Namespace) -> SamplingConfig:
    return SamplingConfig(args.max_new_tokens, args.temperature, args.top_p,
                          getattr(args, "no_repeat_ngram_size", 0), args.keep_unfinished)


class SentenceStop:
    """Stop a row once its generated text holds a newline, or a token ending in
    . ! ? followed by a token starting with a space (one token of look-ahead, so
    "3.5" or "U.S." do not stop it). The cut itself is ``first_sentence``."""

    def __init__(self, tokenizer, prompt_len: int) -> None:
        vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        text = [tokenizer.convert_tokens_to_string([t]) for t in vocab]
        self.ends = torch.tensor([t.rstrip("\"')]").endswith((".", "!", "?")) for t in text])  # (V,)
        self.space = torch.tensor([t[:1].isspace() for t in text])  # (V,)
        self.newline = torch.tensor(["\n" in t for t in text])  # (V,)
        self.prompt_len = prompt_len

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.ends.device != tokens.device:
            self.ends, self.space, self.newline = (t.to(tokens.device) for t in (self.ends, self.space, self.newline))
        done = self.newline[tokens[:, -1]]  # (N,)
        if tokens.size(1) - self.prompt_len >= 2:
            done = done | (self.ends[tokens[:, -2]] & self.space[tokens[:, -1]])
        return done


def sample_sentences(
    model,
    tokenizer,
    prompts: Sequence[str],
    num_samples: int,
    cfg: SamplingConfig,
    generator: torch.Generator | None = None,
) -> list[list[str]]:
    """``num_samples`` sampled continuations of each prompt, each cut to its first
    sentence ("" when unfinished). All prompts go in one left-padded batch of
    len(prompts) * num_samples rows."""
    device = next(model.parameters()).device
    rows = [p for p in prompts for _ in range(num_samples)]
    tokenizer.padding_side = "left"
    enc = tokenizer(rows, return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)  # (N, P)
    max_pos = model.config.max_position_embeddings
    if ids.size(1) + cfg.max_new_tokens > max_pos:
        keep = max_pos - cfg.max_new_tokens
        ids, mask = ids[:, -keep:], mask[:, -keep:]
    P = ids.size(1)
    out = generate(model, ids, mask, max_new_tokens=cfg.max_new_tokens, do_sample=True,
                   temperature=cfg.temperature, top_p=cfg.top_p, no_repeat_ngram_size=cfg.no_repeat_ngram_size,
                   eos_token_id=tokenizer.eos_token_id, stop=SentenceStop(tokenizer, P), generator=generator)
    texts = tokenizer.batch_decode(out[:, P:].tolist(), skip_special_tokens=True)
    sents = [first_sentence(t, cfg.keep_unfinished) for t in texts]
    return [sents[i * num_samples : (i + 1) * num_samples] for i in range(len(prompts))]
