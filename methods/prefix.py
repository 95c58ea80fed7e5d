"""Prefix tuning (Li and Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for
Generation"): the GPT-2 weights stay frozen; every layer's attention gets ``length``
learned key/value vectors before the real keys, which every query attends to.

Why it is written this way:
- Li and Liang train the prefix through a reparameterisation, P = MLP(P'), a small
  embedding P' (length, d) fed to a two-layer tanh MLP whose output holds every layer's
  keys and values; optimising P directly was unstable for them. ``PrefixEncoder`` does
  that while training, and ``fold()`` evaluates the MLP once and keeps only the result
  (n_layer, 2, nh, length, hs) as plain prefixes for inference: same numbers, no MLP.
- The prefix reaches attention through an attention class of its own,
  ``PrefixCausalSelfAttention``, whose attend step puts the prefix before the keys and values
  (``apply_prefix`` gives every layer that class, holding the same weights; ``remove_prefix``
  puts the plain class back). Prefixes are keys/values, not tokens, so they take no position,
  are never written to the KV cache (which holds real tokens only, so beam reordering and
  contrastive search's row copies are unchanged), and a left-padded row sees exactly what
  the same row unpadded sees. Every decoding strategy therefore works unchanged.
- Dense attention only: the sparse patterns' kernels and caches address keys by position,
  which a prefix has not; ``apply_prefix`` refuses them with that reason.

    encoder = apply_prefix(model, length=10)    # model: a GPT2Model or a head holding one as .gpt
    mark_only_prefix_trainable(model)           # train only the prefix (and the head's own names)
    ...train...
    encoder.fold()                              # plain prefixes for decoding
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from config import GPT2Config
from errors import InputError
from methods.layer_swap import gpt2_body, swap_attention
from modules.attention import CausalSelfAttention

PREFIX_ATTR = "prefix_encoder"  # where apply_prefix registers the encoder on the GPT2Model


class PrefixEncoder(nn.Module):
    """Per-layer prefix keys/values: an embedding and an MLP while training (``reparam``),
    or the plain tensor ``kv`` (n_layer, 2, nh, length, hs) once folded or when ``reparam=False``."""

    def __init__(self, config: GPT2Config, length: int, hidden: int = 512, reparam: bool = True,
                 init_std: float = 0.02) -> None:
        super().__init__()
        if length < 0 or hidden < 1:
            raise ValueError(f"prefix length must be >= 0 and hidden >= 1, got {length} and {hidden}")
        self.n_layer, self.n_head, self.head_dim = config.num_hidden_layers, config.num_attention_heads, config.head_dim
        self.length, d = length, config.hidden_size
        self.kv: nn.Parameter | None = None
        self.embedding: nn.Parameter | None = None
        self.mlp: nn.Sequential | None = None
        if reparam:
            self.embedding = nn.Parameter(torch.randn(length, d) * init_std)  # P' (length, d)
            self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, self.n_layer * 2 * d))
            for m in self.mlp:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=init_std)
                    nn.init.zeros_(m.bias)
        else:
            self.kv = nn.Parameter(torch.randn(self.n_layer, 2, self.n_head, length, self.head_dim) * init_std)

    @property
    def folded(self) -> bool:
        """True when the prefixes are plain tensors (no MLP)."""
        return self.mlp is None

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (nh, length, hs) of one layer (the attention hook). Unfolded, only
        that layer's rows of the MLP's output layer are computed."""
        if self.kv is not None:
            return self.kv[layer, 0], self.kv[layer, 1]
        first, act, last = self.mlp
        width = 2 * self.n_head * self.head_dim
        rows = slice(layer * width, (layer + 1) * width)
        out = nn.functional.linear(act(first(self.embedding)), last.weight[rows], last.bias[rows])  # (L, 2d)
        k, v = out.view(self.length, 2, self.n_head, self.head_dim).permute(1, 2, 0, 3)  # (nh, L, hs) each
        return k, v

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the embedding and MLP by their output: plain prefixes for inference (same
        numbers; the training-time parameters are gone, so fold after training)."""
        if self.folded:
            return
        kv = torch.stack([torch.stack(self.layer_kv(i)) for i in range(self.n_layer)])  # (n_layer, 2, nh, L, hs)
        trainable = self.embedding.requires_grad
        self.embedding, self.mlp = None, None
        self.kv = nn.Parameter(kv, requires_grad=trainable)


class PrefixCausalSelfAttention(CausalSelfAttention):
    """Dense causal self-attention whose every query also sees the layer's prefix keys/values."""

    def __init__(self, config: GPT2Config, layer_idx: int,
                 prefix: Callable[[int], tuple[torch.Tensor, torch.Tensor]]) -> None:
        super().__init__(config, layer_idx)
        self.prefix = prefix  # layer index -> (nh, L, hs) keys and values (PrefixEncoder.layer_kv)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               past: int) -> torch.Tensor:
        k, v, mask = self._prepend_prefix(k, v, mask, q.size(2))
        return super().attend(q, k, v, mask, past)

    def _prepend_prefix(
        self, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, T: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Keys/values (B, nh, L + S, hs) with the prefix first, and the mask that lets every
        query see it (an explicit causal mask replaces ``is_causal``, which SDPA aligns top-left)."""
        pk, pv = self.prefix(self.layer_idx)  # (nh, L, hs)
        B, S, L = k.size(0), k.size(2), pk.size(1)
        k = torch.cat([pk.to(k.dtype).expand(B, -1, -1, -1), k], dim=2)  # (B, nh, L + S, hs)
        v = torch.cat([pv.to(v.dtype).expand(B, -1, -1, -1), v], dim=2)
        if mask is None and T == 1:  # one query sees every key
            return k, v, None
        if mask is None:
            mask = torch.ones(T, S, dtype=torch.bool, device=k.device).tril(S - T)[None, None]  # (1, 1, T, S)
        return k, v, torch.cat([mask.new_ones(*mask.shape[:-1], L), mask], dim=-1)  # (B or 1, 1, T, L + S)


def _body(model: nn.Module) -> nn.Module:
    """The GPT2Model: ``model`` itself, or the ``.gpt`` of a task head."""
    return gpt2_body(model, "prefix tuning")


def apply_prefix(model: nn.Module, length: int, hidden: int = 512, reparam: bool = True) -> PrefixEncoder:
    """Give every attention layer of ``model``'s GPT-2 body learned prefixes of ``length``
    positions; returns the encoder (registered on the body as ``prefix_encoder``, on the
    body's device and dtype, so checkpoints and ``.to()`` carry it)."""
    body = _body(model)
    if getattr(body, PREFIX_ATTR, None) is not None:
        raise ValueError("the model already has a prefix; remove_prefix first")
    for block in body.h:
        if type(block.attn) is not CausalSelfAttention:
            raise ValueError(f"prefix tuning supports dense attention only: {type(block.attn).__name__} addresses "
                             "keys by position, which prefixes have not; use attn_pattern='dense'")
    encoder = PrefixEncoder(body.config, length, hidden, reparam).to(body.wte.weight.device, body.wte.weight.dtype)
    setattr(body, PREFIX_ATTR, encoder)
    swap_attention(body, lambda old: PrefixCausalSelfAttention(old.config, old.layer_idx, encoder.layer_kv))
    return encoder


def ensure_prefix(model: nn.Module, length: int, hidden: int = 512) -> PrefixEncoder:
    """``apply_prefix``, or the prefix ``model`` already has (a saved prefix model, loaded with
    ``--load`` to predict or train further), if it is as long as asked."""
    have = getattr(_body(model), PREFIX_ATTR, None)
    if have is None:
        return apply_prefix(model, length, hidden)
    if have.length != length:
        raise InputError(f"the loaded model's prefix has {have.length} positions; the flags ask for {length}: "
                         f"give its --prefix_length {have.length}")
    return have


def restore_prefix(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    """Before loading ``state`` (a GPT2Model's state dict) into a plain ``model``: give it the
    prefix the state holds, folded or not, so that ``load_state_dict`` fits. False if none."""
    kv, emb = state.get(f"{PREFIX_ATTR}.kv"), state.get(f"{PREFIX_ATTR}.embedding")
    if kv is not None:  # (n_layer, 2, nh, length, hs)
        apply_prefix(model, kv.size(3), reparam=False)
    elif emb is not None:
        apply_prefix(model, emb.size(0), hidden=state[f"{PREFIX_ATTR}.mlp.0.weight"].size(0))
    return kv is not None or emb is not None


def fold_prefix(model: nn.Module) -> None:
    """Fold the model's prefix, if it has one, into plain prefixes (before saving a trained model)."""
    encoder = getattr(_body(model), PREFIX_ATTR, None)
    if encoder is not None:
        encoder.fold()


def remove_prefix(model: nn.Module) -> None:
    """Back to the plain model (the encoder is dropped)."""
    body = _body(model)
    if any(isinstance(block.attn, PrefixCausalSelfAttention) for block in body.h):
        swap_attention(body, lambda old: CausalSelfAttention(old.config, old.layer_idx))
    if hasattr(body, PREFIX_ATTR):
        delattr(body, PREFIX_ATTR)


def mark_only_prefix_trainable(model: nn.Module, extra_trainable: Sequence[str] = ()) -> None:
    """Freeze everything but the prefix encoder and the modules named in ``extra_trainable``
    (a task head's own layers)."""
    extra = tuple(extra_trainable)
    for name, p in model.named_parameters():
        p.requires_grad = f".{PREFIX_ATTR}." in f".{name}" or any(name == h or name.startswith(h + ".")
                                                                   for h in extra)


def prefix_parameter_counts(model: nn.Module) -> dict[str, int]:
    """What prefix tuning trains and keeps: ``training`` (embedding + MLP, or the plain
    prefixes), ``inference`` (the folded prefixes: n_layer * 2 * length * d), and ``model``
    (all parameters of ``model``, prefix included) for the ratio."""
    body = _body(model)
    encoder: PrefixEncoder | None = getattr(body, PREFIX_ATTR, None)
    if encoder is None:
        raise ValueError("the model has no prefix; apply_prefix first")
    return {"training": sum(p.numel() for p in encoder.parameters()),
            "inference": encoder.n_layer * 2 * encoder.length * encoder.n_head * encoder.head_dim,
            "model": sum(p.numel() for p in model.parameters())}
