"""GPT-2 from scratch: token + position embeddings, N blocks, final LayerNorm,
and an LM head tied to the token embedding.

The whole model fits on one screen on purpose; ``models.loading`` fills it from
Hugging Face checkpoints, ``models.heads`` builds task models on top, and
``decoding.inference.prepare_for_inference`` gives decoding its faster weight layouts
without touching this module.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from config import GPT2Config, get_config
from models.loading import CheckpointError, convert_hf_state_dict, read_hf_config, read_pretrained
from modules.gpt2_layer import GPT2Layer
from modules.kv_cache import BaseKVCache


class GPT2Model(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        # No padding_idx: GPT-2 has no pad token, and padding_idx would freeze a real token's row.
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.drop = nn.Dropout(config.hidden_dropout_prob)
        self.h = nn.ModuleList(GPT2Layer(config, i) for i in range(config.num_hidden_layers))
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=config.initializer_range / math.sqrt(2 * config.num_hidden_layers))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    def embed(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_len: int = 0,
    ) -> torch.Tensor:
        """Token + position embeddings (B, T, d), positions counted over real tokens only."""
        T = input_ids.size(1)
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(past_len, past_len + T, device=input_ids.device)[None]
            else:
                # Left padding: the first real token is position 0, as in pretraining.
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
        if past_len + T > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence of {past_len + T} tokens is longer than the model's context "
                f"({self.config.max_position_embeddings}); truncate the input"
            )
        x = self.wte(input_ids) + self.wpe(position_ids)  # (B, T, d)
        return self.drop(x) if self.training else x

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: BaseKVCache | None = None,
    ) -> dict[str, torch.Tensor]:
        """``attention_mask`` (B, S) has 1 for real tokens; with a cache it covers
        cached and new positions. Returns ``last_hidden_state`` (B, T, d) and
        ``last_token`` (B, d), the state at the last real position of each row."""
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        x = self.embed(input_ids, attention_mask, position_ids, past)
        mask = self.h[0].attn.build_mask(T, past, attention_mask, x.device)  # one mask for every layer
        for block in self.h:
            x = block(x, mask, cache)
        if cache is not None:
            cache.advance(T)
        x = self.ln_f(x)  # (B, T, d)
        last = x[torch.arange(B, device=x.device), last_index(attention_mask, T)]  # (B, d)
        return {"last_hidden_state": x, "last_token": last}

    def hidden_state_to_token(self, hidden_state: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits through the tied token embedding: (..., d) -> (..., V)."""
        return F.linear(hidden_state, self.wte.weight)

    def new_cache(self, batch_size: int, max_length: int, dtype: torch.dtype | None = None) -> BaseKVCache:
        """The decoding cache the attention layers read (on the position embedding's device and dtype,
        which an inference copy keeps when its token embedding takes another layout)."""
        wpe = self.wpe.weight
        return self.h[0].attn.new_cache(batch_size, max_length, wpe.device, dtype or wpe.dtype)

    @classmethod
    def from_pretrained(
        cls,
        name_or_dir: str | Path | None = None,
        *,
        model: str | None = None,
        d: int | None = None,
        l: int | None = None,  # noqa: E741 (the course starter's keyword)
        num_heads: int | None = None,
        **config_overrides,
    ) -> GPT2Model:
        """A hub id (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a local Hugging Face folder, in
        eval mode as ``transformers`` returns it. Also takes the course starter's call
        ``from_pretrained(model='gpt2', d=768, l=12, num_heads=12)``: the sizes are checked against
        the checkpoint's config (they never change it); ``config_overrides`` (dropout...) do."""
        if name_or_dir is not None and model is not None and str(name_or_dir) != str(model):
            raise TypeError(f"from_pretrained got two models: {str(name_or_dir)!r} and model={model!r}")
        expect = {"hidden_size": d, "num_hidden_layers": l, "num_attention_heads": num_heads}
        config, hf_state = read_pretrained(name_or_dir or model or "gpt2", expect=expect, **config_overrides)
        with torch.device("meta"):
            gpt = cls(config)
        gpt.load_state_dict(convert_hf_state_dict(hf_state, config, gpt.state_dict()), strict=True, assign=True)
        return gpt.eval()  # as transformers' from_pretrained: no dropout until .train() is called


def build_model(model_size: str, random_init: bool = False, **config_overrides) -> GPT2Model:
    """What every CLI calls for ``--model_size`` and ``--random_init``: a named size
    or a local Hugging Face folder, pretrained unless ``random_init``."""
    if random_init:
        if Path(model_size).is_dir():
            return GPT2Model(read_hf_config(Path(model_size), **config_overrides))
        return GPT2Model(get_config(model_size, **config_overrides))
    if model_size == "tiny":
        raise CheckpointError("there are no pretrained 'tiny' weights; add --random_init")
    return GPT2Model.from_pretrained(model_size, **config_overrides)


def last_index(attention_mask: torch.Tensor | None, T: int) -> torch.Tensor | int:
    """Index of the last real token of each row among the last T positions,
    right or left padded alike."""
    if attention_mask is None:
        return T - 1
    m = attention_mask[:, -T:].long()
    return (m * torch.arange(1, T + 1, device=m.device)).argmax(-1)
