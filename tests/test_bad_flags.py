"""Flags that cannot work end the command in one ``error: ...`` line with exit status 2, before any
work (issue 26): lengths the model's context cannot hold, a seed numpy refuses, LoRA targets that
match nothing, an ``--output`` that is a folder, a device the machine lacks, a malformed JSON-lines
file. Each case runs a script's ``main`` through ``cli.common.run_main``, as ``python script.py``
does, on a micro random model (64 positions) with otherwise valid flags.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import classifier
import generate
import paraphrase_detection
import pretrain
import sonnet_generation
from cli.common import run_main
from config import GPT2Config
from distillation.__main__ import main as distillation_main
from methods.restore import save_model
from models.gpt2 import GPT2Model
from tests.conftest import SHARED_DATA
from tests.test_validation import MICRO, classifier_args, hf_folder, sonnet_args, write

CONTEXT = MICRO["n_positions"]


def micro_model_file(tmp: Path) -> Path:
    """A model file as a task saves it (``save_model``), for ``generate.py``."""
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50257, max_position_embeddings=CONTEXT, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2)
    path = tmp / "model.pt"
    save_model(GPT2Model(cfg), path, task="test")
    return path


def paraphrase_args(tmp: Path, model: Path, *extra: str) -> list[str]:
    files = [x for s in ("train", "dev", "test") for x in (f"--para_{s}", str(SHARED_DATA / "quora-minbert-dev.csv"))]
    return ["--model_size", str(model), "--random_init", "--limit", "4", "--epochs", "1", "--batch_size", "2",
            "--no_progress", *files, "--para_dev_out", str(tmp / "d.csv"), "--para_test_out", str(tmp / "t.csv"),
            "--output_dir", str(tmp / "run"), *extra]


def generate_args(tmp: Path, *extra: str) -> list[str]:
    return ["--model", str(micro_model_file(tmp)), "--prompt", "Shall I compare thee", "--device", "cpu", *extra]


def gibberish_generations(tmp: Path) -> Path:
    return write(tmp / "gen.jsonl", b'{"id": "a", "continuations": ["x", "y"]}\n{"id": "b", "contin\n{"id": "c"}\n')


Case = Callable[[Path, Path], tuple[Callable[[list[str]], object], list[str], str]]

# case -> (tmp, micro model folder) -> (main, argv, the error line, exactly)
CASES: dict[str, Case] = {
    "sonnet --max_new_tokens = context": lambda tmp, m: (
        sonnet_generation.main, sonnet_args(tmp, m, "--max_new_tokens", str(CONTEXT)),
        f"error: --max_new_tokens {CONTEXT} leaves no room for the prompt in the model's context of {CONTEXT} "
        f"positions; use at most {CONTEXT - 1}"),
    "sonnet --max_new_tokens 100000000": lambda tmp, m: (
        sonnet_generation.main, sonnet_args(tmp, m, "--max_new_tokens", "100000000"),
        f"error: --max_new_tokens 100000000 leaves no room for the prompt in the model's context of {CONTEXT} "
        f"positions; use at most {CONTEXT - 1}"),
    "generate.py --max_new_tokens > context": lambda tmp, m: (
        generate.main, generate_args(tmp, "--max_new_tokens", str(CONTEXT + 12)),
        f"error: --max_new_tokens {CONTEXT + 12} leaves no room for the prompt in the model's context of {CONTEXT} "
        f"positions; use at most {CONTEXT - 1}"),
    "sonnet --max_length > context": lambda tmp, m: (
        sonnet_generation.main, sonnet_args(tmp, m, "--max_length", str(CONTEXT + 1)),
        f"error: --max_length {CONTEXT + 1} is longer than the model's context of {CONTEXT} positions; use at "
        f"most {CONTEXT} (0: the context)"),
    "paraphrase --max_length too small for the prompt": lambda tmp, m: (
        paraphrase_detection.main, paraphrase_args(tmp, m, "--max_length", "10"),
        "error: --max_length 10 leaves no room for the questions: the paraphrase prompt around them takes 21 "
        "tokens; use at least 22 (0: the context)"),
    "--lora_targets matching nothing": lambda tmp, m: (
        sonnet_generation.main, sonnet_args(tmp, m, "--fine-tune-mode", "lora", "--lora_targets", "attn.q_proj"),
        "error: no nn.Linear matches --lora_targets attn.q_proj; the model's linear layers: attn.c_attn, "
        "attn.c_proj, mlp.c_fc, mlp.c_proj"),
    "generate.py --output a folder": lambda tmp, m: (
        generate.main, generate_args(tmp, "--max_new_tokens", "2", "--output", str(tmp), "--overwrite"),
        f"error: --output {tmp} is a directory; name a file, e.g. {tmp / 'out.jsonl'}"),
    "distillation filter, a malformed JSON line": lambda tmp, m: (
        distillation_main, ["filter", "--generations", str(gibberish_generations(tmp)), "--output",
                            str(tmp / "pairs.jsonl"), "--model_size", str(m), "--random_init"],
        f"error: {tmp / 'gen.jsonl'}:2: invalid JSON (Unterminated string starting at: column 13)"),
}


@pytest.fixture
def micro(tmp_path) -> Path:
    return hf_folder(tmp_path / "micro", MICRO)


def run_cli(main: Callable[[list[str]], object], argv: list[str], capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_main(lambda: main(argv))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


@pytest.mark.parametrize("case", list(CASES))
def test_a_flag_the_model_or_file_cannot_take_is_one_error_line_and_status_2(case, tmp_path, micro, capsys):
    main, argv, want = CASES[case](tmp_path, micro)
    code, out, err = run_cli(main, argv, capsys)
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert last == want or (last.endswith(": " + want) and "usage:" in err), err  # run_main's or argparse's line
    assert "Traceback" not in err
    assert not re.search(r"^epoch \d+:", out, re.M)  # nothing trained before the error
    assert not [*tmp_path.glob("pred/*"), *tmp_path.glob("*.csv")]  # nothing predicted


@pytest.mark.parametrize("main, args", [(classifier.main, classifier_args), (sonnet_generation.main, sonnet_args)])
def test_a_seed_numpy_refuses_is_a_parse_error_and_claims_no_run_folder(main, args, tmp_path, micro, capsys):
    argv = args(tmp_path, micro, "--seed", str(2**32))
    code, _, err = run_cli(main, argv, capsys)
    assert code == 2, err
    assert err.strip().splitlines()[-1].endswith(
        "error: argument --seed: must be an integer from 0 to 4294967295 (2**32 - 1), got 4294967296"), err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "run").exists()
    code, _, err = run_cli(generate.main, generate_args(tmp_path, "--seed", "-1"), capsys)
    assert code == 2 and err.strip().endswith("got -1"), err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("flags, want", [
    (["--device", "cuda"], "error: --device cuda was given but CUDA is not available"),
    (["--use_gpu"], "error: --use_gpu was given but CUDA is not available; drop the flag to run on the CPU"),
])
def test_a_missing_gpu_is_status_2_and_claims_no_run_folder(flags, want, tmp_path, micro, capsys):
    code, _, err = run_cli(classifier.main, classifier_args(tmp_path, micro, *flags), capsys)
    assert code == 2, err
    assert err.strip().splitlines()[-1] == want
    assert not (tmp_path / "runs").exists()  # the next plain --resume still finds the earlier run


def test_pretraining_with_nothing_held_out_says_so(tmp_path, micro, capsys):
    """A one-line corpus makes one block, so nothing is held out and no epoch is scored: no "best
    held-out {'epoch': 1}"."""
    corpus = write(tmp_path / "one.txt", b"Shall I compare thee to a summer's day?\n")
    pretrain.main(["--corpus", str(corpus), "--model_size", str(micro), "--random_init", "--epochs", "1",
                   "--output_dir", str(tmp_path / "pre"), "--no_progress"])
    out = capsys.readouterr().out
    assert "best held-out" not in out
    assert (f"no held-out text (the corpus fills one block, or --held_out_fraction is 0), so no epoch was scored; "
            f"the last epoch's weights in {tmp_path / 'pre' / 'model.pt'}") in out
