"""Causal-LM pretraining: corpus chunking, clear errors, the loss goes down on a
tiny corpus, resume continues the run, and sparse attention trains too."""

from __future__ import annotations

import json

import pytest
import torch

from config import GPT2Config
from engine.trainer import TrainConfig
from methods.restore import load_model
from methods.sparse_attention import SparseAttention, apply_sparse_attention, sparse_attention_of
from models.gpt2 import GPT2Model
from models.sonnet_gpt import SonnetGPT
from pretrain import main
from tasks.lm import causal_lm_loss, corpus_blocks, pretrain_lm, read_corpus, split_held_out

CORPUS = "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate.\n" * 12


class CharTokenizer:
    """Bytes as tokens: keeps the model's vocabulary (and the test) tiny."""

    pad_token_id = 0

    def __call__(self, text: str, add_special_tokens: bool = False, verbose: bool = False) -> dict:
        return {"input_ids": [b % 96 + 1 for b in text.encode()]}


def tiny_lm(attention: SparseAttention | None = None) -> GPT2Model:
    torch.manual_seed(0)
    model = GPT2Model(GPT2Config(vocab_size=97, max_position_embeddings=32, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2))
    return apply_sparse_attention(model, attention or SparseAttention())


def test_corpus_blocks_cover_the_stream(tokenizer):
    blocks = corpus_blocks(CORPUS, tokenizer, 16)
    ids = tokenizer(CORPUS, add_special_tokens=False)["input_ids"]
    assert all(len(b["input_ids"]) == 16 for b in blocks[:-1])
    assert sum((b["input_ids"] for b in blocks), []) == ids[: sum(len(b["input_ids"]) for b in blocks)]
    assert len(ids) - sum(len(b["input_ids"]) for b in blocks) <= 1  # only a 1-token remainder is dropped
    train, held = split_held_out(blocks, 0.1)
    assert train + held == blocks and len(held) == max(1, round(len(blocks) * 0.1))


def test_corpus_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        read_corpus(tmp_path / "nope.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="empty.txt: the corpus is empty"):
        read_corpus(empty)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"ok\nline two\n\xff\xfe")
    with pytest.raises(ValueError, match="bin.txt:3: not UTF-8"):
        read_corpus(binary)


def held_out_loss_of(model: GPT2Model, text: str) -> float:
    blocks = corpus_blocks(text, CharTokenizer(), 32)
    ids = torch.tensor([b["input_ids"] for b in blocks if len(b["input_ids"]) == 32])
    model.eval()
    with torch.no_grad():
        return float(causal_lm_loss(SonnetGPT(model), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}))


@pytest.mark.parametrize("pattern", [SparseAttention(), SparseAttention("window", window=8)], ids=str)
def test_pretraining_lowers_the_loss(tmp_path, pattern):
    corpus = tmp_path / "poems.txt"
    corpus.write_text(CORPUS)
    model = tiny_lm(pattern)
    before = held_out_loss_of(model, CORPUS)
    cfg = TrainConfig(epochs=4, lr=3e-3, output_dir=str(tmp_path / "run"), progress=False)
    best = pretrain_lm(model, CharTokenizer(), corpus, cfg, batch_size=4)
    after = held_out_loss_of(model, CORPUS)
    assert after < before - 1.0, (before, after)
    assert best["epoch"] >= 1 and best["loss"] < before
    epochs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [e["train_loss"] for e in epochs if e["type"] == "epoch"]
    assert len(losses) == 4 and losses[-1] < losses[0]


def test_resume_continues_pretraining(tmp_path):
    corpus = tmp_path / "poems.txt"
    corpus.write_text(CORPUS)
    whole = tiny_lm()
    pretrain_lm(whole, CharTokenizer(), corpus,
                TrainConfig(epochs=2, lr=3e-3, output_dir=str(tmp_path / "a"), progress=False, save_top_k=0))
    part = tiny_lm()
    pretrain_lm(part, CharTokenizer(), corpus,
                TrainConfig(epochs=2, lr=3e-3, output_dir=str(tmp_path / "b"), progress=False, save_top_k=0,
                            max_steps=3))
    resumed = tiny_lm()
    pretrain_lm(resumed, CharTokenizer(), corpus,
                TrainConfig(epochs=2, lr=3e-3, output_dir=str(tmp_path / "b"), progress=False, save_top_k=0,
                            resume=True))
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_cli_pretrains_and_saves(tmp_path, tokenizer):
    corpus = tmp_path / "poems.txt"
    corpus.write_text(CORPUS)
    out = tmp_path / "cli"
    best = main(["--corpus", str(corpus), "--model_size", "tiny", "--random_init", "--epochs", "1",
                 "--max_length", "32", "--limit", "6", "--lr", "1e-3", "--output_dir", str(out), "--no_progress",
                 "--attn_pattern", "strided", "--attn_window", "4", "--device", "cpu"])
    assert (out / "model.pt").exists() and (out / "last.pt").exists()
    assert best["epoch"] == 1 and best["loss"] > 0
    saved = torch.load(out / "model.pt", weights_only=True)
    assert saved["extra"]["attn_pattern"] == "strided" and saved["extra"]["attn_window"] == 4
    assert sparse_attention_of(load_model(out / "model.pt")) == SparseAttention("strided", window=4)


def test_sonnet_cli_pretrains_then_fine_tunes_with_lora_and_sparse_attention(tmp_path, tokenizer):
    from sonnet_generation import main as sonnet_main
    from tests.conftest import SHARED_DATA

    corpus = tmp_path / "poems.txt"
    corpus.write_text(CORPUS * 3)
    run = tmp_path / "run"
    sonnet_main([
        "--model_size", "tiny", "--random_init", "--epochs", "1", "--limit", "2", "--max_new_tokens", "8",
        "--sonnet_path", str(SHARED_DATA / "sonnets.txt"),
        "--held_out_sonnet_path", str(SHARED_DATA / "sonnets_held_out.txt"),
        "--dev_held_out_sonnet_path", str(SHARED_DATA / "sonnets_held_out_dev.txt"),
        "--dev_true_sonnet_path", str(SHARED_DATA / "TRUE_sonnets_held_out_dev.txt"),
        "--sonnet_out", str(tmp_path / "gen.txt"), "--dev_sonnet_out", str(tmp_path / "dev.txt"),
        "--output_dir", str(run), "--no_progress", "--device", "cpu",
        "--pretrain_corpus", str(corpus), "--pretrain_epochs", "2", "--pretrain_block_size", "32",
        "--fine-tune-mode", "lora", "--attn_pattern", "window", "--attn_window", "8",
    ])
    log = [json.loads(x) for x in (run / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log if e["type"] == "epoch"] == [1, 2]
    ckpt = torch.load(run / "pretrain" / "last.pt", weights_only=True)
    assert ckpt["trainable_only"] and all("lora" in k for k in ckpt["model"])  # LoRA: only adapters pretrain
    saved = torch.load(run / "sonnet-model.pt", weights_only=True)
    assert saved["extra"]["attn_pattern"] == "window" and saved["extra"]["attn_window"] == 8
    assert (tmp_path / "gen.txt").read_text().startswith("--Generated Sonnets--")


POEMS_CSV = ('Title,Poem,Poet,Tags\n'
             '"One","Shall I compare thee\r\r\nto a summer\'s day?",Will,\n'
             '"Two","  Thou art more lovely\r\r\n  and more temperate.",Will,"Love,Nature"\n')


def test_a_poetry_csv_corpus_is_its_poems_joined_by_the_end_of_text_token(tmp_path, tokenizer):
    csv_path = tmp_path / "poems.csv"
    csv_path.write_text(POEMS_CSV)
    text = read_corpus(csv_path)
    assert text == "Shall I compare thee\nto a summer's day?<|endoftext|>Thou art more lovely\nand more temperate."
    assert read_corpus(csv_path, "text") == POEMS_CSV  # --corpus_format text: the file as it is
    plain = tmp_path / "poems.txt"
    plain.write_text(POEMS_CSV)
    assert read_corpus(plain) == POEMS_CSV and read_corpus(plain, "csv") == text  # auto goes by the suffix
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.eos_token_id) == 1  # one token between the poems, not its characters
    bad = tmp_path / "bad.csv"
    bad.write_text("Title,Text\nOne,two\n")
    with pytest.raises(ValueError, match="bad.csv:1: .*no Poem column"):
        read_corpus(bad)


def test_cli_pretrains_on_a_poetry_csv(tmp_path):
    corpus = tmp_path / "poems.csv"
    corpus.write_text(POEMS_CSV + "".join(f'"T{i}","Line {i} of a poem\r\r\nand its second line",P,\n'
                                          for i in range(20)))
    out = tmp_path / "cli"
    best = main(["--corpus", str(corpus), "--model_size", "tiny", "--random_init", "--epochs", "1",
                 "--max_length", "32", "--limit", "4", "--output_dir", str(out), "--no_progress", "--device", "cpu"])
    assert (out / "model.pt").exists() and best["loss"] > 0
    with pytest.raises(SystemExit):
        main(["--corpus", str(corpus), "--corpus_format", "json"])
