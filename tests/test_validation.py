"""Every bad flag, data file and checkpoint ends the command in one ``error: ...`` line with exit
status 2, before any training: no traceback, no epoch run first, no silently wrong model.

Each case runs a task's ``main`` through ``cli.common.run_main`` (what ``python script.py``
does) with otherwise valid arguments on a micro random model, so the only thing wrong is the
one named in the case.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import classifier
import paraphrase_detection
import pretrain
import sonnet_generation
from cli.common import run_main
from cli.validation import float_in, int_in, model_size_or_folder, name_list, probability
from distillation.__main__ import main as distillation_main
from tests.conftest import SHARED_DATA

MICRO = dict(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2)
OTHER = dict(vocab_size=50257, n_positions=64, n_embd=48, n_layer=3, n_head=4)  # another config
SST_HEADER = "\tid\tsentence\tsentiment\n"


def hf_folder(path: Path, cfg: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def classifier_args(tmp: Path, model: Path, *extra: str) -> list[str]:
    paths = []
    for split, suffix in (("train", "train"), ("dev", "dev"), ("test", "test-student")):
        for ds in ("sst", "cfimdb"):
            paths += [f"--{ds}_{split}", str(SHARED_DATA / f"ids-{ds}-{suffix}.csv")]
    return ["--dataset", "sst", "--model_size", str(model), "--random_init", "--limit", "8", "--epochs", "1",
            "--batch_size", "4", "--max_length", "32", "--no_progress", "--output_dir", str(tmp / "runs"),
            "--predictions_dir", str(tmp / "pred"), *paths, *extra]


def sonnet_args(tmp: Path, model: Path, *extra: str) -> list[str]:
    return ["--model_size", str(model), "--random_init", "--limit", "2", "--epochs", "1", "--max_length", "32",
            "--max_new_tokens", "4", "--batch_size", "2", "--no_progress",
            "--sonnet_path", str(SHARED_DATA / "sonnets.txt"),
            "--held_out_sonnet_path", str(SHARED_DATA / "sonnets_held_out.txt"),
            "--dev_held_out_sonnet_path", str(SHARED_DATA / "sonnets_held_out_dev.txt"),
            "--dev_true_sonnet_path", str(SHARED_DATA / "TRUE_sonnets_held_out_dev.txt"),
            "--sonnet_out", str(tmp / "pred" / "s.txt"), "--dev_sonnet_out", str(tmp / "pred" / "d.txt"),
            "--output_dir", str(tmp / "run"), *extra]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished last-linear-layer SST run on the micro model: ``runs/`` holds best.pt and last.pt."""
    tmp = tmp_path_factory.mktemp("trained")
    classifier.main(classifier_args(tmp, hf_folder(tmp / "micro", MICRO)))
    assert (tmp / "runs" / "best.pt").exists() and (tmp / "runs" / "last.pt").exists()
    return tmp


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def sst_file(tmp: Path, body: bytes) -> Path:
    return write(tmp / "train.csv", SST_HEADER.encode() + body)


def copy_run(trained: Path, tmp: Path) -> Path:
    """The trained run folder, copied so that a case cannot change the shared one."""
    return Path(shutil.copytree(trained / "runs", tmp / "runs"))


def sonnet_trainer_checkpoint(tmp: Path) -> Path:
    """A training-engine checkpoint of a SonnetGPT with the micro config."""
    from config import GPT2Config
    from models.gpt2 import GPT2Model
    from models.sonnet_gpt import SonnetGPT

    cfg = GPT2Config(vocab_size=50257, max_position_embeddings=64, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2)
    path = tmp / "best-epoch1.pt"
    torch.save({"model": SonnetGPT(GPT2Model(cfg)).state_dict(), "trainable_only": False, "epoch": 1,
                "train_config": {}, "model_config": cfg.to_dict(), "extra": {}}, path)
    return path


Case = Callable[[Path, Path], tuple[Callable[[list[str]], object], list[str], str]]

# case -> (tmp, trained run) -> (main, argv, regex the error line must match)
CASES: dict[str, Case] = {
    "--batch_size 0": lambda tmp, run: (classifier.main, classifier_args(tmp, run / "micro", "--batch_size", "0"),
                                        r"argument --batch_size: must be an integer >= 1, got 0"),
    "--lr -1": lambda tmp, run: (classifier.main, classifier_args(tmp, run / "micro", "--lr", "-1"),
                                 r"argument --lr: must be a number > 0, got -1"),
    "--grad_accum 0": lambda tmp, run: (classifier.main, classifier_args(tmp, run / "micro", "--grad_accum", "0"),
                                        r"argument --grad_accum: must be an integer >= 1, got 0"),
    "--limit -5": lambda tmp, run: (classifier.main, classifier_args(tmp, run / "micro", "--limit", "-5"),
                                    r"argument --limit: must be an integer >= 0, got -5"),
    "--model_size huge --random_init": lambda tmp, run: (
        classifier.main, classifier_args(tmp, run / "micro", "--model_size", "huge", "--random_init"),
        r"argument --model_size: 'huge' is neither a model size \(gpt2, gpt2-medium, gpt2-large, gpt2-xl, tiny\)"),
    "--top_p 1.5": lambda tmp, run: (sonnet_generation.main, sonnet_args(tmp, run / "micro", "--top_p", "1.5"),
                                     r"argument --top_p: must be a number > 0 and <= 1, got 1.5"),
    "--top_p 0": lambda tmp, run: (sonnet_generation.main, sonnet_args(tmp, run / "micro", "--top_p", "0"),
                                   r"argument --top_p: must be a number > 0 and <= 1, got 0"),
    "--temperature 0": lambda tmp, run: (sonnet_generation.main,
                                         sonnet_args(tmp, run / "micro", "--temperature", "0"),
                                         r"argument --temperature: must be a number > 0, got 0"),
    "--temperature -0.5": lambda tmp, run: (sonnet_generation.main,
                                            sonnet_args(tmp, run / "micro", "--temperature", "-0.5"),
                                            r"argument --temperature: must be a number > 0, got -0.5"),
    "--num_beams 0": lambda tmp, run: (sonnet_generation.main,
                                       sonnet_args(tmp, run / "micro", "--decoding", "beam", "--num_beams", "0"),
                                       r"argument --num_beams: must be an integer >= 1, got 0"),
    "contrastive --top_k 1": lambda tmp, run: (
        sonnet_generation.main, sonnet_args(tmp, run / "micro", "--decoding", "contrastive", "--top_k", "1"),
        r"--decoding contrastive needs --penalty_alpha > 0 and --top_k >= 2 \(got 0.6 and 1\)"),
    "header-only training file": lambda tmp, run: (
        classifier.main, classifier_args(tmp, run / "micro", "--sst_train", str(sst_file(tmp, b""))),
        rf"{re.escape(str(tmp / 'train.csv'))}:1: a header but no data rows"),
    "non-UTF-8 bytes": lambda tmp, run: (
        classifier.main, classifier_args(tmp, run / "micro", "--sst_train", str(sst_file(
            tmp, b"0\ta\tgood film\t4\n1\tb\tcaf\xe9 scene\t2\n"))),
        rf"{re.escape(str(tmp / 'train.csv'))}:3: not UTF-8 text \(byte 0xe9"),
    "SST label 7": lambda tmp, run: (
        classifier.main, classifier_args(tmp, run / "micro", "--sst_train", str(sst_file(
            tmp, b"0\ta\tgood film\t4\n1\tb\todd film\t7\n"))),
        rf"{re.escape(str(tmp / 'train.csv'))}:3: column 'sentiment': 7 is not one of \[0, 1, 2, 3, 4\]"),
    "CFIMDB label 2": lambda tmp, run: (
        classifier.main, classifier_args(tmp, run / "micro", "--dataset", "cfimdb", "--cfimdb_dev", str(sst_file(
            tmp, b"0\ta\tgood film\t1\n1\tb\tfine film\t2\n"))),
        rf"{re.escape(str(tmp / 'train.csv'))}:3: column 'sentiment': 2 is not one of \[0, 1\]"),
    "empty pretraining corpus": lambda tmp, run: (
        pretrain.main, ["--corpus", str(write(tmp / "empty.txt", b" \n")), "--model_size",
                        str(run / "micro"), "--random_init", "--output_dir", str(tmp / "pre"), "--no_progress"],
        rf"{re.escape(str(tmp / 'empty.txt'))}: the corpus is empty"),
    "non-UTF-8 sonnets": lambda tmp, run: (
        sonnet_generation.main, sonnet_args(tmp, run / "micro", "--sonnet_path", str(write(
            tmp / "sonnets.txt", b"Sonnets\n\n1\nFrom fairest creatures\n\n2\nWhen forty winters\xff\n"))),
        rf"{re.escape(str(tmp / 'sonnets.txt'))}:7: not UTF-8 text"),
    "--resume of another config": lambda tmp, run: (
        classifier.main, classifier_args(tmp, hf_folder(tmp / "other", OTHER), "--output_dir",
                                         str(copy_run(run, tmp)), "--resume"),
        r"last\.pt: --resume with settings that differ from the saved run's: model\.hidden_size 32 -> 48; "
        r"model\.intermediate_size 128 -> 192; model\.num_attention_heads 2 -> 4; model\.num_hidden_layers 2 -> 3"),
    "--resume of another fine-tune mode": lambda tmp, run: (
        classifier.main, classifier_args(tmp, run / "micro", "--fine-tune-mode", "lora", "--output_dir",
                                         str(copy_run(run, tmp)), "--resume"),
        r"last\.pt: --resume with settings that differ from the saved run's: "
        r"fine_tune_mode 'last-linear-layer' -> 'lora'"),
    "--resume of another fine-tune mode, changes allowed": lambda tmp, run: (
        classifier.main, classifier_args(tmp, run / "micro", "--fine-tune-mode", "lora", "--output_dir",
                                         str(copy_run(run, tmp)), "--resume", "--resume_allow_changes"),
        r"last\.pt was written by a run that trains other parameters .*only in this run \(\d+\): gpt\.h\.0\."),
    "--load of a Trainer checkpoint": lambda tmp, run: (
        paraphrase_detection.main,
        ["--load", str(run / "runs" / "best.pt"), "--epochs", "0", "--limit", "4", "--no_progress",
         *[x for s in ("train", "dev", "test") for x in (f"--para_{s}", str(SHARED_DATA / "quora-minbert-dev.csv"))],
         "--para_dev_out", str(tmp / "d.csv"), "--para_test_out", str(tmp / "t.csv"), "--output_dir", str(tmp / "p")],
        r"best\.pt is a training-engine checkpoint \(best\.pt, last\.pt\), not a model saved by a task script"),
    "kd: SST teacher, --dataset cfimdb": lambda tmp, run: (
        distillation_main,
        ["kd", "--teacher", str(run / "runs" / "best.pt"), "--dataset", "cfimdb", "--limit", "8", "--epochs", "1",
         "--train", str(SHARED_DATA / "ids-cfimdb-train.csv"), "--dev", str(SHARED_DATA / "ids-cfimdb-dev.csv"),
         "--no_progress", "--output_dir", str(tmp / "kd")],
        r"best\.pt: the teacher was trained on sst \(5 labels\) but --dataset cfimdb has 2"),
    "sonnet checkpoint of another config": lambda tmp, run: (
        sonnet_generation.main,
        sonnet_args(tmp, hf_folder(tmp / "other", OTHER), "--generate_only", "--checkpoint",
                    str(sonnet_trainer_checkpoint(tmp))),
        r"best-epoch1\.pt does not fit .*hidden_size: checkpoint 32 vs model 48, num_hidden_layers: checkpoint 2 vs "
        r"model 3, num_attention_heads: checkpoint 2 vs model 4, intermediate_size: checkpoint 128 vs model 192"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_error_line_and_status_2_before_any_work(case, tmp_path, trained, capsys):
    main, argv, want = CASES[case](tmp_path, trained)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: main(argv))
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2, err
    last = err.strip().splitlines()[-1]
    assert re.search(r"error: ", last) and re.search(want, last), last
    assert "Traceback" not in err
    assert not re.search(r"^epoch \d+:", out, re.M)  # nothing trained before the error


def test_argument_types_state_their_range():
    import argparse

    assert int_in(1)("3") == 3 and float_in(0.0, 1.0, high_open=True)("0") == 0.0
    assert probability("1") == 1.0 and model_size_or_folder("tiny") == "tiny" and name_list("a, b") == "a, b"
    for parse, text in ((int_in(0), "x"), (int_in(0), "1.5"), (float_in(0.0), "nan"), (float_in(0.0), "inf"),
                        (probability, "0"), (probability, "1.01"), (name_list, " , "),
                        (model_size_or_folder, "gpt3")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)
