"""Saved models come back with their attention (``methods.restore``): a sparse model's file keeps
its pattern beside the config, and files written before the config held the architecture only
(sparse fields, ``gradient_checkpointing`` and ``extra`` inside the config) still load: dense
defaults dropped, a sparse pattern rebuilt as sparse attention."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from config import GPT2Config
from engine.checkpoints import atomic_save, check_config
from errors import CheckpointError
from methods.prefix import PrefixCausalSelfAttention, apply_prefix
from methods.restore import load_model, rebuild_model, save_model, split_saved_config
from methods.sparse_attention import (
    SparseAttention,
    SparseCausalSelfAttention,
    apply_sparse_attention,
    attention_fields,
    sparse_attention_of,
)
from models.gpt2 import GPT2Model
from models.heads import ClozeParaphraseScorer
from modules.attention import CausalSelfAttention
from tasks.restore import restore_task_model
from tasks.sonnet import SonnetSettings

WINDOW = SparseAttention("window", window=4)
# What GPT2Config.to_dict() wrote before the restructuring, besides the architecture
LEGACY_DEFAULTS = dict(attn_pattern="dense", attn_window=256, attn_block=64, attn_num_global=1, attn_stride=0,
                       attn_sparse_impl="blockwise", gradient_checkpointing=False, extra={})


def tiny() -> GPT2Model:
    torch.manual_seed(0)
    return GPT2Model(GPT2Config(vocab_size=61, max_position_embeddings=32, hidden_size=16, num_hidden_layers=2,
                                num_attention_heads=2)).eval()


def legacy_config(model: GPT2Model, **fields) -> dict:
    """The config dict a file saved before the change holds: every field of the time."""
    return {**model.config.to_dict(), **LEGACY_DEFAULTS, **fields}


def hidden(model: GPT2Model) -> torch.Tensor:
    ids = torch.randint(0, 61, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.eval()(ids)["last_hidden_state"]


def test_a_sparse_model_saves_its_pattern_beside_the_config(tmp_path):
    model = apply_sparse_attention(tiny(), WINDOW)
    save_model(model, tmp_path / "m.pt", task="x", **attention_fields(model))
    saved = torch.load(tmp_path / "m.pt", weights_only=True)
    assert saved["config"] == model.config.to_dict() and saved["extra"]["attn_window"] == 4
    back = load_model(tmp_path / "m.pt")
    assert sparse_attention_of(back) == WINDOW and torch.equal(hidden(back), hidden(model))
    fresh = load_model(tmp_path / "m.pt", random_init=True)  # the architecture and its attention
    assert sparse_attention_of(fresh) == WINDOW
    assert attention_fields(tiny()) == {}


def test_an_old_dense_file_loads_as_the_plain_model(tmp_path):
    model = tiny()
    atomic_save({"config": legacy_config(model, gradient_checkpointing=True), "model": model.state_dict(),
                 "extra": {"task": "sonnet"}}, tmp_path / "old.pt")
    for back in (load_model(tmp_path / "old.pt"), restore_task_model(str(tmp_path / "old.pt"), "body").model):
        assert type(back.h[0].attn) is CausalSelfAttention and not hasattr(back.config, "attn_pattern")
        assert torch.equal(hidden(back), hidden(model))


def test_an_old_sparse_file_is_rebuilt_sparse(tmp_path):
    sparse = apply_sparse_attention(tiny(), WINDOW)
    old = {"config": legacy_config(sparse, attn_pattern="window", attn_window=4), "model": sparse.state_dict(),
           "extra": {}}
    atomic_save(old, tmp_path / "old.pt")
    back = load_model(tmp_path / "old.pt", hidden_dropout_prob=0.0)
    assert sparse_attention_of(back) == WINDOW and back.config.hidden_dropout_prob == 0.0
    assert torch.equal(hidden(back), hidden(sparse))
    assert not torch.allclose(hidden(back), hidden(tiny()))  # the pattern matters on these 20 tokens
    # A Trainer checkpoint of the time: a head's "gpt." keys and its model_config
    trainer = {"model": {f"gpt.{k}": v for k, v in sparse.state_dict().items()}, "model_config": old["config"],
               "train_config": {}, "extra": {"args": {}}}
    atomic_save(trainer, tmp_path / "last.pt")
    assert torch.equal(hidden(restore_task_model(str(tmp_path / "last.pt"), "body").model), hidden(sparse))
    check_config(old["config"], sparse.config, tmp_path / "last.pt")  # resume compares the architecture only
    with pytest.raises(CheckpointError, match="hidden_size: checkpoint 16 vs model 32"):
        check_config(old["config"], dataclasses.replace(sparse.config, hidden_size=32), tmp_path / "last.pt")


def test_an_old_prefix_file_keeps_its_prefix():
    model = tiny()
    apply_prefix(model, 3, reparam=False)
    back = rebuild_model(legacy_config(model), model.state_dict())
    assert isinstance(back.h[0].attn, PrefixCausalSelfAttention) and torch.equal(hidden(back), hidden(model))


def test_split_saved_config_reads_the_fields_of_either_place():
    config = tiny().config.to_dict()
    assert split_saved_config(legacy_config(tiny())) == (config, None)
    assert split_saved_config(legacy_config(tiny(), attn_pattern="strided", attn_window=8))[1] == SparseAttention(
        "strided", window=8)
    assert split_saved_config(config, {"args": {}, **WINDOW.fields()}) == (config, WINDOW)
    assert isinstance(rebuild_model(config, None, WINDOW.fields()).h[1].attn, SparseCausalSelfAttention)


def test_restore_task_model_reads_each_kind_and_names_what_to_pass(tmp_path):
    """One function for every file a run writes: each task takes the kinds it can use and refuses
    the others with the file to pass."""
    model = tiny()
    save_model(model, tmp_path / "m.pt", task="paraphrase")
    assert torch.equal(hidden(restore_task_model(tmp_path / "m.pt").model), hidden(model))
    scorer = restore_task_model(tmp_path / "m.pt", "paraphrase").model
    assert isinstance(scorer, ClozeParaphraseScorer) and torch.equal(hidden(scorer.gpt), hidden(model))
    trainer = {"model": {f"gpt.{k}": v for k, v in model.state_dict().items()},
               "model_config": model.config.to_dict(), "train_config": {}, "extra": {}}
    atomic_save(trainer, tmp_path / "best.pt")
    with pytest.raises(CheckpointError, match="best.pt is a training-engine checkpoint"):
        restore_task_model(tmp_path / "best.pt")
    assert torch.equal(hidden(restore_task_model(tmp_path / "best.pt", "body").model), hidden(model))
    with pytest.raises(CheckpointError, match="best.pt: not a classifier.py checkpoint"):
        restore_task_model(tmp_path / "best.pt", "classifier")
    atomic_save({**trainer, "trainable_only": True}, tmp_path / "lora.pt")
    with pytest.raises(CheckpointError, match="holds only the trained parameters"):
        restore_task_model(tmp_path / "lora.pt", "body")
    atomic_save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="neither a saved model, a Trainer checkpoint nor a Hugging Face"):
        restore_task_model(tmp_path / "other.pt", "body")
    with pytest.raises(CheckpointError, match="neither a saved sonnet model nor a Trainer checkpoint"):
        restore_task_model(tmp_path / "other.pt", "sonnet", SonnetSettings())
    with pytest.raises(ValueError, match="needs the run's settings"):
        restore_task_model(tmp_path / "m.pt", "sonnet")
    with pytest.raises(ValueError, match="unknown task 'summary'"):
        restore_task_model(tmp_path / "m.pt", "summary")
