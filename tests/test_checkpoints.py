"""Our checkpoint files: a saved GPT-2 reads back whole, writes are atomic, a missing file is a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from config import GPT2Config, get_config
from engine.checkpoints import check_config, load_checkpoint
from methods.restore import load_model, save_model
from models.gpt2 import GPT2Model
from models.loading import CheckpointError


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


def test_save_model_works_in_a_fresh_process(tmp_path):
    """save_model right after ``import torch`` (no torch.distributed submodule loaded by
    anything else first), as a user script calling restore_task_model then save_model does."""
    import subprocess
    import sys

    code = ("import torch\nfrom config import get_config\nfrom models.gpt2 import GPT2Model\n"
            "from methods.restore import save_model, load_model\n"
            f"save_model(GPT2Model(get_config('tiny')), {str(tmp_path / 'm.pt')!r})\n"
            f"print(load_model({str(tmp_path / 'm.pt')!r}).config.num_hidden_layers)\n")
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_a_misfit_checkpoint_is_one_line_that_names_it_once(tmp_path) -> None:
    # load_weights_into wrapped load_model_state's own error: "a.pt does not fit this model:
    # a.pt does not fit the model (...)".
    from engine.checkpoints import atomic_save, load_weights_into
    from models.sonnet_gpt import SonnetGPT

    def sonnet_model(width: int) -> SonnetGPT:
        return SonnetGPT(GPT2Model(GPT2Config(vocab_size=100, max_position_embeddings=32, hidden_size=width,
                                              num_hidden_layers=2, num_attention_heads=4)))

    path = tmp_path / "a.pt"
    atomic_save({"model": sonnet_model(32).state_dict()}, path)
    with pytest.raises(CheckpointError) as e:
        load_weights_into(sonnet_model(48), path)
    message = str(e.value)
    assert message.count(str(path)) == 1 and message.count("does not fit") == 1 and "\n" not in message
    assert "gpt.wte.weight (100, 32) vs (100, 48)" in message
