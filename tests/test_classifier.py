"""classifier.py on a micro random GPT-2: every fine-tuning mode learns, the CLI writes
the starter's prediction files, and bad input fails clearly."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import classifier
import tasks.common
import tasks.sentiment
from cli.common import pick_device, train_config_from_args
from config import GPT2Config
from engine.data import PadCollator, make_loader
from engine.trainer import TrainConfig, Trainer
from errors import InputError
from methods.fine_tune import FineTuneConfig, LoraConfig, set_fine_tune_mode
from methods.gradient_checkpointing import CheckpointedLayer
from models.gpt2 import GPT2Model
from models.heads import GPT2SentimentClassifier
from models.loading import load_tokenizer
from tasks.course_data import read_sentiment, sentiment_features
from tasks.settings import DataSettings, RunSettings
from tests.conftest import SHARED_DATA as SHARED


def micro_gpt() -> GPT2Model:
    torch.manual_seed(0)
    return GPT2Model(GPT2Config(vocab_size=50257, max_position_embeddings=64, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=2))


@pytest.mark.parametrize("mode,lr", [("last-linear-layer", 1e-2), ("full-model", 1e-3), ("lora", 1e-2)])
def test_each_mode_learns_a_fixed_batch(tmp_path, mode, lr):
    tok = load_tokenizer(verbose=False)
    feats = sentiment_features(read_sentiment(SHARED / "ids-sst-dev.csv", limit=8), tok, 64)
    batch = PadCollator(tok.pad_token_id)(feats)
    model = GPT2SentimentClassifier(micro_gpt(), num_labels=5, hidden_dropout_prob=0.0)
    adapter = LoraConfig(r=4, alpha=8, dropout=0.0) if mode == "lora" else None
    trainable_only = set_fine_tune_mode(model, FineTuneConfig(mode, adapter), model.head)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("gpt.") and "lora_" not in k}

    def loss_fn(m, b):
        return F.cross_entropy(m(b["input_ids"], b["attention_mask"]), b["labels"])

    def batch_loss():
        model.eval()
        with torch.no_grad():
            return loss_fn(model, batch).item()

    before = batch_loss()
    cfg = TrainConfig(epochs=8, lr=lr, output_dir=str(tmp_path), progress=False, plot=False,
                      save_trainable_only=trainable_only, save_top_k=0)
    Trainer(model, loss_fn, make_loader(feats, PadCollator(tok.pad_token_id), 8, shuffle=True), None, cfg).fit()
    after = batch_loss()
    assert after < 0.8 * before, (before, after)
    body_changed = any(not torch.equal(model.state_dict()[k], v) for k, v in frozen.items())
    assert body_changed == (mode == "full-model")


def test_cli_writes_starter_prediction_files(tmp_path, capsys, classifier_cli):
    results = classifier.main(classifier_cli("lora"))
    assert set(results) == {"sst", "cfimdb"}
    out = capsys.readouterr().out
    assert "sst dev accuracy" in out and "macro-F1" in out and "truncated" in out  # CFIMDB reviews > 32 tokens
    for ds, n_labels in (("sst", 5), ("cfimdb", 2)):
        for split, suffix in (("dev", "dev"), ("test", "test-student")):
            text = (tmp_path / "pred" / f"lora-{ds}-{split}-out.csv").read_text()
            lines = text.split("\n")
            assert lines[0] == "id \t Predicted_Sentiment " and lines[-1] == ""
            rows = [line.split(", ") for line in lines[1:-1]]
            want = [r.id for r in read_sentiment(SHARED / f"ids-{ds}-{suffix}.csv", limit=8)]
            assert [r[0] for r in rows] == want
            assert all(r[1].endswith(" ") and 0 <= int(r[1]) < n_labels for r in rows)
            if split == "dev":  # the reported accuracy is that of the written predictions
                labels = [r.label for r in read_sentiment(SHARED / f"ids-{ds}-dev.csv", limit=8)]
                hits = sum(int(r[1]) == y for r, y in zip(rows, labels))
                assert results[ds]["accuracy"] == pytest.approx(hits / len(labels))
        assert (tmp_path / "runs" / ds / "metrics.jsonl").exists()


def test_speed_flags_reach_the_model_and_loader(tmp_path, monkeypatch, classifier_cli):
    seen = {}
    real_build = tasks.sentiment.build_body

    def spy(model_settings, **kw):
        gpt, tok = real_build(model_settings, **kw)
        seen["checkpointing"] = all(isinstance(block, CheckpointedLayer) for block in gpt.h)
        return gpt, tok

    def loader_spy(*a, **kw):
        seen["grouped"] = kw.get("group_by_length")
        return real_loader(*a, **kw)

    real_loader = tasks.common.make_loader
    monkeypatch.setattr(tasks.sentiment, "build_body", spy)
    monkeypatch.setattr(tasks.common, "make_loader", loader_spy)
    results = classifier.main(classifier_cli("full-model", "--dataset", "sst", "--group_by_length",
                                       "--gradient_checkpointing"))
    assert seen == {"checkpointing": True, "grouped": True} and set(results) == {"sst"}


def test_default_lr_depends_on_mode():
    assert classifier.get_args(["--fine-tune-mode", "full-model"]).lr == 1e-3  # the starter's, in both its modes
    assert classifier.get_args(["--fine-tune-mode", "full-model", "--recipe", "recommended"]).lr == 1e-5
    assert classifier.get_args([]).lr == 1e-3 and classifier.get_args([]).fine_tune_mode == "last-linear-layer"
    args = classifier.get_args(["--fine-tune-mode", "lora", "--lr", "0.5"])
    assert args.lr == 0.5 and args.batch_size == 8 and args.epochs == 10 and args.seed == 11711
    assert args.hidden_dropout_prob == 0.3 and args.model_size == "gpt2" and args.sst_train == "data/ids-sst-train.csv"


def test_malformed_train_file_is_a_clear_error(tmp_path, classifier_cli):
    bad = tmp_path / "bad.csv"
    bad.write_text("\tid\tsentence\tsentiment\n0\ta\tgood\t1\n1\tb\tbroken row without label\n")
    args = classifier_cli("last-linear-layer", "--dataset", "sst", "--sst_train", str(bad))
    with pytest.raises(ValueError, match=rf"{bad}:3: expected 4 tab-separated fields"):
        classifier.main(args)


def test_shared_flags_reach_the_engine():
    args = classifier.get_args(["--fine_tune_mode", "full-model", "--grad_accum", "4", "--scheduler", "cosine",
                                "--warmup_ratio", "0.1", "--patience", "2", "--resume", "--no_progress",
                                "--lr", "1e-5"])
    typed = tasks.common.train_config(classifier.settings_from_args(args), torch.device("cpu"), "x",
                                      metric="macro_f1")
    for cfg in (train_config_from_args(args, torch.device("cpu"), metric="macro_f1", output_dir="x"), typed):
        assert (cfg.grad_accum, cfg.scheduler, cfg.warmup_ratio, cfg.patience, cfg.resume, cfg.progress) == \
            (4, "cosine", 0.1, 2, True, False)
        assert (cfg.lr, cfg.seed, cfg.metric, cfg.output_dir, cfg.epochs) == (1e-5, 11711, "macro_f1", "x", 10)


def test_the_flags_become_typed_settings():
    """classifier.py parses argv once into SentimentSettings; the task reads nothing else, and the
    flat flags stay whole for the checkpoints (extra["args"])."""
    args = classifier.get_args(["--fine-tune-mode", "lora", "--lora_r", "4", "--model_size", "tiny", "--random_init",
                                "--limit", "16", "--batch_size", "4", "--group_by_length", "--use_gpu",
                                "--output_dir", "out", "--dataset", "sst", "--sst_dev", "dev.csv",
                                "--rdrop_alpha", "1", "--pooling", "mean", "--seed", "3"])
    s = classifier.settings_from_args(args)
    assert (s.model.model_size, s.model.random_init, s.model.hidden_dropout_prob) == ("tiny", True, 0.3)
    assert s.data == DataSettings(limit=16, batch_size=4, group_by_length=True)
    assert s.run == RunSettings(use_gpu=True, output_dir="out")
    assert s.fine_tune == FineTuneConfig("lora", LoraConfig(r=4))
    assert (s.objective.rdrop_alpha, s.objective.pooling, s.objective.enabled) == (1.0, "mean", True)
    assert (s.seed, s.train.lr, s.dataset) == (3, 3e-4, "sst")
    assert s.path("sst", "dev") == "dev.csv" and s.path("cfimdb", "test") == "data/ids-cfimdb-test-student.csv"
    assert s.flags == vars(args)
    assert not classifier.settings_from_args(classifier.get_args([])).objective.enabled


def test_device_choice():
    assert pick_device(False, "cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert pick_device(False, "auto") == torch.device("cpu")
        with pytest.raises(InputError, match="CUDA is not available"):
            pick_device(True)


@pytest.mark.parametrize("case", ["missing file", "offline hub id"])
def test_command_line_reports_bad_input_without_a_traceback(tmp_path, case):
    """The command ends with one error line and status 2: a missing data file, or a hub id
    while offline (with the loader's advice: a local folder or --random_init)."""
    import os
    import subprocess
    import sys

    root = Path(classifier.__file__).resolve().parent
    if case == "missing file":
        args = ["--model_size", "tiny", "--random_init", "--sst_train", str(tmp_path / "missing.csv")]
        want = rf"^error: {re.escape(str(tmp_path / 'missing.csv'))}: file does not exist"
    else:
        args = ["--model_size", "gpt2", "--limit", "4"]
        want = r"^error: cannot download 'gpt2'.*--random_init"
    proc = subprocess.run([sys.executable, str(root / "classifier.py"), "--dataset", "sst", *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    assert re.search(want, proc.stderr.strip().splitlines()[-1])
    assert "Traceback" not in proc.stderr


def test_model_size_takes_a_saved_model_file(tmp_path, classifier_cli, capsys):
    """pretrain.py's model.pt (or a task's *-model.pt) starts any task: its weights, or with
    --random_init its architecture with fresh weights; a file that is no saved model exits 2."""
    from methods.restore import save_model
    from tasks.common import build_body

    torch.manual_seed(3)
    body = GPT2Model(GPT2Config(max_position_embeddings=64, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=2))
    save_model(body, tmp_path / "model.pt", task="pretrain")
    settings = classifier.settings_from_args(classifier.get_args(["--model_size", str(tmp_path / "model.pt")]))
    loaded, _ = build_body(settings.model)
    for (k, a), b in zip(body.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    fresh, _ = build_body(classifier.settings_from_args(
        classifier.get_args(["--model_size", str(tmp_path / "model.pt"), "--random_init"])).model)
    assert fresh.config.hidden_size == 32 and not torch.equal(fresh.wte.weight, body.wte.weight)

    argv = [a for a in classifier_cli("full-model", "--dataset", "sst") if a != "--random_init"]
    argv[argv.index("--model_size") + 1] = str(tmp_path / "model.pt")
    assert classifier.main(argv)["sst"]["accuracy"] >= 0

    import subprocess
    import sys

    (tmp_path / "notes.pt").write_bytes(b"not a checkpoint")
    root = Path(classifier.__file__).resolve().parent
    proc = subprocess.run([sys.executable, str(root / "classifier.py"), "--model_size", str(tmp_path / "notes.pt"),
                           "--dataset", "sst", "--limit", "4", "--output_dir", str(tmp_path / "bad")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "notes.pt" in proc.stderr and "Traceback" not in proc.stderr
