"""Sweeps on a micro random GPT-2: interrupted after one trial and resumed to three (the
interrupted trial rerun from its last.pt), pruning on the dev metric, bad spaces refused."""

from __future__ import annotations

import csv
import json

import optuna
import pytest

import experiments.__main__ as cli
from engine import tracking
from experiments import space
from tests.test_experiments import InterruptAt, task_flags


def sweep_argv(tmp_path, *extra: str, epochs: int = 2) -> list[str]:
    """A sweep of lr and batch size (so the task flags lose their --batch_size) on quick SST runs."""
    flags = task_flags(tmp_path, "--epochs", str(epochs))
    i = flags.index("--batch_size")
    return ["sweep", "--task", "classifier", "--out", str(tmp_path / "sweep"), "--sampler_seed", "0",
            "--space", "lr=loguniform:1e-4:1e-2", "--space", "batch_size=choice:2,4", *extra,
            "--", *flags[:i], *flags[i + 2:]]


def load(tmp_path) -> optuna.Study:
    return optuna.load_study(study_name="sweep", storage=f"sqlite:///{tmp_path / 'sweep' / 'study.db'}")


def test_sweep_interrupted_after_one_trial_resumes_to_three(tmp_path, capsys):
    argv = sweep_argv(tmp_path, "--n_trials", "3", "--pruner", "none")
    # Trial 0 sees epochs 1-2; Ctrl-C at trial 1's second epoch (its epoch-1 last.pt is on disk).
    with tracking.attach(InterruptAt(4)), pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 130
    study = load(tmp_path)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL"]
    interrupted = study.trials[1].params
    capsys.readouterr()

    cli.main(argv)  # the same command again
    log = capsys.readouterr().out
    assert "queued again with the same values, resuming trial-1" in log
    assert "resumed from" in log and "epoch 1, step" in log
    study = load(tmp_path)
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert study.trials[2].params == interrupted and study.trials[2].user_attrs["origin"] == 1
    for t in study.trials:
        if t.state.name == "COMPLETE":  # the value is the best dev accuracy of the trial's own log
            folder = tmp_path / "sweep" / f"trial-{t.user_attrs['origin']}"
            accs = [json.loads(x)["dev"]["accuracy"] for x in (folder / "metrics.jsonl").read_text().splitlines()
                    if json.loads(x)["type"] == "epoch"]
            assert len(accs) == 2 and t.value == max(accs)
    with open(tmp_path / "sweep" / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["state"] for r in rows] == states and {"lr", "batch_size", "value"} <= set(rows[0])
    for png in ("optimization_history.png", "param_importances.png"):
        assert (tmp_path / "sweep" / png).read_bytes()[:4] == b"\x89PNG"

    cli.main(argv)  # finished: nothing more runs
    assert "3 of 3 trials finished earlier" in capsys.readouterr().out
    assert len(load(tmp_path).trials) == 4


def test_pruned_trials_stop_at_the_first_epoch_and_count(tmp_path, capsys):
    argv = sweep_argv(tmp_path, "--n_trials", "2", "--pruner", "threshold:1.01")  # no accuracy reaches 1.01
    cli.main(argv)
    study = load(tmp_path)
    assert [t.state.name for t in study.trials] == ["PRUNED", "PRUNED"]
    for t in study.trials:
        assert list(t.intermediate_values) == [1]
        epochs = [json.loads(x) for x in (tmp_path / "sweep" / f"trial-{t.number}" / "metrics.jsonl")
                  .read_text().splitlines() if json.loads(x)["type"] == "epoch"]
        assert [e["epoch"] for e in epochs] == [1]  # the second epoch never ran
        assert not (tmp_path / "sweep" / f"trial-{t.number}" / "run.lock").exists()  # released cleanly
    assert "| PRUNED |" in (tmp_path / "sweep" / "trials.md").read_text()


@pytest.mark.parametrize("spec,message", [
    ("lr=loguniform:1e-3", "loguniform needs low:high"),
    ("lr=loguniform:0:1", "log scale needs low > 0"),
    ("lr=gaussian:0:1", "unknown kind 'gaussian'"),
    ("lr", "expected name=kind:args"),
    ("batch_size=choice:", "choice needs values"),
    ("lr=uniform:1:0.5", "low must be below high"),
    ("lora_r=int:1.5:8", "integer bounds"),
])
def test_bad_space_spec_exits_2_before_any_trial(spec, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["sweep", "--task", "classifier", "--out", str(tmp_path / "s"), "--space", spec,
                  "--", "--dataset", "sst"])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("content,suffix,message", [
    ('{"lr": "loguniform:1e-5:1e-3", "batch_size": [8, 16]}', ".json", None),
    ("lr: loguniform:1e-5:1e-3\nbatch_size: [8, 16]\n", ".yaml", None),
    ('{"lr": "loguniform:-1:1"}', ".json", "space.json: lr: a log scale needs low > 0"),
    ("[1, 2]", ".yaml", "space.yaml: expected a mapping"),
    ("{", ".json", "space.json: not valid JSON"),
])
def test_space_file(content, suffix, message, tmp_path):
    path = tmp_path / f"space{suffix}"
    path.write_text(content)
    if message is None:
        params = space.read_space_file(path)
        assert [p.spec() for p in params] == ["lr=loguniform:1e-05:0.001", "batch_size=choice:8,16"]
        assert params[1].choices == (8, 16)
    else:
        with pytest.raises(space.SpaceError, match=message):
            space.read_space_file(path)


@pytest.mark.parametrize("extra,task_flags_,message", [
    (["--space", "lr=uniform:0:1", "--space", "lr=uniform:0:2"], ["--dataset", "sst"], "lr is given twice"),
    (["--space", "lr=uniform:0.1:1"], ["--dataset", "sst", "--lr", "0.1"], "--lr: set by the runner"),
    (["--space", "lr=uniform:0.1:1"], [], "a sweep optimises one dataset"),
    ([], ["--dataset", "sst"], "an empty search space"),
])
def test_bad_sweep_setup_is_one_error_line(extra, task_flags_, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.run_main(lambda: cli.main(["sweep", "--task", "classifier", "--out", str(tmp_path / "s"), *extra,
                                       "--", *task_flags_]))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_a_study_of_other_settings_is_refused(tmp_path, capsys):
    argv = sweep_argv(tmp_path, "--n_trials", "1", "--pruner", "none", epochs=1)
    cli.main(argv)
    other = [a if a != "lr=loguniform:1e-4:1e-2" else "lr=loguniform:1e-5:1e-2" for a in argv]
    with pytest.raises(SystemExit) as e:
        cli.main(other)
    assert e.value.code == 2 and "was run with other settings (space:" in capsys.readouterr().err


def test_task_flags_the_task_refuses_end_the_sweep_with_its_status_and_a_failed_trial(tmp_path, capsys):
    argv = sweep_argv(tmp_path, "--n_trials", "2", epochs=1) + ["--report_to", "mlflow"]
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --report_to: must be one of none, tensorboard, wandb" in err
    assert [t.state.name for t in load(tmp_path).trials] == ["FAIL"]  # not left RUNNING forever


def test_a_failed_or_stale_trial_is_queued_again_once_with_its_values_and_folder():
    from experiments.sweep import requeue

    study = optuna.create_study()
    trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-5, 1e-3, log=True)})
    trial.set_user_attr("origin", trial.number)
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    failed = study.trials[0]
    requeue(study, failed)
    requeue(study, failed)  # a second process (or the heartbeat check) finds it queued already
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert len(waiting) == 1
    assert waiting[0].system_attrs["fixed_params"] == failed.params and waiting[0].user_attrs["origin"] == 0
