"""The decoding-strategy table runs end to end on a tiny saved model (the measurement itself,
on the Shakespeare-pretrained model, is a benchmark, not a test)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import sonnet_decoding
from config import get_config
from methods.restore import save_model
from models.gpt2 import GPT2Model
from tests.conftest import SHARED_DATA


@pytest.fixture
def saved_model(tmp_path):
    torch.manual_seed(0)
    save_model(GPT2Model(get_config("tiny")), tmp_path / "sonnet-model.pt", task="sonnet")
    return tmp_path / "sonnet-model.pt"


def test_each_chosen_strategy_gets_a_row(saved_model, tmp_path, capsys):
    out = tmp_path / "rows.json"
    result = sonnet_decoding.main(["--model", str(saved_model), "--only", "greedy,mbr over beam,sample T=0.8",
                                   "--seeds", "2", "--limit", "2", "--max_new_tokens", "6",
                                   "--data", str(SHARED_DATA), "--json", str(out)])
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ["greedy", "greedy, no repeated 3-grams", "sample T=0.8 p=0.9",
                          "mbr over beam:4,sample:8,contrastive"]
    assert [len(r["runs"]) for r in rows.values()] == [1, 1, 2, 2]  # only what samples is repeated
    for r in rows.values():
        for run in r["runs"]:
            assert 0 <= run["chrf"] <= 100 and run["num_sonnets"] == 2 and run["seconds"] > 0
    assert json.loads(out.read_text())["table"] == result["table"]
    assert "| mbr over beam:4,sample:8,contrastive | 2 |" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [(["--only", "nucleus"], "names no strategy"),
                                            (["--seeds", "0"], "--seeds >= 1")])
def test_bad_flags_exit_2(saved_model, flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        sonnet_decoding.main(["--model", str(saved_model), *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err
