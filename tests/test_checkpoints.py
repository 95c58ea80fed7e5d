"""Our checkpoint files: a saved GPT-2 reads back whole, writes are atomic, a missing file is a clear error."""

from __future__ import annotations

import pytest
import torch

from config import GPT2Config, get_config
from models.gpt2 import GPT2Model
from models.loading import CheckpointError
from training.checkpoints import check_config, load_checkpoint, load_model, save_model


def test_own_checkpoint_roundtrip_and_config_mismatch(tmp_path):
    model = GPT2Model(get_config("tiny"))
    save_model(model, tmp_path / "m.pt", note="x")
    back = load_model(tmp_path / "m.pt")
    assert back.config == model.config
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    assert load_checkpoint(tmp_path / "m.pt")["extra"] == {"note": "x"}
    assert not list(tmp_path.glob(".*tmp"))  # atomic write left no temporary file
    other = GPT2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    with pytest.raises(CheckpointError, match="hidden_size: checkpoint 128 vs model 64"):
        check_config(model.config.to_dict(), other, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "missing.pt")
