"""The training objectives through the real command lines (classifier.py, paraphrase_detection.py)
on a micro random GPT-2: off by default and then bit-identical to the plain loss, each flag
switching its term on, SMART's momentum teacher updated by the Trainer, supervised SimCSE on
paraphrase pairs, and ``--pooling mean`` in the classifier head (padding-correct, saved with the
weights, rebuilt by ``--load`` and by the KD teacher loader)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import classifier
import paraphrase_detection as para
import tasks.paraphrase
import tasks.sentiment
from config import GPT2Config
from distillation.kd import same_task
from engine.checkpoints import load_checkpoint
from methods.objectives import combined
from models.gpt2 import GPT2Model
from models.heads import GPT2SentimentClassifier
from models.loading import SHARED_TOKENIZER
from tasks.common import PlainLoss
from tasks.restore import restore_task_model

ROOT = Path(classifier.__file__).resolve().parent
OFF = ["--pooling", "last", "--rdrop_alpha", "0", "--contrastive_weight", "0", "--smart_weight", "0",
       "--smart_proximal_weight", "0"]


def spy_fit(monkeypatch, module) -> list[dict[str, Any]]:
    """Record what each ``fit_task`` call of a task module receives (with the model's weights before
    training), then train as usual."""
    calls: list[dict[str, Any]] = []
    real = module.fit_task

    def spy(model, loss_fn, *args, **kwargs):
        calls.append({"model": model, "objective": loss_fn, "callbacks": list(kwargs.get("callbacks", ())),
                      "before": {k: v.detach().clone() for k, v in model.named_parameters()}})
        return real(model, loss_fn, *args, **kwargs)

    monkeypatch.setattr(module, "fit_task", spy)
    return calls


def epoch_losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in records if r["type"] == "epoch"]


def sst(classifier_cli, *extra: str) -> list[str]:
    return classifier_cli("full-model", "--dataset", "sst", "--lr", "1e-3", *extra)


def test_defaults_are_bit_identical_to_passing_them(tmp_path, classifier_cli):
    plain = classifier.main(sst(classifier_cli))
    (tmp_path / "pred").rename(tmp_path / "pred-plain")
    (tmp_path / "runs").rename(tmp_path / "runs-plain")
    explicit = classifier.main(sst(classifier_cli, *OFF))
    assert plain == explicit
    for split in ("dev", "test"):
        name = f"full-model-sst-{split}-out.csv"
        assert (tmp_path / "pred-plain" / name).read_bytes() == (tmp_path / "pred" / name).read_bytes()
    assert epoch_losses(tmp_path / "runs-plain") == epoch_losses(tmp_path / "runs")


@pytest.mark.parametrize("flags, term", [
    (["--rdrop_alpha", "1"], "rdrop"),
    (["--contrastive_weight", "1"], "contrastive"),
    (["--smart_weight", "1", "--smart_epsilon", "0.01"], "smart"),
])
def test_each_objective_flag_adds_its_term_to_the_loss(tmp_path, monkeypatch, classifier_cli, flags, term):
    calls = spy_fit(monkeypatch, tasks.sentiment)
    classifier.main(sst(classifier_cli))
    (tmp_path / "runs").rename(tmp_path / "runs-plain")
    classifier.main(sst(classifier_cli, *flags))
    plain, regularised = calls[0]["objective"], calls[1]["objective"]
    assert isinstance(plain, PlainLoss)  # every term is off without its flag: the plain loss trains
    assert set(regularised.last_terms) == {"task", term}
    assert regularised.last_terms[term].item() > 0  # dropout 0.3 in the head: two passes differ
    assert epoch_losses(tmp_path / "runs") != epoch_losses(tmp_path / "runs-plain")
    # only the proximal term (its teacher) and SimCSE (the strategy's gather) need the Trainer's help
    assert calls[1]["callbacks"] == ([regularised] if term == "contrastive" else [])


def test_smart_proximal_teacher_follows_the_model_in_a_real_run(monkeypatch, classifier_cli):
    calls = spy_fit(monkeypatch, tasks.sentiment)
    classifier.main(sst(classifier_cli, "--smart_proximal_weight", "1", "--smart_momentum", "0.5"))
    call = calls[0]
    objective = call["objective"]
    assert call["callbacks"] == [objective] and set(objective.last_terms) == {"task", "proximal"}
    # The Trainer's on_step_end moved theta~ away from the start, toward the trained weights.
    name = "classifier.weight"
    start, teacher, final = call["before"][name], objective.teacher.params[name], call["model"].classifier.weight
    assert not torch.equal(teacher, start) and not torch.equal(teacher, final.detach())
    assert (teacher - final).norm() < (start - final).norm()


@pytest.mark.parametrize("flags, loaded", [([], False), (["--rdrop_alpha", "1"], True)])
def test_the_objectives_load_only_when_one_is_asked_for(classifier_cli, flags, loaded):
    """A plain run trains on the plain loss without importing the objectives' modules."""
    code = ("import sys, classifier; classifier.main(sys.argv[1:]); "
            "print(sorted(m for m in sys.modules if m.startswith('methods.objectives.')))")
    argv = sst(classifier_cli, "--epochs", "1", *flags)
    proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    modules = proc.stdout.strip().splitlines()[-1]
    want = "['methods.objectives.combined', 'methods.objectives.contrastive', 'methods.objectives.rdrop', " \
           "'methods.objectives.smart']"
    assert modules == (want if loaded else "[]")


def test_supervised_contrastive_needs_pairs(classifier_cli):
    with pytest.raises(SystemExit) as e:
        classifier.get_args(sst(classifier_cli, "--contrastive_supervised"))
    assert e.value.code == 2


def quora(path: Path, n: int) -> Path:
    rows = "".join(f"{i}\tq{i}\tHow do I cook dish {i}?\tWhat is the recipe of dish {i % 5}?\t{int(i % 3 != 0)}\n"
                   for i in range(n))
    path.write_text("\tid\tsentence1\tsentence2\tis_duplicate\n" + rows)
    return path


def paraphrase_args(tmp_path: Path, name: str, *extra: str) -> list[str]:
    micro = tmp_path / "micro"
    micro.mkdir(exist_ok=True)
    (micro / "config.json").write_text(json.dumps(dict(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2,
                                                       n_head=2)))
    out = tmp_path / name
    return ["--model_size", str(micro), "--random_init", "--tokenizer", str(SHARED_TOKENIZER), "--epochs", "1",
            "--batch_size", "4", "--no_progress", "--lr", "1e-3", "--output_dir", str(out),
            "--para_train", str(quora(tmp_path / "train.tsv", 12)), "--para_dev", str(quora(tmp_path / "dev.tsv", 4)),
            "--para_test", str(quora(tmp_path / "test.tsv", 4)), "--para_dev_out", str(out / "dev.csv"),
            "--para_test_out", str(out / "test.csv"), *extra]


def test_supervised_simcse_runs_on_paraphrase_pairs(tmp_path, monkeypatch):
    seen = []
    real = combined.pair_views_loss

    def spy(body, batch, pooling, temperature, gather):
        loss = real(body, batch, pooling, temperature, gather)
        seen.append((batch["sentence1_input_ids"].shape[0], pooling, loss.item()))
        return loss

    monkeypatch.setattr(combined, "pair_views_loss", spy)
    calls = spy_fit(monkeypatch, tasks.paraphrase)
    para.main(paraphrase_args(tmp_path, "plain"))
    para.main(paraphrase_args(tmp_path, "simcse", "--contrastive_weight", "1", "--contrastive_supervised",
                              "--pooling", "mean"))
    assert [b for b, _, _ in seen] == [4, 4, 4]  # one term per training batch, the two questions of each pair
    assert all(p == "mean" for _, p, _ in seen) and all(x > 0 for _, _, x in seen)
    assert set(calls[1]["objective"].last_terms) == {"task", "contrastive"}
    assert epoch_losses(tmp_path / "simcse") != epoch_losses(tmp_path / "plain")


def test_paraphrase_defaults_are_bit_identical_to_passing_them(tmp_path):
    para.main(paraphrase_args(tmp_path, "plain"))
    para.main(paraphrase_args(tmp_path, "explicit", *OFF))
    for f in ("dev.csv", "test.csv"):
        assert (tmp_path / "plain" / f).read_bytes() == (tmp_path / "explicit" / f).read_bytes()
    assert epoch_losses(tmp_path / "plain") == epoch_losses(tmp_path / "explicit")


# ----------------------------------------------------------- pooling in the classifier head


def micro_classifier(pooling: str) -> GPT2SentimentClassifier:
    torch.manual_seed(0)
    gpt = GPT2Model(GPT2Config(vocab_size=101, max_position_embeddings=32, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=2))
    return GPT2SentimentClassifier(gpt, num_labels=3, hidden_dropout_prob=0.0, pooling=pooling).eval()


def test_mean_pooling_head_is_padding_correct():
    model = micro_classifier("mean")
    texts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    alone = torch.cat([model(torch.tensor([t]), torch.ones(1, len(t), dtype=torch.long)) for t in texts])
    for side in ("right", "left"):
        ids = torch.full((3, 5), 100)  # the pad id's embedding must not leak in
        mask = torch.zeros(3, 5, dtype=torch.long)
        for i, t in enumerate(texts):
            cols = slice(0, len(t)) if side == "right" else slice(5 - len(t), 5)
            ids[i, cols], mask[i, cols] = torch.tensor(t), 1
        torch.testing.assert_close(model(ids, mask), alone, atol=1e-5, rtol=1e-5)
    # It is another representation than the last token's (same weights).
    last = micro_classifier("last")
    assert not torch.allclose(last(torch.tensor([texts[0]]), torch.ones(1, 5, dtype=torch.long)), alone[:1])
    with pytest.raises(ValueError, match="pooling"):
        micro_classifier("max")


def test_pooling_is_saved_and_rebuilt_by_load_and_the_kd_teacher(tmp_path, capsys, classifier_cli):
    trained = classifier.main(sst(classifier_cli, "--pooling", "mean"))
    ckpt = tmp_path / "runs" / "best.pt"
    assert load_checkpoint(ckpt)["extra"]["pooling"] == "mean"
    teacher = restore_task_model(ckpt, "classifier", check=same_task(ckpt, "sst")).model
    assert teacher.pooling == "mean"
    # --load without --pooling: the checkpoint's pooling, so the same predictions.
    again = classifier.main(sst(classifier_cli, "--epochs", "0", "--load", str(ckpt), "--output_dir",
                                str(tmp_path / "again"), "--predictions_dir", str(tmp_path / "again-pred")))
    assert "--pooling mean: the pooling" in capsys.readouterr().out
    assert again["sst"] == trained["sst"]
    name = "full-model-sst-dev-out.csv"
    assert (tmp_path / "pred" / name).read_bytes() == (tmp_path / "again-pred" / name).read_bytes()
