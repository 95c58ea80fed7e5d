"""Ensembles of sonnet models through ``python -m experiments ensemble``: every model samples, the
pooled candidates are judged by MBR on chrF; an ensemble of one model sampling once is that model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

import experiments.__main__ as cli
import sonnet_generation
from decoding.mbr import chrf_utility, mbr_select
from errors import CheckpointError
from experiments import sonnet_ensemble
from experiments.ensemble import run_flags
from tasks.course_data import read_sonnets
from tests.conftest import MICRO, sonnet_data_flags


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[Path]:
    """Two micro sonnet models trained (2 sonnets, 1 epoch) under two seeds."""
    root = tmp_path_factory.mktemp("sonnet-ensemble")
    (root / "micro").mkdir()
    (root / "micro" / "config.json").write_text(json.dumps(MICRO))
    paths = []
    for seed in (1, 2):
        run = root / f"m{seed}"
        sonnet_generation.main(["--model_size", str(root / "micro"), "--random_init", "--limit", "2", "--epochs", "1",
                                "--max_new_tokens", "6", "--max_length", "48", "--seed", str(seed),
                                *sonnet_data_flags(run)])
        paths.append(run / "run" / "sonnet-model.pt")
    return paths


def test_the_ensemble_keeps_the_mbr_choice_among_every_models_samples(models, tmp_path, capsys):
    out = tmp_path / "ens"
    result = cli.main(["ensemble", *map(str, models), "--out", str(out), "--samples", "2", "--seed", "5"])
    flags = run_flags(models[0].parent)
    prompts = [s.text for s in read_sonnets(flags["dev_held_out_sonnet_path"], 2)]
    per_model = sonnet_ensemble.member_samples(models, {"dev": prompts}, 2, flags, batch_size=12, seed=5,
                                               device="cpu")["dev"]
    for j, chosen in enumerate(result["dev"]):
        pool = [t for m in per_model for t in m[j]]
        assert len(pool) == 4 and chosen == pool[mbr_select(pool, chrf_utility)]
    assert [s.text for s in read_sonnets(out / "predictions" / "generated_sonnets_dev.txt")] == result["dev"]
    assert len(read_sonnets(out / "predictions" / "generated_sonnets.txt")) == 2
    rows = list(csv.DictReader(open(out / "ensemble.csv")))
    assert [r["model"] for r in rows[:2]] == list(map(str, models)) and "MBR over 2 models" in rows[2]["model"]
    assert float(rows[2]["dev chrF"]) == pytest.approx(result["dev_chrf"])


def test_an_ensemble_of_one_sampling_once_is_that_model(models, tmp_path, capsys):
    result = cli.main(["ensemble", str(models[0]), "--out", str(tmp_path / "one"), "--samples", "1", "--seed", "3"])
    flags = run_flags(models[0].parent)
    prompts = [s.text for s in read_sonnets(flags["dev_held_out_sonnet_path"], 2)]
    alone = sonnet_ensemble.member_samples(models[:1], {"dev": prompts}, 1, flags, batch_size=12, seed=3,
                                           device="cpu")["dev"]
    assert result["dev"] == [c[0] for c in alone[0]]
    assert result["members"][0]["dev chrF"] == pytest.approx(result["dev_chrf"])


def test_a_sonnet_model_and_another_file_are_refused(models, tmp_path, capsys):
    other = tmp_path / "other.pt"
    other.write_bytes(models[0].parent.joinpath("last.pt").read_bytes())
    with pytest.raises(CheckpointError, match=r"other.pt: neither .* nor a sonnet model file \(sonnet-model.pt\)"):
        cli.main(["ensemble", str(models[0]), str(other), "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_members_are_restored_once_and_sample_with_every_sampling_flag_of_the_run(models, tmp_path, monkeypatch,
                                                                                 capsys):
    """Each model is restored once for both splits, and samples as its run's ``--decoding sample`` did:
    a run with ``--repetition_penalty`` or ``--no_repeat_ngram_size`` gives other candidates."""
    restored = []
    real = sonnet_ensemble.restore_task_model
    monkeypatch.setattr(sonnet_ensemble, "restore_task_model", lambda *a, **k: restored.append(a[0]) or real(*a, **k))
    result = cli.main(["ensemble", *map(str, models), "--out", str(tmp_path / "ens"), "--samples", "1"])
    assert restored == list(map(str, models)) and len(result["dev"]) == len(result["test"]) == 2
    flags = run_flags(models[0].parent)
    prompts = {"dev": [s.text for s in read_sonnets(flags["dev_held_out_sonnet_path"], 2)]}
    cold = {**flags, "temperature": 0.01}  # nearly greedy: the random model repeats its likeliest tokens
    penalised = {**cold, "repetition_penalty": 100.0, "no_repeat_ngram_size": 1}
    config = sonnet_ensemble.sampling(penalised).config
    assert (config.repetition_penalty, config.no_repeat_ngram_size) == (100.0, 1)
    samples = [sonnet_ensemble.member_samples(models, prompts, 1, f, batch_size=12, seed=5, device="cpu")
               for f in (cold, penalised)]
    assert samples[0] != samples[1]
