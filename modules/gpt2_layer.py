"""One GPT-2 transformer block: pre-LayerNorm attention and MLP, each residual.

Plain ``nn.Linear`` layers throughout: faster decoding layouts are applied from
outside, by ``decoding.inference.prepare_for_inference``, never seen by training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from config import GPT2Config
from modules.attention import CausalSelfAttention
from modules.kv_cache import BaseKVCache


class MLP(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.hidden_size, config.intermediate_size)
        self.c_proj = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2 uses the tanh approximation of GELU ("gelu_new").
        y = self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))
        return self.dropout(y) if self.training else y  # eval: skip the call (decoding runs this per token)


class GPT2Layer(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int = 0) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: BaseKVCache | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask, cache)
        x = x + self.mlp(self.ln_2(x))
        return x
