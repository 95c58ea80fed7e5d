"""``python -m experiments quantize``: a saved classifier or paraphrase run evaluated with its body
quantised as ``generate.py --quantize`` does; the predictions equal those of the float model with
its weights rounded by hand, ``--quantize none`` writes the run's own prediction files, and the
before/after line is printed."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import classifier
import paraphrase_detection
from cli.common import run_main
from decoding.quant import dequantize_int8, quantize_int8
from experiments.__main__ import main as experiments_main
from experiments.ensemble import load_members, probabilities, read_split
from experiments.launch import ExperimentError
from experiments.quantize import quantized_copy, run_quantized
from tests.conftest import MICRO, classifier_cli_args

LINE = re.compile(r"dev accuracy \d\.\d{3} float32 -> \d\.\d{3} int8 \([+-]\d\.\d{3}\)")


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("cls")
    classifier.main(classifier_cli_args(tmp, "full-model", "--dataset", "sst"))
    return tmp / "runs"


@pytest.fixture(scope="module")
def paraphrase_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("para")
    (tmp / "micro").mkdir()
    (tmp / "micro" / "config.json").write_text(json.dumps(MICRO))
    out = tmp / "run"
    paraphrase_detection.main(["--model_size", str(tmp / "micro"), "--random_init", "--limit", "8", "--epochs", "1",
                               "--max_length", "64", "--no_progress", "--output_dir", str(out)])
    return out


def rounded_by_hand(model: nn.Module) -> nn.Module:
    """A float copy whose block linears and tied embedding hold int8-rounded weights (per row)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for m in [*model.gpt.h.modules(), model.gpt.wte]:
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.copy_(dequantize_int8(*quantize_int8(m.weight)))
    return model


@pytest.mark.parametrize("task", ["classifier", "paraphrase"])
def test_int8_predictions_equal_the_hand_rounded_model(task, classifier_run, paraphrase_run):
    checkpoint = classifier_run / "best.pt" if task == "classifier" else paraphrase_run / "paraphrase-model.pt"
    (member,) = load_members([checkpoint], torch.device("cpu"))
    rows = read_split(member, "dev", None)
    fast = probabilities(copy.copy(member), rows, 4, "dev")
    member_q = copy.copy(member)
    member_q.model = quantized_copy(member.model, "int8")
    member_h = copy.copy(member)
    member_h.model = rounded_by_hand(member.model)
    got, want = probabilities(member_q, rows, 4, "dev"), probabilities(member_h, rows, 4, "dev")
    # PyTorch's int8 kernel (up to 64 rows a product) rounds the activations to bfloat16 (decoding.quant)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert not torch.equal(got, fast)  # the rounding shows: the float model is left as it was
    torch.testing.assert_close(probabilities(member, rows, 4, "dev"), fast)


def test_int8_run_prints_and_records_accuracy_before_and_after(classifier_run, tmp_path, capsys):
    result = run_quantized(classifier_run / "best.pt", tmp_path, "int8", batch_size=4)
    assert LINE.search(capsys.readouterr().out)
    record = json.loads((tmp_path / "quantize.json").read_text())
    assert set(record["dev"]) == {"float32", "int8"} and record["quantize"] == "int8"
    (member,) = load_members([classifier_run / "best.pt"], torch.device("cpu"))
    member.model = rounded_by_hand(member.model)
    rows = read_split(member, "dev", None)
    by_hand = probabilities(member, rows, 4, "dev").argmax(-1)
    accuracy = (by_hand == torch.tensor([r.label for r in rows])).float().mean().item()
    assert record["dev"]["int8"]["accuracy"] == pytest.approx(accuracy)
    for split in ("dev", "test"):
        lines = Path(result["predictions"][split]).read_text().splitlines()
        assert Path(result["predictions"][split]).name == f"full-model-sst-{split}-out.csv"
        assert len(lines) == 1 + 8  # the header, then the run's --limit 8 rows
    assert (tmp_path / "quantize.md").exists()


@pytest.mark.parametrize("task", ["classifier", "paraphrase"])
def test_quantize_none_writes_the_runs_own_prediction_files(task, classifier_run, paraphrase_run, tmp_path):
    if task == "classifier":
        checkpoint, theirs = classifier_run / "best.pt", classifier_run / "predictions"
    else:
        checkpoint, theirs = paraphrase_run / "paraphrase-model.pt", paraphrase_run / "predictions"
    result = run_quantized(checkpoint, tmp_path, "none", batch_size=4)
    for split in ("dev", "test"):
        ours = Path(result["predictions"][split])
        assert ours.read_bytes() == (theirs / ours.name).read_bytes()
    assert result["dev"]["none"] == result["dev"]["float32"]


def test_command_line(classifier_run, tmp_path, capsys):
    experiments_main(["quantize", str(classifier_run / "best.pt"), "--quantize", "int8", "--out", str(tmp_path)])
    assert LINE.search(capsys.readouterr().out)
    with pytest.raises(SystemExit) as e:
        experiments_main(["quantize", str(classifier_run / "best.pt"), "--out", str(tmp_path), "--compile_decode"])
    assert e.value.code == 2


def test_int4_off_the_cpu_is_refused_before_the_checkpoint_loads(tmp_path, capsys):
    device = "cuda" if torch.cuda.is_available() else "meta"  # any device but the CPU
    with pytest.raises(SystemExit) as e:
        run_main(lambda: experiments_main(["quantize", str(tmp_path / "no-such.pt"), "--quantize", "int4",
                                           "--device", device, "--out", str(tmp_path / "q")]))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: --quantize int4: int4 weight-only")


def test_flags_that_change_nothing_are_refused(paraphrase_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        experiments_main(["quantize", str(tmp_path / "no-such.pt"), "--quantize", "int8", "--calibration", "x.txt",
                          "--out", str(tmp_path)])
    assert e.value.code == 2 and "--calibration calibrates GPTQ only" in capsys.readouterr().err
    with pytest.raises(ExperimentError, match="--prefix names sentiment prediction files"):
        run_quantized(paraphrase_run / "paraphrase-model.pt", tmp_path, "none", prefix="mine")
