"""Our GPT-2 against transformers' on the same weights, and the loading contract."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
import torch
from transformers import GPT2LMHeadModel
from transformers import GPT2Model as HFGPT2Model

from config import GPT2Config, get_config
from models import loading
from models.gpt2 import GPT2Model
from models.loading import CheckpointError
from tests.conftest import make_hf_folder

ATOL = 1e-5


def padded_batch(vocab: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (4, 19), generator=g)
    mask = torch.ones(4, 19, dtype=torch.long)
    mask[1, 11:] = 0  # right padding
    mask[2, :6] = 0  # left padding
    return ids, mask


@pytest.mark.parametrize("padded", [False, True])
def test_hidden_states_and_logits_match_transformers(hf_folder, padded):
    folder, cfg = hf_folder
    ours = GPT2Model.from_pretrained(folder).eval()
    hf_lm = GPT2LMHeadModel.from_pretrained(folder).eval()
    hf_base = HFGPT2Model.from_pretrained(folder).eval()
    ids, mask = padded_batch(cfg["vocab_size"])
    if not padded:
        mask = torch.ones_like(mask)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = ours(ids, mask if padded else None)
        h = out["last_hidden_state"]
        logits = ours.hidden_state_to_token(h)
        ref_h = hf_base(ids, attention_mask=mask, position_ids=pos).last_hidden_state
        ref_logits = hf_lm(ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    assert (h - ref_h)[real].abs().max() < ATOL
    assert (logits - ref_logits)[real].abs().max() < ATOL
    # last_token is the state at the last real position of each row.
    last = torch.tensor([18, 10, 18, 18]) if padded else torch.full((4,), 18)
    assert torch.equal(out["last_token"], h[torch.arange(4), last])


def test_padding_does_not_change_real_tokens(hf_folder):
    """A row alone equals the same row right- or left-padded inside a batch."""
    folder, cfg = hf_folder
    model = GPT2Model.from_pretrained(folder).eval()
    ids = torch.randint(0, cfg["vocab_size"], (1, 7))
    with torch.no_grad():
        alone = model(ids)["last_hidden_state"][0]
        pad = torch.zeros(1, 5, dtype=torch.long)
        right = model(torch.cat([ids, pad], 1), torch.tensor([[1] * 7 + [0] * 5]))
        left = model(torch.cat([pad, ids], 1), torch.tensor([[0] * 5 + [1] * 7]))
    assert (right["last_hidden_state"][0, :7] - alone).abs().max() < ATOL
    assert (left["last_hidden_state"][0, 5:] - alone).abs().max() < ATOL
    assert (right["last_token"][0] - alone[-1]).abs().max() < ATOL
    assert (left["last_token"][0] - alone[-1]).abs().max() < ATOL


def test_eager_attention_equals_sdpa(hf_folder):
    folder, cfg = hf_folder
    sdpa = GPT2Model.from_pretrained(folder).eval()
    eager = GPT2Model.from_pretrained(folder, attn_impl="eager").eval()
    ids, mask = padded_batch(cfg["vocab_size"])
    with torch.no_grad():
        for m in (None, mask):
            a = sdpa(ids, m)["last_hidden_state"]
            b = eager(ids, m)["last_hidden_state"]
            real = torch.ones_like(mask).bool() if m is None else m.bool()
            assert (a - b)[real].abs().max() < ATOL


def test_kv_cache_equals_full_forward(hf_folder):
    folder, cfg = hf_folder
    model = GPT2Model.from_pretrained(folder).eval()
    ids, mask = padded_batch(cfg["vocab_size"])
    with torch.no_grad():
        full = model(ids, mask)["last_hidden_state"]
        cache = model.new_cache(4, 19)
        parts = [model(ids[:, :12], mask[:, :12], cache=cache)["last_hidden_state"]]
        for t in range(12, 19):  # one position at a time, mask covering cached + new
            parts.append(model(ids[:, t : t + 1], mask[:, : t + 1], cache=cache)["last_hidden_state"])
    stepped = torch.cat(parts, 1)
    real = mask.bool()
    assert (stepped - full)[real].abs().max() < ATOL
    assert cache.length == 19


def test_pytorch_bin_and_base_model_layouts(tmp_path):
    """pytorch_model.bin and a GPT2Model checkpoint (no 'transformer.' prefix) load the same."""
    cfg = dict(n_embd=32, n_layer=1, n_head=2, n_positions=16, vocab_size=100)
    a = GPT2Model.from_pretrained(make_hf_folder(tmp_path / "st", seed=3, **cfg))
    b = GPT2Model.from_pretrained(make_hf_folder(tmp_path / "bin", seed=3, safetensors=False, **cfg))
    c = GPT2Model.from_pretrained(make_hf_folder(tmp_path / "base", seed=3, lm_head=False, **cfg))
    for other in (b, c):
        for (name, p), q in zip(a.state_dict().items(), other.state_dict().values(), strict=True):
            assert torch.equal(p, q), name


def test_every_checkpoint_tensor_used_and_every_parameter_filled(tmp_path):
    folder = make_hf_folder(tmp_path / "m", n_embd=32, n_layer=2, n_head=2, n_positions=16, vocab_size=100)
    hf_sd = loading.read_hf_state_dict(folder)
    config = loading.config_from_hf(json.loads((folder / "config.json").read_text()))
    expected = GPT2Model(config).state_dict()
    ours = loading.convert_hf_state_dict(hf_sd, config, expected)
    assert set(ours) == set(GPT2Model(config).state_dict())
    transposed = [k for k in ours if k.endswith(loading.TRANSPOSED)]
    assert len(transposed) == 4 * 2
    for k in transposed:
        assert torch.equal(ours[k], hf_sd["transformer." + k].t())
    # An extra tensor is reported, not silently dropped.
    with pytest.raises(CheckpointError, match="unexpected keys: transformer.h.0.extra"):
        loading.convert_hf_state_dict({**hf_sd, "transformer.h.0.extra": torch.zeros(1)}, config, expected)


def test_bad_checkpoint_folders_give_clear_errors(tmp_path):
    folder = make_hf_folder(tmp_path / "m", n_embd=32, n_layer=2, n_head=2, n_positions=16, vocab_size=100)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        GPT2Model.from_pretrained(empty)
    (empty / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no weights file"):
        GPT2Model.from_pretrained(empty)
    # A config that says 3 layers for a 2-layer checkpoint: missing keys listed.
    cfg = json.loads((folder / "config.json").read_text())
    cfg["n_layer"] = 3
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"missing keys: h\.2\."):
        GPT2Model.from_pretrained(folder)
    # A wider config than the weights: every wrong shape is named.
    cfg["n_layer"], cfg["n_embd"] = 2, 64
    (folder / "config.json").write_text(json.dumps(cfg))
    wrong_wte = r"(?s)wrong shapes:\n.*  transformer.wte.weight: checkpoint \(100, 32\) vs model \(100, 64\)"
    with pytest.raises(CheckpointError, match=wrong_wte):
        GPT2Model.from_pretrained(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="line 1: invalid JSON"):
        GPT2Model.from_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"garbage")
    (folder / "config.json").write_text(json.dumps({**cfg, "n_embd": 32}))
    with pytest.raises(CheckpointError, match="cannot read weights"):
        GPT2Model.from_pretrained(folder)


def test_hub_id_offline_fails_fast_with_advice(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loading.hub_reachable.cache_clear()
    start = time.monotonic()
    with pytest.raises(CheckpointError, match="--random_init"):
        GPT2Model.from_pretrained("gpt2-medium")
    assert time.monotonic() - start < 10
    with pytest.raises(CheckpointError, match="neither a local folder nor a GPT-2 hub id"):
        GPT2Model.from_pretrained("gpt3")
    loading.hub_reachable.cache_clear()


def test_tokenizer_offline_fallback(monkeypatch, capsys):
    monkeypatch.setattr(loading, "hub_file", lambda repo, name: None)
    loading.load_tokenizer.cache_clear()
    tok = loading.load_tokenizer()
    assert "using the GPT-2 tokenizer files in" in capsys.readouterr().err
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" yes") == [3763] and tok.encode("yes") == [8505] and tok.encode("no") == [3919]
    assert tok.pad_token_id == tok.eos_token_id == 50256
    loading.load_tokenizer.cache_clear()


def test_named_sizes_have_gpt2_parameter_counts():
    from transformers import GPT2Config as HFConfig

    for name, hf in [("gpt2", dict()), ("gpt2-medium", dict(n_embd=1024, n_layer=24, n_head=16))]:
        with torch.device("meta"):
            theirs = sum(p.numel() for p in HFGPT2Model(HFConfig(**hf)).parameters())
            ours = sum(p.numel() for p in GPT2Model(get_config(name)).parameters())
        assert ours == theirs == get_config(name).num_parameters()
    assert get_config("gpt2").num_parameters() == 124_439_808


def test_too_long_input_is_a_clear_error():
    model = GPT2Model(GPT2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 max_position_embeddings=8, vocab_size=50))
    with pytest.raises(ValueError, match="longer than the model's context"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_get_config_overrides_a_size_field_too():
    from config import get_config

    c = get_config("tiny", num_hidden_layers=1, hidden_size=64, num_attention_heads=2, hidden_dropout_prob=0.0)
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.hidden_dropout_prob) == (1, 64, 2, 0.0)
    assert get_config("gpt2").hidden_size == 768


def test_the_config_is_the_architecture_only():
    """What changes a built model (sparse attention, prefixes, gradient checkpointing) keeps its own
    settings in ``methods``; the config names the architecture and the dense implementation."""
    assert [f.name for f in dataclasses.fields(GPT2Config)] == [
        "vocab_size", "max_position_embeddings", "hidden_size", "num_hidden_layers", "num_attention_heads",
        "intermediate_size", "hidden_dropout_prob", "attention_probs_dropout_prob", "layer_norm_eps",
        "initializer_range", "attn_impl"]
    with pytest.raises(TypeError, match="attn_pattern"):
        GPT2Config(attn_pattern="window")
    with pytest.raises(ValueError, match="unknown GPT2Config fields: \\['gradient_checkpointing'\\]"):
        GPT2Config.from_dict({**GPT2Config().to_dict(), "gradient_checkpointing": False})
    assert round(get_config("tiny").num_parameters() / 1e6, 1) == 7.0  # config.py's comment on "tiny"
