"""The course starter's options keep their defaults and meanings (the handout: "Do not change any
of the existing command options (including defaults)"), through the real command lines: each
starter flag's default, what the starter's loop does without a flag (no clipping, a constant
lr, no early stopping, CFIMDB at batch 8, sonnets from the last epoch), ``--recipe
recommended`` one flag away, both ``--fine-tune-mode`` spellings, and every ``--help`` showing
the defaults.

The starter's table below is copied from cfifty/public_cs224n_gpt (commit 7570cfa, the
``get_args`` of classifier.py, paraphrase_detection.py and sonnet_generation.py, and their
``__main__`` blocks and training loops); the repository is not available to the tests."""

from __future__ import annotations

import argparse
import re

import pytest
import torch

import classifier
import distillation.__main__ as distillation_main
import experiments.__main__ as experiments_main
import generate
import paraphrase_detection
import prepare_submit
import pretrain
import sonnet_generation
import tasks.sonnet
from cli import paraphrase as paraphrase_cli
from cli import sonnet as sonnet_cli
from cli.defaults import shows_default
from tests.conftest import sonnet_data_flags

STARTER_FLAGS = {
    "classifier": {"seed": 11711, "epochs": 10, "fine_tune_mode": "last-linear-layer", "use_gpu": False,
                   "batch_size": 8, "hidden_dropout_prob": 0.3, "lr": 1e-3},
    "paraphrase": {"para_train": "data/quora-train.csv", "para_dev": "data/quora-dev.csv",
                   "para_test": "data/quora-test-student.csv", "para_dev_out": "predictions/para-dev-output.csv",
                   "para_test_out": "predictions/para-test-output.csv", "seed": 11711, "epochs": 10,
                   "use_gpu": False, "batch_size": 8, "lr": 1e-5, "model_size": "gpt2"},
    "sonnet": {"sonnet_path": "data/sonnets.txt", "held_out_sonnet_path": "data/sonnets_held_out.txt",
               "sonnet_out": "predictions/generated_sonnets.txt", "seed": 11711, "epochs": 10, "use_gpu": False,
               "temperature": 1.2, "top_p": 0.9, "batch_size": 8, "lr": 1e-5, "model_size": "gpt2"},
}
# What the starter's loops do with no flag for it: AdamW (weight decay 0) at a constant lr, no
# warm-up, no gradient clipping, every epoch run; the sonnets sampled (top-p, temperature).
STARTER_LOOP = {"max_grad_norm": 0.0, "scheduler": "constant", "warmup_ratio": 0.0, "patience": 0,
                "weight_decay": 0.0, "grad_accum": 1}
PARSE = {
    "classifier": classifier.get_args,
    "paraphrase": lambda argv: paraphrase_cli.parse_args(argv),
    "sonnet": sonnet_generation.get_args,
}


@pytest.mark.parametrize("script", sorted(STARTER_FLAGS))
def test_every_starter_flag_keeps_the_starter_default_and_loop(script):
    args = vars(PARSE[script]([]))
    want = {**STARTER_FLAGS[script], **STARTER_LOOP}
    assert {k: args[k] for k in want} == want
    assert args["recipe"] == "starter"


def test_classifier_lr_is_the_starters_in_both_of_its_modes(capsys):
    """The starter's --lr default is 1e-3 whatever the mode (its help text's 1e-5 for fine-tuning
    is not what it runs); the run says so, and --recipe recommended gives the mode's own."""
    assert classifier.get_args(["--fine-tune-mode", "full-model"]).lr == 1e-3
    assert ("full-model at lr 0.001, the starter's default; --recipe recommended or --lr 1e-05"
            in capsys.readouterr().out)
    recommended = classifier.get_args(["--fine-tune-mode", "full-model", "--recipe", "recommended"])
    assert (recommended.lr, recommended.max_grad_norm) == (1e-5, 1.0)
    assert classifier.get_args(["--fine-tune-mode", "full-model", "--lr", "2e-5"]).lr == 2e-5
    assert classifier.get_args(["--fine-tune-mode", "lora"]).lr == 3e-4  # not a starter mode: its own


def test_no_gradient_clipping_unless_asked():
    settings = [classifier.settings_from_args(classifier.get_args([])),
                paraphrase_cli.settings_from_args(paraphrase_cli.parse_args([])),
                sonnet_cli.settings_from_args(sonnet_generation.get_args([]))]
    assert [s.train.max_grad_norm for s in settings] == [0.0, 0.0, 0.0]
    assert paraphrase_cli.parse_args(["--recipe", "recommended"]).max_grad_norm == 1.0
    assert paraphrase_cli.parse_args(["--recipe", "recommended", "--max_grad_norm", "0.5"]).max_grad_norm == 0.5


def test_sonnet_defaults_are_the_starters_and_the_recipe_restores_ours():
    a = sonnet_generation.get_args([])
    assert (a.epochs, a.patience, a.scheduler, a.warmup_ratio, a.generate_from) == (10, 0, "constant", 0.0, "last")
    r = sonnet_generation.get_args(["--recipe", "recommended"])
    assert (r.epochs, r.patience, r.scheduler, r.warmup_ratio, r.max_grad_norm, r.generate_from) == (
        50, 3, "linear", 0.1, 1.0, "best")
    assert sonnet_generation.get_args(["--recipe", "recommended", "--epochs", "7"]).epochs == 7  # a given flag wins


@pytest.mark.parametrize("script", sorted(PARSE))
@pytest.mark.parametrize("spelling", ["--fine-tune-mode", "--fine_tune_mode"])
def test_each_script_takes_both_fine_tune_mode_spellings(script, spelling):
    assert PARSE[script]([spelling, "lora"]).fine_tune_mode == "lora"


def test_cfimdb_trains_at_batch_8_whatever_batch_size_says(classifier_cli, capsys):
    """The starter trains SST at --batch_size and CFIMDB at 8 (its long reviews)."""
    classifier.main(classifier_cli("last-linear-layer"))  # --batch_size 4, both datasets
    out = capsys.readouterr().out
    assert "global batch 4 = 1 process x batch 4" in out.split("on cfimdb")[0]
    cfimdb = out.split("on cfimdb")[1]
    assert "global batch 8 = 1 process x batch 8" in cfimdb
    assert "cfimdb: batch 8 (--cfimdb_batch_size, as the starter), not --batch_size 4" in out
    settings = classifier.settings_from_args(classifier.get_args(["--batch_size", "64", "--cfimdb_batch_size", "2"]))
    assert classifier.dataset_settings(settings, "cfimdb", 2).data.batch_size == 2
    assert classifier.dataset_settings(settings, "sst", 2).data.batch_size == 64


@pytest.mark.parametrize("extra,epoch", [((), 2), (("--generate_from", "best"), 1)])
def test_sonnets_come_from_the_last_epoch_unless_asked(tmp_path, monkeypatch, capsys, extra, epoch):
    """Epoch 1 scores best (a stand-in evaluation): by default, as in the starter, the model
    saved and the sonnets written are still the last epoch's."""
    scores = iter([{"chrf": 50.0, "loss": 1.0}, {"chrf": 10.0, "loss": 2.0}])
    monkeypatch.setattr(tasks.sonnet, "evaluate_sonnets", lambda *a, **k: next(scores))
    argv = ["--model_size", "tiny", "--random_init", "--limit", "3", "--max_new_tokens", "4", "--max_length", "32",
            "--batch_size", "3", "--epochs", "2", "--lr", "1e-3", *sonnet_data_flags(tmp_path), *extra]
    result = sonnet_generation.main(argv)
    assert result["best"]["epoch"] == epoch
    run = tmp_path / "run"
    saved = torch.load(run / "sonnet-model.pt", weights_only=True)["model"]["wte.weight"]
    source = run / "last.pt" if epoch == 2 else run / "best-epoch1.pt"
    assert torch.equal(saved, torch.load(source, weights_only=True)["model"]["gpt.wte.weight"])
    if epoch == 2:
        assert "keeping the last epoch's weights (epoch 2)" in capsys.readouterr().out


HELP_ARGV = {
    "classifier": (classifier.main, ["--help"]),
    "paraphrase_detection": (paraphrase_detection.main, ["--help"]),
    "sonnet_generation": (sonnet_generation.main, ["--help"]),
    "generate": (generate.main, ["--help"]),
    "pretrain": (pretrain.main, ["--help"]),
    "prepare_submit": (prepare_submit.main, ["--help"]),
    "distillation kd": (distillation_main.main, ["kd", "--help"]),
    "distillation filter": (distillation_main.main, ["filter", "--help"]),
    "experiments sweep": (experiments_main.main, ["sweep", "--help"]),
}


def option_blocks(text: str) -> dict[str, str]:
    """Each option string of a --help text -> its block (its line and the indented ones after)."""
    blocks: dict[str, str] = {}
    current: list[str] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("  -") or not line.startswith("   "):
            if current:
                for opt in re.findall(r"(?:^|, )(--?[\w-]+)", current[0].strip()):
                    blocks[opt] = "\n".join(current)
            current = [line] if line.startswith("  -") else []
        elif current:
            current.append(line)
    return blocks


@pytest.mark.parametrize("name", sorted(HELP_ARGV))
def test_help_shows_every_default(name, monkeypatch, capsys):
    shown: list[argparse.ArgumentParser] = []
    original = argparse.ArgumentParser.print_help
    monkeypatch.setattr(argparse.ArgumentParser, "print_help",
                        lambda self, file=None: (shown.append(self), original(self, file))[1])
    main, argv = HELP_ARGV[name]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0 and shown
    blocks = option_blocks(capsys.readouterr().out)
    missing = [a.option_strings[0] for a in shown[-1]._actions
               if shows_default(a) and "default" not in blocks[a.option_strings[0]].lower()]
    assert not missing, f"{name} --help shows no default for {missing}"
    if name in ("classifier", "paraphrase_detection", "sonnet_generation"):
        assert re.search(r"--seed SEED\s+\(default: 11711\)", blocks["--seed"])
