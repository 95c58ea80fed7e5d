"""Sonnet evaluation beyond chrF: held-out loss and form each epoch, early stopping on either,
the --train_size validation split, form.json, and starting from a saved model."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

import sonnet_generation
from cli.sonnet import settings_from_args
from config import GPT2Config, get_config
from engine.data import DataFormatError
from methods.restore import load_model, save_model
from models.gpt2 import GPT2Model
from models.sonnet_gpt import SonnetGPT
from tasks.course_data import read_sonnets
from tasks.lm import held_out_loss
from tasks.metrics import chrf
from tasks.sonnet import model_for_training
from tasks.sonnet_eval import PROMPT_LINES, evaluate_sonnets, form_metrics, loss_loader, sonnet_prompt, split_train
from tasks.sonnet_form import summarize_form
from tests.conftest import SHARED_DATA, sonnet_data_flags

FAST = ["--model_size", "tiny", "--random_init", "--max_new_tokens", "6", "--max_length", "48", "--batch_size", "2",
        "--lr", "3e-3", "--device", "cpu"]


def epochs_of(run) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["type"] == "epoch"]


def test_split_train_is_seeded_disjoint_and_complete():
    texts = [f"sonnet {i}" for i in range(20)]
    train, valid = split_train(texts, 0.75, seed=1)
    assert (len(train), len(valid)) == (15, 5) and sorted(train + valid) == sorted(texts)
    assert train == sorted(train, key=texts.index) and valid == sorted(valid, key=texts.index)  # file order
    assert split_train(texts, 0.75, seed=1) == (train, valid)
    assert split_train(texts, 0.75, seed=2) != (train, valid)
    assert split_train(texts, 1.0, seed=1) == (texts, [])
    with pytest.raises(ValueError, match="both need at least one"):
        split_train(texts[:1], 0.5, seed=1)


def test_evaluate_sonnets_reports_chrf_held_out_loss_and_form(tokenizer):
    torch.manual_seed(0)
    model = SonnetGPT(GPT2Model(get_config("tiny"))).eval()
    refs = [s.text for s in read_sonnets(SHARED_DATA / "TRUE_sonnets_held_out_dev.txt", 3)]
    prompts = [sonnet_prompt(t) for t in refs]
    assert all(p.count("\n") == 2 and r.startswith(p) for p, r in zip(prompts, refs))
    made = [p + "\nAnd so the summer fades away" for p in prompts]
    loader = loss_loader(refs, tokenizer, 64, 2)
    with torch.no_grad():
        got = evaluate_sonnets(model, lambda m, ps: [made[prompts.index(p)] for p in ps], prompts, refs, loader)
        loss = held_out_loss(model, loader)
    assert got["chrf"] == pytest.approx(chrf(made, refs))
    assert got["loss"] == loss["loss"] and got["perplexity"] == pytest.approx(torch.tensor(loss["loss"]).exp().item())
    assert got["loss"] == pytest.approx(10.8, abs=0.5)  # random weights: about log(50257)
    assert {k: got[k] for k in form_metrics(made)} == form_metrics(made)
    assert got["form_mean_lines"] == 4.0


def test_form_metrics_score_only_the_generated_lines():
    refs = [s.text for s in read_sonnets(SHARED_DATA / "TRUE_sonnets_held_out_dev.txt", 4)]
    prompts = [sonnet_prompt(t) for t in refs]
    bare = form_metrics(prompts)  # nothing generated: no form, though lines 1 and 3 of a prompt may rhyme
    assert bare["form_rhyme_adherence"] == 0.0 and bare["form_mean_syllable_error"] == 10.0
    assert bare["form_mean_lines"] == 3.0  # the line count is of the whole sonnet
    assert summarize_form(prompts).rhyme_adherence > 0  # what scoring the whole text would have credited
    whole = form_metrics(refs)  # the true sonnets: their lines 4-14 measured, in the rhyme scheme with 1-3
    assert whole["form_rhyme_adherence"] > 0.8 and whole["form_mean_syllable_error"] < 0.5


def test_cli_early_stops_on_dev_loss_and_logs_every_metric(tmp_path):
    result = sonnet_generation.main([*FAST, "--limit", "3", "--epochs", "3", "--early_stop_metric", "loss",
                                     "--generate_from", "best", *sonnet_data_flags(tmp_path)])
    run = tmp_path / "run"
    epochs = epochs_of(run)
    assert len(epochs) == 3
    for e in epochs:
        assert {"chrf", "loss", "perplexity", "form_mean_lines", "form_rhyme_adherence"} <= set(e["dev"])
    best = min(epochs, key=lambda e: e["dev"]["loss"])
    assert result["best"]["epoch"] == best["epoch"] and result["best"]["loss"] == best["dev"]["loss"]
    ckpt = torch.load(run / "last.pt", weights_only=False)
    assert (ckpt["train_config"]["metric"], ckpt["train_config"]["mode"]) == ("loss", "min")
    # the final model is the best epoch's: its dev loss is that epoch's
    assert result["dev_loss"] == pytest.approx(best["dev"]["loss"], rel=1e-5)
    report = json.loads((run / "form.json").read_text())
    written = read_sonnets(tmp_path / "pred" / "generated_sonnets_dev.txt")
    assert report["form"]["dev"] == summarize_form([s.text for s in written], PROMPT_LINES).as_dict()
    assert report["form"]["dev"] == result["form"]["dev"]
    assert report["dev_chrf"] == result["dev_chrf"] and report["dev_perplexity"] == result["dev_perplexity"]


def test_train_size_judges_epochs_on_held_back_training_sonnets(tmp_path, tokenizer):
    result = sonnet_generation.main([*FAST, "--limit", "4", "--epochs", "1", "--train_size", "0.5", "--seed", "3",
                                     *sonnet_data_flags(tmp_path)])
    run = tmp_path / "run"
    _, valid = split_train([s.text for s in read_sonnets(SHARED_DATA / "sonnets.txt", 4)], 0.5, 3)
    model = SonnetGPT(load_model(run / "sonnet-model.pt")).eval()
    with torch.no_grad():
        on_valid = held_out_loss(model, loss_loader(valid, tokenizer, 48, 12))["loss"]
    logged = epochs_of(run)[0]["dev"]["loss"]
    assert logged == pytest.approx(on_valid, rel=1e-5)
    assert abs(result["dev_loss"] - logged) > 1e-3  # the dev sonnets were not what judged the epoch


def test_bad_evaluation_flags_stop_before_any_work(tmp_path):
    for bad in (["--train_size", "0"], ["--train_size", "1.5"], ["--early_stop_metric", "bleu"]):
        with pytest.raises(SystemExit):
            sonnet_generation.get_args(bad)
    with pytest.raises(DataFormatError, match="1 to train and 0 to validate"):  # 1 sonnet cannot be split
        sonnet_generation.main([*FAST, "--limit", "1", "--epochs", "1", "--train_size", "0.9",
                                *sonnet_data_flags(tmp_path)])


def test_training_starts_from_a_saved_model_or_its_architecture(tmp_path):
    torch.manual_seed(0)
    saved = GPT2Model(GPT2Config(hidden_size=64, num_hidden_layers=1, num_attention_heads=2))
    save_model(saved, tmp_path / "model.pt")
    args = sonnet_generation.get_args(["--checkpoint", str(tmp_path / "model.pt"), "--hidden_dropout_prob", "0.2"])
    model, _, trainable_only = model_for_training(settings_from_args(args))
    assert not trainable_only and model.gpt.config.num_hidden_layers == 1
    assert model.gpt.config.hidden_dropout_prob == 0.2  # the flag, not the saved model's dropout
    assert all(torch.equal(a, b) for a, b in zip(model.gpt.state_dict().values(), saved.state_dict().values()))
    fresh, _, _ = model_for_training(settings_from_args(argparse.Namespace(**{**vars(args), "random_init": True})))
    assert fresh.gpt.config.num_hidden_layers == 1
    assert not torch.equal(fresh.gpt.wte.weight, saved.wte.weight)
    lora, _, trainable_only = model_for_training(settings_from_args(sonnet_generation.get_args(
        ["--checkpoint", str(tmp_path / "model.pt"), "--fine-tune-mode", "lora"])))
    assert trainable_only and any("lora" in n for n, p in lora.named_parameters() if p.requires_grad)


def test_pretraining_benchmark_runs_both_starts_and_tabulates(tmp_path):
    from benchmarks.sonnet_pretraining import main as bench
    from benchmarks.sonnet_pretraining import table
    from experiments.tables import mean_std

    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(2 ** 0.5)) and math.isnan(mean_std([5.0])[1])
    row = {"dev_chrf": 1.0, "dev_perplexity": 2.0, "mean_lines": 3.0, "mean_syllable_error": 4.0,
           "rhyme_adherence": 0.5}
    assert "| random | 2 | 2.00 ± 1.41 | 2.0 ± 0.0 |" in table({"random": [row, {**row, "dev_chrf": 3.0}]})
    torch.manual_seed(0)
    save_model(GPT2Model(GPT2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    max_position_embeddings=64)), tmp_path / "model.pt")
    out = bench(["--pretrained", str(tmp_path / "model.pt"), "--seeds", "1", "--epochs", "1", "--limit", "2",
                 "--max_new_tokens", "4", "--data", str(SHARED_DATA), "--out", str(tmp_path / "bench"),
                 "--", "--max_length", "48", "--device", "cpu"])
    runs = out["runs"]
    assert set(runs) == {"pretrained", "random"} and all(len(r) == 1 for r in runs.values())
    assert runs["pretrained"][0]["dev_chrf"] != runs["random"][0]["dev_chrf"]  # two different starts
    for start in runs:
        assert len(epochs_of(tmp_path / "bench" / f"{start}-seed11711")) == 1
    saved = json.loads((tmp_path / "bench" / "results.json").read_text())
    assert saved["table"] == out["table"] and "| pretrained | 1 |" in out["table"]
