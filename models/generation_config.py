"""``GenerationConfig``: every decoding setting of ``models.generation.generate`` in one
frozen dataclass, validated once when it is built, and passed by name to the strategies.

Why: the strategies (``models.decoding``, ``models.beam_search``, ``models.contrastive``)
read what they need from one typed object instead of a dozen positional arguments, and
a bad value fails here, with its name, before any model work. ``strategy`` is the one
rule that decides which decoding runs (``models.generation.STRATEGIES`` maps it to code).

Adding a strategy: its settings become fields here (with checks in ``__post_init__``),
``strategy`` learns when to pick it, and its module registers one line in ``STRATEGIES``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

StopFn = Callable[[torch.Tensor], torch.Tensor]  # (N, T) token ids -> (N,) bool: this row is done
TokenHook = Callable[[torch.Tensor], None]  # (N, T) token ids so far, after each new token; must not change them


@dataclass(frozen=True)
class GenerationConfig:
    """Settings with ``transformers``' names and meanings (``max_new_tokens`` is required)."""

    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # sampling: keep the k most likely tokens (0 = off); contrastive search: candidates
    top_p: float = 1.0
    num_beams: int = 1
    num_return_sequences: int = 1  # rows per prompt: the n best beams, or n samples
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # beam search: True, False or "never"
    no_repeat_ngram_size: int = 0
    penalty_alpha: float = 0.0  # contrastive search's degeneration penalty (with top_k > 1)
    contrastive_mean_sim: bool = False  # contrastive search: penalise the mean, not the max, similarity
    contrastive_dynamic_alpha: bool = False  # contrastive search: alpha follows the model's uncertainty per step
    contrastive_alpha_sensitivity: float = 8.0  # how far the dynamic alpha moves (q of models.contrastive)
    contrastive_alpha_min: float | None = None  # contrastive search: alpha rises linearly from this to penalty_alpha
    repetition_penalty: float = 1.0
    eos_token_id: int | None = None
    pad_token_id: int | None = None  # fills finished rows; default: eos_token_id
    stop: StopFn | None = None  # marks rows as done in addition to EOS (e.g. LineStop)
    use_cache: bool = True
    on_token: TokenHook | None = None  # streaming: called after every step of the one-token-per-step loop

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "top_k", "num_beams", "num_return_sequences", "no_repeat_ngram_size"):
            _check_int(name, getattr(self, name))
        for name in ("eos_token_id", "pad_token_id"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name))
                self._require(getattr(self, name) >= 0, name, "must be a token id >= 0")
        for name in ("contrastive_mean_sim", "contrastive_dynamic_alpha"):
            self._require(isinstance(getattr(self, name), bool), name, "must be True or False")
        for name in ("temperature", "top_p", "length_penalty", "penalty_alpha", "repetition_penalty",
                     "contrastive_alpha_sensitivity"):
            _check_number(name, getattr(self, name))
        self._require(self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1")
        self._require(self.top_k >= 0, "top_k", "must be >= 0 (0 turns top-k filtering off)")
        self._require(self.num_beams >= 1, "num_beams", "must be >= 1")
        self._require(self.no_repeat_ngram_size >= 0, "no_repeat_ngram_size", "must be >= 0 (0 turns it off)")
        self._require(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]")
        self._require(not self.do_sample or self.temperature > 0, "temperature", "must be > 0 when sampling")
        self._require(0.0 <= self.penalty_alpha <= 1.0, "penalty_alpha", "must be in [0, 1]")
        self._require(not self.contrastive_dynamic_alpha or self.penalty_alpha < 1.0, "penalty_alpha",
                      "must be < 1 with contrastive_dynamic_alpha (it is the alpha at median uncertainty)")
        self._require(self.contrastive_alpha_sensitivity >= 0, "contrastive_alpha_sensitivity", "must be >= 0")
        if self.contrastive_alpha_min is not None:
            _check_number("contrastive_alpha_min", self.contrastive_alpha_min)
            self._require(0.0 <= self.contrastive_alpha_min <= self.penalty_alpha, "contrastive_alpha_min",
                          f"must be in [0, penalty_alpha={self.penalty_alpha}] (alpha rises from it to penalty_alpha)")
            self._require(not self.contrastive_dynamic_alpha, "contrastive_alpha_min",
                          "and contrastive_dynamic_alpha are two alpha schedules: choose one")
        self._require(self.repetition_penalty > 0, "repetition_penalty", "must be > 0 (1 turns it off)")
        self._require(self.early_stopping in (True, False, "never"), "early_stopping", "must be True, False or 'never'")
        self._require(self.num_return_sequences >= 1, "num_return_sequences", "must be >= 1")
        if self.strategy == "beam":
            self._require(self.num_return_sequences <= self.num_beams, "num_return_sequences",
                          f"must be <= num_beams ({self.num_beams}): beam search returns its best beams")
        elif self.strategy != "sample":
            self._require(self.num_return_sequences == 1, "num_return_sequences",
                          f"must be 1 for {self.strategy} decoding, which is deterministic")
        if self.on_token is not None and self.strategy == "beam":
            raise ValueError("on_token streams one token per step; beam search reorders its beams until the end: "
                             "show its final text instead")
        if self.stop is not None and self.pad is None:
            raise ValueError("a stop condition needs pad_token_id (or eos_token_id) to fill the rows it ends")

    def _require(self, ok: bool, name: str, rule: str) -> None:
        if not ok:
            raise ValueError(f"{name} {rule}, got {getattr(self, name)!r}")

    @property
    def pad(self) -> int | None:
        """The token that fills finished rows."""
        return self.eos_token_id if self.pad_token_id is None else self.pad_token_id

    @property
    def strategy(self) -> str:
        """Which decoding runs: beam search when ``num_beams > 1``; contrastive search when
        ``penalty_alpha > 0`` and ``top_k > 1``; otherwise sampling or greedy."""
        if self.num_beams > 1:
            return "beam"
        if self.penalty_alpha > 0 and self.top_k > 1:
            return "contrastive"
        return "sample" if self.do_sample else "greedy"


def _check_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")


def _check_number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
