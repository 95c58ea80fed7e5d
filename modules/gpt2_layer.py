"""One GPT-2 transformer block: pre-LayerNorm attention and MLP, each residual.

Its four linears get ``modules.decode_weights.with_decode_weights``: cached faster-layout
weights during decoding steps, ``F.linear`` otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from config import GPT2Config
from modules.attention import CausalSelfAttention, KVCache
from modules.decode_weights import with_decode_weights


class MLP(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.c_fc = with_decode_weights(nn.Linear(config.hidden_size, config.intermediate_size))
        self.c_proj = with_decode_weights(nn.Linear(config.intermediate_size, config.hidden_size))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2 uses the tanh approximation of GELU ("gelu_new").
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class GPT2Layer(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int = 0) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config, layer_idx)
        with_decode_weights(self.attn.c_attn)
        with_decode_weights(self.attn.c_proj)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask, cache)
        x = x + self.mlp(self.ln_2(x))
        return x
