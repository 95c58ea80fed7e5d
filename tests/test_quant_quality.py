"""``benchmarks/quant_quality.py`` runs end to end on a tiny saved model (its numbers on random
weights mean nothing; only that every measurement is produced) and refuses a missing model."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from config import get_config
from methods.restore import save_model
from models.gpt2 import GPT2Model

ROOT = Path(__file__).resolve().parent.parent


def quant_quality():
    spec = importlib.util.spec_from_file_location("quant_quality", ROOT / "benchmarks" / "quant_quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quality_script_measures_every_representation(tmp_path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "model.pt"
    save_model(GPT2Model(get_config("tiny")), path)
    data = ROOT / "data"
    res = quant_quality().main(["--model", str(path), "--limit", "2", "--new_tokens", "6", "--chrf_tokens", "8",
                                "--block_size", "16", "--max_blocks", "2", "--text", str(data / "sonnets.txt"),
                                "--prompts", str(data / "sonnets_held_out_dev.txt"),
                                "--references", str(data / "TRUE_sonnets_held_out_dev.txt"),
                                "--json", str(tmp_path / "q.json")])
    assert set(res) == {"float32", "bf16", "int8", "int4"}
    for r in res.values():
        assert 0 <= r["agreement"] <= 1 and 0 <= r["forced_agreement"] <= 1
        assert math.isfinite(r["perplexity"]) and r["perplexity"] > 1 and r["chrf"] >= 0
    assert res["float32"]["forced_agreement"] == 1.0 and (tmp_path / "q.json").exists()


def test_quality_script_refuses_a_missing_model(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        quant_quality().main(["--model", str(tmp_path / "nope.pt")])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: ")
