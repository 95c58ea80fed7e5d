"""Preparing a ``GPT2Model`` for decoding: ``prepare_for_inference`` returns a separate
inference model whose linears multiply through faster weight layouts
(``decoding.decode_weights``) during decoding steps.

Why a separate step: the model stays plain GPT-2 (``models.gpt2`` and
``modules.gpt2_layer`` know nothing of layouts), training never sees a layout, and
checkpoints, copies and LoRA wrapping work on ordinary ``nn.Linear``. The inference
model shares the original parameters (no second copy of the weights) and adds the
layouts beside them; it is a snapshot, so prepare again after the weights change
(each epoch's evaluation, after a LoRA merge). Preparation itself is cheap: the layouts
are built at the first decoding step that needs them (oneDNN packing copies and reorders
every weight, a cost paid once per prepared copy), so prepare once and decode many batches.

    fast = prepare_for_inference(model)
    out = generate(fast, ids, mask, max_new_tokens=64)   # same tokens, faster on CPU

Options: ``layouts`` (a ``decoding.decode_weights.LayoutPolicy``) chooses a ``WeightLayout``
per weight; ``quantize`` names one: ``"bf16"`` (bfloat16 copies of the linears and the tied head, float32 around them),
``"int8"`` / ``"int4"`` (weight-only, ``decoding.quant``). ``inference_only=True`` consumes
the model: every weight given a layout is held only in that layout (the float layouts'
``standalone`` form), the tied embedding too, and the original tensors are released, so
decoding holds one copy of the weights (less than ``transformers``). Tasks and scripts get all
of this from ``prepare_for_decoding`` (``--quantize``, adapters folded in, the rows of a step).

    fast = prepare_for_inference(model, quantize="int8", inference_only=True)  # model unusable after
"""

from __future__ import annotations

import copy
import ctypes
import itertools
import sys

import torch
from torch import nn

from decoding.decode_weights import DecodeLinear, LayoutEmbedding, LayoutPolicy, default_layouts
from decoding.gptq import CALIBRATION_TEXT, GPTQ_CHOICES, Calibration, gptq_policy
from decoding.quant import (
    QUANTIZE_CHOICES,
    QuantizationUnavailable,
    bf16_layouts,
    check_quantize,
    int4_layouts,
    int8_layouts,
)
from models.gpt2 import GPT2Model
from modules.kv_cache import BaseKVCache

POLICIES: dict[str, LayoutPolicy] = {"none": default_layouts, "bf16": bf16_layouts, "int8": int8_layouts,
                                     "int4": int4_layouts}


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
        return self.body.wpe.weight.device  # wte may be a LayoutEmbedding without a weight

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
        return self.body.new_cache(batch_size, max_length, dtype)  # on wpe's device and dtype: wte may be a layout


def prepare_for_inference(model: GPT2Model, layouts: LayoutPolicy | None = None, *, quantize: str = "none",
                          inference_only: bool = False, decode_rows: int = 1) -> InferenceModel:
    """An ``InferenceModel`` over ``model``: its module tree copied, its parameters shared,
    every ``nn.Linear`` of its blocks that the layout policy gives a
    layout replaced by a ``DecodeLinear``, and the tied LM head likewise. The policy is
    ``layouts`` if given, else the one ``quantize`` names (``POLICIES``). Without
    ``inference_only``, ``model`` itself is left exactly as it was; with it, ``model`` is
    consumed (see the module docstring) and must not be used again; its single copy of each
    weight is laid out for decoding steps of ``decode_rows`` rows (prompts x beams or samples
    per step: 1, or more for batches)."""
    if isinstance(model, InferenceModel):
        return model
    if not isinstance(model, GPT2Model):
        raise TypeError(f"prepare_for_inference takes a GPT2Model, got {type(model).__name__}")
    if quantize not in POLICIES:
        raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES}, got {quantize!r}")
    policy = layouts or POLICIES[quantize]
    if (quantize != "none" or inference_only) and any(_foldable(m) for m in model.modules()):
        raise ValueError("quantised or inference-only preparation needs plain linears: "
                         "fold the adapters in first (fold_adapters, or methods.lora.unwrap_lora)")
    originals = list(itertools.chain(model.parameters(), model.buffers()))
    body = copy.deepcopy(model, {id(t): t for t in originals})  # new modules, the same tensors
    body.__dict__.pop("forward", None)  # maybe_compile's wrapper would call the original modules
    replaced: set[int] = set()  # ids of the body's tensors that only a layout holds now

    def finish(layout, weight):
        if layout is not None and inference_only:
            layout = layout.standalone(decode_rows)
        if layout is not None and layout.replaces_weight:
            replaced.add(id(weight))
        return layout

    # The transformer blocks' linears only: other modules hung on the body (a prefix encoder's MLP)
    # read their weights directly and keep them.
    for name, m in list(body.h.named_modules()):
        layout = finish(policy("block", m.weight), m.weight) if isinstance(m, nn.Linear) else None
        if layout is not None:
            parent, _, child = name.rpartition(".")
            setattr(body.h.get_submodule(parent), child, DecodeLinear.from_linear(m, layout))
    wte = body.wte.weight
    head = finish(policy("head", wte), wte)
    if head is not None and head.replaces_weight:
        body.wte = LayoutEmbedding(head)  # the head's bytes serve the input embedding too
    prepared = InferenceModel(body, None if head is None else DecodeLinear(wte, None, head))
    if inference_only:  # release what the copy no longer uses: the weights a layout replaced
        for t in originals:
            if id(t) in replaced:
                t.data = torch.empty(0, dtype=t.dtype, device=t.device)
        return_freed_memory()
    return prepared


def return_freed_memory() -> None:
    """Hand freed heap pages back to the operating system (glibc's ``malloc_trim``): glibc keeps
    freed blocks below its adaptive mmap threshold for reuse, so without this the process could
    go on holding the released float32 weights (gpt2 int8: 517 MiB resident instead of 156 in one
    run of ``benchmarks/bench.py``'s memory probe). A no-op off glibc."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # musl and other C libraries: nothing to trim this way
        pass


def decoding_rows(prompts: int, num_beams: int = 1, num_return_sequences: int = 1, pooled: bool = False) -> int:
    """Rows of one decoding step, what ``decode_rows`` asks for: prompts times beams (or
    returned samples); an MBR pool decodes several candidates of each prompt at once."""
    return prompts * max(num_beams, num_return_sequences, 8 if pooled else 1)


def _foldable(module: nn.Module) -> bool:
    return callable(getattr(module, "folded", None))


def fold_adapters(model: nn.Module) -> None:
    """Put a plain layer back wherever a module can fold itself into one: the protocol is a
    ``folded()`` method that returns the plain layer (LoRA and DoRA adapters merged into their base
    linear), so this wing needs no knowledge of the methods that implement it."""
    for name, m in list(model.named_modules()):
        if name and _foldable(m):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, m.folded())


def check_quantize_flag(quantize: str, device: torch.device | str, hidden_size: int | None = None) -> None:
    """``check_quantize`` of a ``--quantize`` choice (``-gptq`` stores what its base stores), the error
    naming the flag: one ``QuantizationUnavailable`` line before any work."""
    try:
        check_quantize(quantize.removesuffix("-gptq"), device, hidden_size)
    except QuantizationUnavailable as e:
        raise QuantizationUnavailable(f"--quantize {quantize}: {e}") from None


def prepare_for_decoding(model: GPT2Model, quantize: str = "none", *, inference_only: bool = False,
                         decode_rows: int = 1, calibration: str | Calibration = CALIBRATION_TEXT) -> InferenceModel:
    """The model prepared for decoding as ``--quantize`` asks. With ``inference_only`` the model is
    consumed (adapters folded in, its weights held once in the decoding layouts, laid out for steps
    of ``decode_rows`` rows). An impossible choice (int4 on a GPU) raises ``QuantizationUnavailable``
    naming the flag, which the command line prints as one ``error:`` line with exit status 2.
    ``int8-gptq`` / ``int4-gptq`` store int8 / int4 rounded by GPTQ (``decoding.gptq``) on the
    ``calibration`` text: a ``Calibration`` with the caller's tokenizer (a path: the default one)."""
    check_quantize_flag(quantize, next(model.parameters()).device, model.config.hidden_size)
    base = quantize.removesuffix("-gptq")
    if quantize != "none" or inference_only:
        fold_adapters(model)
    layouts = gptq_policy(model, quantize, calibration) if quantize in GPTQ_CHOICES else None
    return prepare_for_inference(model, layouts, quantize=base, inference_only=inference_only,
                                 decode_rows=decode_rows)


def held_bytes(module: nn.Module) -> int:
    """Bytes of the distinct tensors a module tree holds: parameters, buffers and the decoding
    layouts' own tensors (oneDNN-packed ones included): the weights' memory, counted once."""
    seen: dict[int, int] = {}

    def add(obj) -> None:
        if isinstance(obj, torch.Tensor):
            if obj.is_mkldnn:  # opaque storage: one block of numel elements
                seen[id(obj)] = obj.numel() * obj.element_size()
            else:
                s = obj.untyped_storage()
                seen[s.data_ptr() or id(s)] = s.nbytes()
        elif isinstance(obj, dict):
            for v in obj.values():
                add(v)
        elif hasattr(obj, "__dict__") and not isinstance(obj, nn.Module):  # a layout (or one inside a layout)
            for v in vars(obj).values():
                add(v)

    for m in module.modules():
        for t in itertools.chain(m.parameters(recurse=False), m.buffers(recurse=False)):
            add(t)
        add(getattr(m, "layout", None))
    return sum(seen.values())
