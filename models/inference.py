"""Preparing a ``GPT2Model`` for decoding: ``prepare_for_inference`` returns a separate
inference model whose linears multiply through faster weight layouts
(``modules.decode_weights``) during decoding steps.

Why a separate step: the model stays plain GPT-2 (``models.gpt2`` and
``modules.gpt2_layer`` know nothing of layouts), training never sees a layout, and
checkpoints, copies and LoRA wrapping work on ordinary ``nn.Linear``. The inference
model shares the original parameters (no second copy of the weights) and adds the
layouts beside them; it is a snapshot, so prepare again after the weights change
(each epoch's evaluation, after a LoRA merge). Preparation itself is cheap: the layouts
are built at the first decoding step that needs them (packing gpt2 takes ~0.4 s), so
prepare once and decode many batches.

    fast = prepare_for_inference(model)
    out = generate(fast, ids, mask, max_new_tokens=64)   # same tokens, faster on CPU

Where the next features plug in: ``layouts`` (a ``modules.decode_weights.LayoutPolicy``)
chooses a ``WeightLayout`` per weight, so
int8 / int4 weight-only quantisation is a new layout and a new policy; a layout with
``replaces_weight`` makes its ``DecodeLinear`` drop the original weight, which gives an
inference-only model once the caller drops the training model.
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn

from models.gpt2 import GPT2Model
from modules.decode_weights import DecodeLinear, LayoutPolicy, default_layouts
from modules.kv_cache import BaseKVCache


class InferenceModel(nn.Module):
    """What decoding needs of a GPT-2 (``forward`` with a cache, ``hidden_state_to_token``,
    ``new_cache``, ``config``), over an inference copy of the model. Always in eval mode."""

    def __init__(self, body: GPT2Model, head: DecodeLinear | None) -> None:
        super().__init__()
        self.body = body
        self.head = head
        self.train(False)

    @property
    def config(self):
        return self.body.config

    @property
    def device(self) -> torch.device:
        return self.body.device

    def train(self, mode: bool = True) -> InferenceModel:
        if mode:
            raise RuntimeError("an InferenceModel cannot train: train the original model and prepare it again")
        return super().train(False)

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return self.body(*args, **kwargs)

    def hidden_state_to_token(self, hidden_state: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            return self.body.hidden_state_to_token(hidden_state)
        return self.head(hidden_state)

    def new_cache(self, batch_size: int, max_length: int, dtype: torch.dtype | None = None) -> BaseKVCache:
        return self.body.new_cache(batch_size, max_length, dtype)


def prepare_for_inference(model: GPT2Model, layouts: LayoutPolicy = default_layouts) -> InferenceModel:
    """An ``InferenceModel`` over ``model``: its module tree copied, its parameters shared,
    every ``nn.Linear`` that ``layouts`` gives a layout replaced by a ``DecodeLinear``, and
    the tied LM head likewise. ``model`` itself is left exactly as it was."""
    if isinstance(model, InferenceModel):
        return model
    if not isinstance(model, GPT2Model):
        raise TypeError(f"prepare_for_inference takes a GPT2Model, got {type(model).__name__}")
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    body = copy.deepcopy(model, shared)  # new modules, same parameter tensors
    body.__dict__.pop("forward", None)  # maybe_compile's wrapper would call the original modules
    for name, m in list(body.named_modules()):
        layout = layouts("block", m.weight) if isinstance(m, nn.Linear) else None
        if layout is not None:
            parent, _, child = name.rpartition(".")
            setattr(body.get_submodule(parent), child, DecodeLinear.from_linear(m, layout))
    head = layouts("head", body.wte.weight)
    return InferenceModel(body, None if head is None else DecodeLinear(body.wte.weight, None, head))
