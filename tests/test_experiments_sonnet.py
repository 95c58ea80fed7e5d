"""The experiment tools on the sonnet task, through the real CLI on a micro random GPT-2: seeds
summarise dev chrF, perplexity and form; a sweep selects on chrF by default."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

import experiments.__main__ as cli
from experiments import launch
from tests.conftest import MICRO, sonnet_data_flags


def sonnet_flags(tmp_path: Path) -> list[str]:
    """sonnet_generation.py flags of a quick run (2 sonnets, 1 epoch, 4 new tokens), without the ones
    the runner owns."""
    folder = tmp_path / "micro"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(MICRO))
    argv = sonnet_data_flags(tmp_path)
    for flag in ("--output_dir", "--sonnet_out", "--dev_sonnet_out"):
        i = argv.index(flag)
        del argv[i:i + 2]
    return ["--model_size", str(folder), "--random_init", "--limit", "2", "--epochs", "1", "--batch_size", "2",
            "--max_new_tokens", "4", "--max_length", "48", *argv]


def test_seeds_on_sonnets_summarise_chrf_perplexity_and_form(tmp_path, capsys):
    out = tmp_path / "exp"
    cli.main(["seeds", "--task", "sonnet", "--seeds", "1,2", "--out", str(out), "--", *sonnet_flags(tmp_path)])
    rows = {r["metric"]: r for r in csv.DictReader(open(out / "summary.csv"))}
    for name in ("dev/chrf", "dev/perplexity", "dev/loss", "dev/form_mean_lines"):
        assert name in rows and rows[name]["n"] == "2", sorted(rows)
    for s in (1, 2):
        run = out / f"seed-{s}"
        best = launch.best_epoch(run / "metrics.jsonl", "chrf")
        assert float(rows["dev/chrf"][f"seed {s}"]) == pytest.approx(best["chrf"])
        assert (run / "predictions" / "generated_sonnets_dev.txt").exists()
        assert (run / "sonnet-model.pt").exists()
    assert not (tmp_path / "pred").exists()  # the runner's prediction paths, never the task's defaults


def test_sweep_on_sonnets_selects_on_dev_chrf(tmp_path, capsys):
    out = tmp_path / "sweep"
    cli.main(["sweep", "--task", "sonnet", "--out", str(out), "--n_trials", "2", "--sampler_seed", "0",
              "--pruner", "none", "--space", "lr=loguniform:1e-5:1e-3", "--", *sonnet_flags(tmp_path)])
    rows = list(csv.DictReader(open(out / "trials.csv")))
    assert [r["state"] for r in rows] == ["COMPLETE", "COMPLETE"]
    for r in rows:
        best = launch.best_epoch(Path(r["run folder"]) / "metrics.jsonl", "chrf")
        assert float(r["value"]) == pytest.approx(best["chrf"])


def test_sonnet_runner_flags_are_refused_in_the_task_flags(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["seeds", "--task", "sonnet", "--seeds", "1", "--out", str(tmp_path / "x"), "--",
                  "--sonnet_out", "mine.txt"])
    assert e.value.code == 2 and "--sonnet_out: set by the runner" in capsys.readouterr().err
