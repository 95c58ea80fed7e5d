"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"): int8 / int4 weights for the block linears chosen to keep each
layer's outputs on a calibration set, ``||W X - Q X||``, small, rather than each weight's own
rounding error, as round-to-nearest (``decoding.quant``) does.

Why it helps: a layer's inputs are correlated, so the error of one rounded column can be
partly cancelled by moving the columns not rounded yet. GPTQ rounds one input column at a
time and spreads that column's error over the remaining ones through the inverse of the
layer's Hessian ``H = 2 X^T X / n`` (the Hessian of the squared output error); the upper
Cholesky factor of ``H^-1`` gives, row by row, how the later columns absorb it. With ``H``
the identity (uncorrelated inputs of equal scale) there is nothing to spread and GPTQ is
round-to-nearest.

The stored format is round-to-nearest's exactly: int8 with one symmetric scale per output row
(taken from the float row, as ``quantize_int8`` does), int4 in groups of ``INT4_GROUP`` inputs
with a bfloat16-rounded scale and zero per group (``quantize_int4`` on the group's columns as
the error feedback has left them when its first column comes up). So ``decoding.quant``'s
layouts and kernels run it unchanged (``gptq_layouts``). The tied embedding / LM head stays
int8 round-to-nearest, as under ``--quantize int4``: it also serves the input lookups, about
which a Hessian of the head's inputs says nothing.

Order: blocks one after another, each from the hidden states that the blocks before it,
already quantised, produce (the paper's sequential order); the linears of one block from one
pass over its float weights. ``H`` is damped by ``damp`` times its mean diagonal so that it
stays invertible where the calibration set spans too few directions; inputs never seen
(a zero diagonal) get weight 0, as in the reference code. Columns are processed in lazy
batches of ``block``: the feedback to columns beyond the batch is applied once per batch.

    fast = prepare_for_decoding(model, "int4-gptq", calibration=Calibration("data/tinyshakespeare.txt", tokenizer))
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from decoding.decode_weights import LayoutPolicy, WeightLayout
from decoding.quant import (
    INT4_GROUP,
    Int4Layout,
    Int8Layout,
    dequantize_int4,
    dequantize_int8,
    int4_layouts,
    int8_layouts,
    quantize_int4,
    quantize_int8,
)
from errors import InputError
from models.gpt2 import GPT2Model
from models.loading import load_tokenizer

GPTQ_CHOICES = ("int8-gptq", "int4-gptq")
CALIBRATION_TEXT = "data/tinyshakespeare.txt"
CALIBRATION_BLOCKS = 256  # sequences of the calibration text (the paper: 128 of 2048 tokens)
CALIBRATION_TOKENS = 128  # tokens per sequence (at most the model's context)
CALIBRATION_SHARE = 0.9  # sequences come from the text's first 90%: its tail stays held out for evaluation
DAMP = 0.01
Stored = tuple[torch.Tensor, torch.Tensor]  # quantize_int8's (q, scale) or quantize_int4's (q, scale_zero)


def bits_of(choice: str) -> int:
    """8 or 4 for ``int8-gptq`` / ``int4-gptq``."""
    if choice not in GPTQ_CHOICES:
        raise ValueError(f"GPTQ choices are {GPTQ_CHOICES}, got {choice!r}")
    return int(choice[3])


def hessian(x: torch.Tensor) -> torch.Tensor:
    """``2 X^T X / n`` of inputs ``x`` (..., in): the Hessian of ``||W X - Q X||^2 / n`` in a row of Q."""
    x = x.reshape(-1, x.size(-1)).double()  # (n, in)
    return (2 * x.T @ x / x.size(0)).float()


class _Grid:
    """The rounding of one column: int8 on the row scales, or int4 on the current group's
    bfloat16 scale and zero, by the same arithmetic as ``quantize_int8`` / ``quantize_int4`` (so
    that without error feedback the integers are theirs bit for bit)."""

    def __init__(self, bits: int, weight: torch.Tensor) -> None:
        self.bits = bits
        self.scale = quantize_int8(weight)[1] if bits == 8 else None  # (out,)
        self.groups: list[torch.Tensor] = []  # int4: per group (out, 2) scale and zero

    def start_group(self, columns: torch.Tensor) -> None:
        sz = quantize_int4(columns, columns.size(1))[1][0]  # (out, 2)
        self.groups.append(sz)
        self.scale, self.zero = sz[:, 0], sz[:, 1]

    def round(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(integers, the value they stand for) of column ``w`` (out,)."""
        if self.bits == 8:
            q = torch.round(w / self.scale).clamp(-127, 127)
            return q, q * self.scale
        q = torch.round((w - (self.zero - 8 * self.scale)) / self.scale).clamp(0, 15)
        return q, (q - 8) * self.scale + self.zero

    def stored(self, q: torch.Tensor) -> Stored:
        if self.bits == 8:
            return q.to(torch.int8), self.scale
        return q.to(torch.int32), torch.stack(self.groups).contiguous()  # (groups, out, 2)


def gptq_quantize(weight: torch.Tensor, h: torch.Tensor, bits: int, *, group: int = INT4_GROUP,
                  damp: float = DAMP, block: int = 128) -> Stored:
    """One (out, in) weight quantised by GPTQ against the Hessian ``h`` (in, in) of its inputs,
    in ``quantize_int8``'s (bits 8) or ``quantize_int4``'s (bits 4, groups of ``group``) format."""
    n_in = weight.size(1)
    if bits == 4 and (n_in % group or block % group):
        raise ValueError(f"int4 groups of {group} need in_features ({n_in}) and block ({block}) divisible by it")
    w = weight.detach().float().clone()
    grid = _Grid(bits, w)
    h = h.detach().float().clone()
    dead = h.diagonal() == 0  # inputs the calibration never gave: no error to weigh, weight 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h.diagonal().add_(damp * h.diagonal().mean())
    # upper Cholesky factor of H^-1 (in float64: H of a wide layer is ill-conditioned)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h.double())), upper=True).float()
    q = torch.zeros_like(w)
    for i1 in range(0, n_in, block):
        i2 = min(i1 + block, n_in)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]  # (out, b), (b, b)
        err = torch.zeros_like(w1)
        for i in range(i2 - i1):
            if bits == 4 and (i1 + i) % group == 0:
                grid.start_group(w1[:, i : i + group])
            q[:, i1 + i], value = grid.round(w1[:, i])
            err[:, i] = (w1[:, i] - value) / hinv1[i, i]
            w1[:, i:] -= err[:, i : i + 1] * hinv1[i : i + 1, i:]  # the columns left in this batch absorb it
        w[:, i2:] -= err @ hinv[i1:i2, i2:]  # the columns after the batch, at once
    return grid.stored(q)


def dequantize(stored: Stored, bits: int) -> torch.Tensor:
    """The float weight the stored integers stand for (what the kernels multiply by)."""
    return dequantize_int8(*stored) if bits == 8 else dequantize_int4(*stored)


class Calibration:
    """The calibration text at ``path`` as token ids of the caller's ``tokenizer`` (``--tokenizer``;
    None: the default GPT-2 tokenizer), read and tokenised at the first use and only then: once
    however many models calibrate on it (``generate.py --draft_model``: target and draft), never
    when nothing is calibrated."""

    def __init__(self, path: str | Path = CALIBRATION_TEXT, tokenizer: Any = None) -> None:
        self.path, self.tokenizer = Path(path), tokenizer
        self._ids: torch.Tensor | None = None

    def token_ids(self) -> torch.Tensor:
        """(n,) the whole text's token ids."""
        if self._ids is None:
            if not self.path.is_file():
                raise FileNotFoundError(f"--calibration {self.path} does not exist; give a plain-text file")
            tokenizer = self.tokenizer or load_tokenizer(None, verbose=False)
            self._ids = torch.tensor(tokenizer(self.path.read_text(encoding="utf-8"))["input_ids"], dtype=torch.long)
        return self._ids

    def blocks(self, context: int, n_blocks: int = CALIBRATION_BLOCKS,
               block_size: int = CALIBRATION_TOKENS) -> torch.Tensor:
        """(N, T) token blocks spread evenly over the first ``CALIBRATION_SHARE`` of the text,
        T = min(``block_size``, ``context``)."""
        ids, t = self.token_ids(), min(block_size, context)
        usable = ids[: int(ids.numel() * CALIBRATION_SHARE) // t * t].view(-1, t)  # (M, T)
        if usable.size(0) == 0:
            raise InputError(f"--calibration {self.path} holds fewer than {t / CALIBRATION_SHARE:.0f} tokens; "
                             "give a longer text")
        pick = torch.linspace(0, usable.size(0) - 1, min(n_blocks, usable.size(0))).round().long()
        return usable[pick]


@torch.no_grad()
def gptq_model(model: GPT2Model, blocks: torch.Tensor, bits: int, *, batch_size: int = 16,
               damp: float = DAMP) -> dict[int, Stored]:
    """GPTQ of every linear of ``model``'s transformer blocks on the calibration ``blocks``
    (N, T), keyed by ``id`` of the model's weight parameter (what ``gptq_layouts`` looks up).
    ``model`` is left as it was: the blocks are quantised in copies."""
    was_training = model.training
    model.eval()
    device = model.wpe.weight.device
    batches = [b.to(device) for b in blocks.split(batch_size)]
    states = [model.embed(b) for b in batches]  # (b, T, d) each: the first block's inputs
    mask = model.h[0].attn.build_mask(blocks.size(1), 0, None, device)
    out: dict[int, Stored] = {}
    for original in model.h:
        work = copy.deepcopy(original).eval()
        linears = {name: m for name, m in work.named_modules() if isinstance(m, nn.Linear)}
        hessians = _input_hessians(work, linears, states, mask)
        for name, m in linears.items():
            stored = gptq_quantize(m.weight, hessians[name], bits, damp=damp)
            out[id(original.get_submodule(name).weight)] = stored
            m.weight.copy_(dequantize(stored, bits).to(m.weight.dtype))
        states = [work(x, mask) for x in states]  # the next block sees this block's quantised outputs
    model.train(was_training)
    return out


def _input_hessians(block: nn.Module, linears: dict[str, nn.Linear], states: list[torch.Tensor],
                    mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """``hessian`` of each linear's inputs while ``block`` runs on every batch of ``states``."""
    sums = {name: torch.zeros(m.in_features, m.in_features, device=m.weight.device)
            for name, m in linears.items()}
    counts = dict.fromkeys(linears, 0)

    def collect(name: str) -> Callable:
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].size(-1)).float()  # (n, in)
            sums[name] += x.T @ x
            counts[name] += x.size(0)
        return hook

    handles = [m.register_forward_pre_hook(collect(name)) for name, m in linears.items()]
    try:
        for x in states:
            block(x, mask)
    finally:
        for handle in handles:
            handle.remove()
    return {name: 2 * sums[name] / counts[name] for name in linears}


def gptq_layouts(stored: dict[int, Stored], bits: int) -> LayoutPolicy:
    """The layout policy that serves ``gptq_model``'s integers through ``decoding.quant``'s int8 /
    int4 layouts; the head, and any weight GPTQ did not see, round to nearest as under
    ``--quantize int8`` / ``int4``."""
    nearest = int8_layouts if bits == 8 else int4_layouts

    def policy(role: str, weight: torch.Tensor) -> WeightLayout:
        found = stored.get(id(weight)) if role == "block" else None
        if found is None:
            return nearest(role, weight)
        return Int8Layout(weight, quantized=found) if bits == 8 else Int4Layout(weight, quantized=found)

    return policy


def gptq_policy(model: GPT2Model, choice: str, calibration: str | Path | Calibration = CALIBRATION_TEXT,
                n_blocks: int = CALIBRATION_BLOCKS) -> LayoutPolicy:
    """``--quantize int8-gptq|int4-gptq``: GPTQ of ``model`` on ``n_blocks`` sequences of the
    ``calibration`` text (a path: tokenised by the default tokenizer), as a layout policy for
    ``prepare_for_inference``."""
    bits = bits_of(choice)
    if not isinstance(calibration, Calibration):
        calibration = Calibration(calibration)
    blocks = calibration.blocks(model.config.max_position_embeddings, n_blocks)
    print(f"GPTQ int{bits}: calibrating on {blocks.size(0)} sequences of {blocks.size(1)} tokens of "
          f"{calibration.path}", file=sys.stderr)
    return gptq_layouts(gptq_model(model, blocks, bits), bits)


__all__ = ["CALIBRATION_TEXT", "GPTQ_CHOICES", "Calibration", "bits_of", "dequantize",
           "gptq_layouts", "gptq_model", "gptq_policy", "gptq_quantize", "hessian"]
