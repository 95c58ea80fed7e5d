"""LoReFT (Wu et al. 2024, "ReFT: Representation Finetuning for Language Models"): the GPT-2
weights stay frozen; the hidden state h that chosen blocks output is edited at a few positions,

    h + R^T (W h + b - R h),     R (r, d) with orthonormal rows, W (r, d), b (r,)

so only the r-dimensional subspace R spans moves, towards W h + b.

Why it is written this way:
- R keeps orthonormal rows through training by torch's orthogonal parametrization, as pyreft's
  ``LoreftIntervention`` does; here with the Householder map and without the "dynamic
  trivialization", whose base is a buffer (d, d) that a checkpoint of the trainable parameters
  would not hold: R is a function of one trained tensor, so such a checkpoint restores it whole.
  W and b are an ``nn.Linear`` named as pyreft names it (``learned_source``); one intervention
  per block, shared by the positions it edits (pyreft's tied weights), no dropout.
- Positions, pyreft's "f1+l1" style: the first ``first`` and the last ``last`` real (non-pad)
  tokens of each row, counted over the attention mask, so left and right padding edit the same
  tokens. A decoding step on a KV cache edits its new tokens only where they are among the first
  ``first``; the last positions are the prompt's, edited when it was read (pyreft edits prompt
  positions only), so cached decoding never edits generated tokens.
- Attaching: a chosen block gets a subclass of its own class that edits what the block returns
  (``methods.layer_swap``: the same submodules and state-dict names; a checkpointed block stays
  checkpointed). Blocks see the built attention mask, not which tokens are real, so the body's
  forward pre-hook reads the padding mask once per pass and leaves the positions for the blocks.
  The interventions hang on the body as ``reft`` (outside ``body.h``, so decoding's weight
  layouts leave them alone), with the positions as a buffer: a saved body shows everything
  ``restore_reft`` needs to rebuild it. LoReFT does not fold into the weights.

    apply_reft(model, rank=4, layers=None, first=1, last=1)   # model: a GPT2Model or a head with .gpt
    mark_only_reft_trainable(model, head)                     # the interventions and the head train
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from errors import InputError
from methods.gradient_checkpointing import CheckpointedLayer
from methods.layer_swap import gpt2_body, swap_blocks
from models.gpt2 import GPT2Model
from modules.gpt2_layer import GPT2Layer

REFT_ATTR = "reft"  # where apply_reft registers the interventions on the GPT2Model
_FORWARD = inspect.signature(GPT2Model.forward)


class ReftLayerError(InputError, ValueError):
    """``--reft_layers`` naming a block the model has not: a bad flag (one ``error:`` line), not a bug."""


class _Rotation(nn.Module):
    """R (r, d), its rows kept orthonormal by the parametrization (``weight`` is computed)."""

    def __init__(self, rank: int, hidden: int) -> None:
        super().__init__()
        if not 0 < rank <= hidden:
            raise ValueError(f"ReFT rank must be in 1..{hidden} (the hidden size), got {rank}")
        self.weight = nn.Parameter(nn.init.orthogonal_(torch.empty(rank, hidden)))
        orthogonal(self, "weight", orthogonal_map="householder", use_trivialization=False)


class LoreftIntervention(nn.Module):
    """``h + R^T (W h + b - R h)`` on (..., d) states."""

    def __init__(self, hidden: int, rank: int) -> None:
        super().__init__()
        self.rotate = _Rotation(rank, hidden)
        self.learned_source = nn.Linear(hidden, rank)  # W, b

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        R = self.rotate.weight  # (r, d), orthonormal rows
        return h + (self.learned_source(h) - h @ R.t()) @ R  # (..., r) -> (..., d)


def select_positions(attention_mask: torch.Tensor | None, batch: int, length: int, past: int, first: int,
                     last: int) -> torch.Tensor | None:
    """(B, T) True where the T new positions (after ``past`` cached ones) are among the first
    ``first`` or, in a pass without cached positions, the last ``last`` real tokens of their row;
    None when no position can be. ``attention_mask`` (B, past + T), 1 for real tokens (None: all real)."""
    if past and not first:
        return None
    if attention_mask is None:
        real = torch.ones(batch, past + length, dtype=torch.bool)
    else:
        real = attention_mask.bool()
    rank = real.long().cumsum(-1) - 1  # (B, S): index of each real token among its row's real tokens
    chosen = real & (rank < first)
    if not past and last:
        chosen |= real & (rank >= real.sum(-1, keepdim=True) - last)
    return chosen[:, past:]  # (B, T)


class ReftInterventions(nn.Module):
    """The interventions of a body, one per edited block, and the positions they edit."""

    def __init__(self, hidden: int, rank: int, layers: Sequence[int], first: int, last: int) -> None:
        super().__init__()
        if first < 0 or last < 0 or first + last == 0:
            raise ValueError(f"ReFT edits the first and/or last positions: got first={first}, last={last}")
        self.interventions = nn.ModuleDict({str(i): LoreftIntervention(hidden, rank) for i in layers})
        self.register_buffer("positions", torch.tensor([first, last]))  # saved, so a saved body shows them
        self.first, self.last = first, last
        self.selected: torch.Tensor | None = None  # (B, T) of the current pass, set by read_positions

    def read_positions(self, body: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """The body's forward pre-hook: which of this pass's positions the blocks edit."""
        bound = _FORWARD.bind(body, *args, **kwargs).arguments
        input_ids, cache = bound["input_ids"], bound.get("cache")
        selected = select_positions(bound.get("attention_mask"), *input_ids.shape,
                                    cache.length if cache is not None else 0, self.first, self.last)
        self.selected = None if selected is None else selected.to(input_ids.device)

    def edit(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """Block ``layer``'s output (B, T, d), edited at the selected positions."""
        if self.selected is None:
            return h
        return torch.where(self.selected[..., None], self.interventions[str(layer)](h), h)


class _Edited:
    """A block class whose output goes through ``reft_edit(layer, h)`` (given by ``apply_reft``)."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, cache: Any = None) -> torch.Tensor:
        return self.reft_edit(self.attn.layer_idx, super().forward(x, mask, cache))


class ReftLayer(_Edited, GPT2Layer):
    """A GPT-2 block whose output LoReFT edits."""


class ReftCheckpointedLayer(_Edited, CheckpointedLayer):
    """A gradient-checkpointed block whose output LoReFT edits (the edit outside the checkpoint)."""


EDITED = {GPT2Layer: ReftLayer, CheckpointedLayer: ReftCheckpointedLayer}  # block class -> its edited class


def apply_reft(model: nn.Module, rank: int, layers: Sequence[int] | None = None, first: int = 1,
               last: int = 1) -> ReftInterventions:
    """Give the outputs of blocks ``layers`` (None: every block) of ``model``'s GPT-2 body a LoReFT
    intervention of rank ``rank`` at the first ``first`` and last ``last`` real tokens; returns
    the interventions (registered on the body as ``reft``, on its device and dtype)."""
    body = gpt2_body(model, "ReFT")
    if getattr(body, REFT_ATTR, None) is not None:
        raise ValueError("the model already has ReFT interventions; remove_reft first")
    n = len(body.h)
    layers = sorted(set(range(n) if layers is None else layers))
    if not layers or any(not 0 <= i < n for i in layers):
        raise ReftLayerError(f"--reft_layers {','.join(map(str, layers))}: the model has {n} blocks, 0 to {n - 1}")
    kinds = {type(body.h[i]) for i in layers} - set(EDITED)
    if kinds:
        raise ValueError(f"ReFT edits GPT2Layer blocks, not {', '.join(sorted(k.__name__ for k in kinds))}")
    w = body.wte.weight
    reft = ReftInterventions(body.config.hidden_size, rank, layers, first, last).to(w.device, w.dtype)
    setattr(body, REFT_ATTR, reft)
    body.register_forward_pre_hook(reft.read_positions, with_kwargs=True)

    def edited(old: GPT2Layer) -> GPT2Layer:
        new = EDITED[type(old)](old.attn.config, old.attn.layer_idx)
        new.reft_edit = reft.edit
        return new

    swap_blocks(body, edited, layers)
    return reft


def reft_of(model: nn.Module) -> ReftInterventions | None:
    """The body's interventions, or None."""
    return getattr(gpt2_body(model, "ReFT"), REFT_ATTR, None)


def ensure_reft(model: nn.Module, rank: int, layers: Sequence[int] | None = None, first: int = 1,
                last: int = 1) -> ReftInterventions:
    """``apply_reft``, or the interventions that ``model`` (a saved ReFT model, loaded to train further
    or to predict) already has, if they are the ones asked for."""
    have = reft_of(model)
    if have is None:
        return apply_reft(model, rank, layers, first, last)
    n = len(gpt2_body(model, "ReFT").h)
    held = have.interventions
    got = (next(iter(held.values())).learned_source.out_features, sorted(map(int, held)), have.first, have.last)
    want = (rank, sorted(set(range(n) if layers is None else layers)), first, last)
    if got != want:
        raise ReftLayerError("the loaded model's ReFT interventions (rank {}, blocks {}, first {}, last {}) are not "
                             "the ones the flags ask for (rank {}, blocks {}, first {}, last {}): give its "
                             "--reft_rank, --reft_layers and --reft_positions".format(*got, *want))
    return have


def restore_reft(model: nn.Module, state: Mapping[str, torch.Tensor]) -> bool:
    """Before loading ``state`` (a GPT2Model's state dict) into a plain ``model``: give it the
    interventions the state holds, so that ``load_state_dict`` fits. False if none."""
    positions = state.get(f"{REFT_ATTR}.positions")
    if positions is None:
        return False
    prefix = f"{REFT_ATTR}.interventions."
    layers = sorted({int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)})
    rank = state[f"{prefix}{layers[0]}.learned_source.weight"].size(0)
    apply_reft(model, rank, layers, int(positions[0]), int(positions[1]))
    return True


def mark_only_reft_trainable(model: nn.Module, extra_trainable: Sequence[str] = ()) -> None:
    """Freeze everything but the interventions and the modules named in ``extra_trainable``
    (a task head's own layers, e.g. ``classifier``)."""
    reft = reft_of(model)
    if reft is None:
        raise ValueError("the model has no ReFT interventions; apply_reft first")
    model.requires_grad_(False)
    for module in (reft, *(model.get_submodule(name) for name in extra_trainable)):
        module.requires_grad_(True)
