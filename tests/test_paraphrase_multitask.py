"""Report 002's paraphrase data methods: multi-task training (Quora with SST) through the one
Trainer, with its task sampling and per-task loss weights, and SimCSE hard negatives mined by word
overlap with the other label."""

from __future__ import annotations

import pytest
import torch

import paraphrase_detection as para
from engine.data import PadCollator
from engine.multitask import TASK_KEY, MultiTaskLoader, WeightedTaskLoss, task_probabilities
from errors import InputError
from methods.objectives import combined
from methods.objectives.contrastive import PairViewCollator, info_nce, supervised_pair_loss
from methods.objectives.hard_negatives import HARD_KEY, add_hard_negatives, mine_hard_negatives
from tasks import multitask
from tasks.restore import restore_task_model
from tests.test_objectives_cli import paraphrase_args

# ----------------------------------------------------------- sampling


def test_task_probabilities_proportional_uniform_temperature():
    sizes = {"quora": 100, "sst": 400}
    assert task_probabilities(sizes, "proportional") == pytest.approx({"quora": 0.2, "sst": 0.8})
    assert task_probabilities(sizes, "uniform") == pytest.approx({"quora": 0.5, "sst": 0.5})
    # T = 2: p ~ sqrt(n): 10 against 20
    assert task_probabilities(sizes, "temperature", 2.0) == pytest.approx({"quora": 1 / 3, "sst": 2 / 3})
    assert task_probabilities(sizes, "temperature", 1.0) == pytest.approx(task_probabilities(sizes, "proportional"))
    with pytest.raises(ValueError, match="at least one example"):
        task_probabilities({"quora": 0, "sst": 3})


class Batches:
    """A loader of ``n`` numbered batches of one task."""

    def __init__(self, name: str, n: int) -> None:
        self.name, self.n, self.started = name, n, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        self.started += 1
        return iter({"x": torch.tensor([i]), "from": self.name} for i in range(self.n))


def test_loader_draws_tasks_in_proportion_and_restarts_a_spent_task():
    loaders = {"quora": Batches("quora", 3), "sst": Batches("sst", 7)}
    probs = task_probabilities({"quora": 30, "sst": 70}, "uniform")
    loader = MultiTaskLoader(loaders, probs, num_batches=20000)
    torch.manual_seed(0)
    batches = list(loader)
    assert len(batches) == len(loader) == 20000
    assert all(b[TASK_KEY] == b["from"] for b in batches)  # each batch is labelled with its own task
    share = sum(b[TASK_KEY] == "quora" for b in batches) / len(batches)
    assert share == pytest.approx(0.5, abs=0.02)
    assert loaders["quora"].started > 1000  # 3 batches: restarted over and over


def test_loader_epoch_is_the_tasks_batches_together_and_seeded_by_the_global_rng():
    loader = MultiTaskLoader({"quora": Batches("quora", 3), "sst": Batches("sst", 5)}, {"quora": 0.3, "sst": 0.7})
    assert len(loader) == 8
    torch.manual_seed(1)
    first = [b[TASK_KEY] for b in loader]
    torch.manual_seed(1)
    assert [b[TASK_KEY] for b in loader] == first  # the Trainer's saved RNG state replays the same draws


# ----------------------------------------------------------- the weighted loss


def test_weighted_loss_dispatches_on_the_batch_task_and_scales_it():
    model = torch.nn.Linear(2, 1)
    losses = {"quora": lambda m, b: m(b["x"]).sum(), "sst": lambda m, b: (m(b["x"]) ** 2).sum()}
    loss = WeightedTaskLoss(losses, {"sst": 0.25})
    x = torch.ones(1, 2)
    assert loss.weights == {"quora": 1.0, "sst": 0.25}
    assert loss(model, {"x": x, TASK_KEY: "quora"}).item() == pytest.approx(model(x).sum().item())
    assert loss(model, {"x": x, TASK_KEY: "sst"}).item() == pytest.approx(0.25 * (model(x) ** 2).sum().item())
    off = WeightedTaskLoss(losses, {"sst": 0.0})(model, {"x": x, TASK_KEY: "sst"})
    off.backward()
    assert model.weight.grad.abs().sum() == 0  # weight 0: the task trains nothing
    with pytest.raises(ValueError, match="no loss"):
        WeightedTaskLoss(losses, {"cola": 1.0})


# ----------------------------------------------------------- the command line


def test_multitask_cli_run_trains_both_tasks_and_saves_the_scorer(tmp_path, monkeypatch):
    seen: list[str] = []
    real = WeightedTaskLoss.__call__

    def spy(self, model, batch):
        seen.append(batch[TASK_KEY])
        return real(self, model, batch)

    monkeypatch.setattr(WeightedTaskLoss, "__call__", spy)
    result = para.main(paraphrase_args(tmp_path, "mt", "--limit", "8", "--multitask", "sst", "--task_sampling",
                                       "temperature", "--task_weights", "quora=1,sst=0.5"))
    assert len(seen) == 4 and set(seen) <= {"quora", "sst"}  # 2 + 2 batches of 4 per epoch
    assert (tmp_path / "mt" / "dev.csv").exists() and 0 <= result["dev"]["accuracy"] <= 1
    restored = restore_task_model(result["checkpoint"], "paraphrase")  # a plain scorer: the SST head is gone
    assert not any("heads" in k for k in restored.model.state_dict())


def test_multitask_loaders_take_num_workers_and_group_by_length_and_keep_workers(tmp_path, monkeypatch):
    built = []
    real = multitask.make_loader

    def spy(*args, **kwargs):
        loader = real(*args, **kwargs)  # built, never iterated: no worker process starts
        built.append({"persistent_workers": loader.persistent_workers, "num_workers": loader.num_workers,
                      "group_by_length": kwargs["group_by_length"]})
        return real(*args, **{**kwargs, "num_workers": 0, "persistent_workers": False})  # no workers in a test

    monkeypatch.setattr(multitask, "make_loader", spy)
    para.main(paraphrase_args(tmp_path, "mt", "--limit", "8", "--multitask", "sst", "--num_workers", "2",
                              "--group_by_length"))
    # quora's and sst's; the workers kept, as a task's loader restarts whenever it runs out
    assert built == [{"persistent_workers": True, "num_workers": 2, "group_by_length": True}] * 2


@pytest.mark.parametrize("extra, problem", [
    (("--multitask", "mnli"), "unknown auxiliary task"),
    (("--multitask", "sst", "--task_weights", "cola=1"), "does not train"),
    (("--multitask", "sst", "--rdrop_alpha", "1"), "plain losses"),
    (("--contrastive_hard_negatives",), "needs --contrastive_supervised"),
])
def test_bad_combinations_are_refused_before_any_work(tmp_path, extra, problem):
    with pytest.raises(InputError, match=problem):
        para.main(paraphrase_args(tmp_path, "bad", *extra))
    assert not (tmp_path / "bad").exists()


def test_task_weights_flag_is_checked_while_parsing(capsys):
    with pytest.raises(SystemExit) as e:
        para.parse_args(["--task_weights", "sst=heavy"])
    assert e.value.code == 2 and "task=weight" in capsys.readouterr().err


# ----------------------------------------------------------- hard negatives


def test_miner_picks_the_most_overlapping_question_with_the_other_label():
    first = ["how do i cook rice", "what is the capital of france", "how do i cook pasta fast"]
    second = ["best way to make rice", "france capital city", "quick pasta recipe"]
    labels = [1, 1, 0]
    hard = mine_hard_negatives(first, second, labels)
    assert hard[0] == "how do i cook pasta fast"  # shares 'how do i cook', and pair 2 is labelled 0
    assert hard[2] == "how do i cook rice"  # pair 2 (label 0) draws from the label-1 pairs: 4 shared words
    assert hard[1] in {"how do i cook pasta fast", "quick pasta recipe"}  # nothing shared: the first label-0 text
    assert hard[1] == "how do i cook pasta fast"  # ties go to the lower index (first questions come first)
    assert mine_hard_negatives(first, second, [1, 1, 1]) == second  # no other label: the pair's own question


def test_miner_chunks_agree_with_one_pass():
    first = [f"question {i} about topic {i % 4}" for i in range(30)]
    second = [f"topic {i % 4} asked again {i}" for i in range(30)]
    labels = [i % 2 for i in range(30)]
    assert mine_hard_negatives(first, second, labels, chunk=7) == mine_hard_negatives(first, second, labels)


def test_hard_negatives_join_the_infonce_candidates(tokenizer):
    torch.manual_seed(0)
    first, second, hard = torch.randn(4, 8), torch.randn(4, 8), torch.randn(4, 8)
    labels = torch.tensor([1, 0, 1, 1])
    rows = torch.tensor([0, 2, 3])
    want = info_nce(first[rows], torch.cat([second, hard]), targets=rows, temperature=0.1)
    assert supervised_pair_loss(first, second, labels, 0.1, hard=hard).item() == pytest.approx(want.item())
    # more negatives: the same positives against a larger denominator
    plain = supervised_pair_loss(first, second, labels, 0.1)
    assert supervised_pair_loss(first, second, labels, 0.1, hard=hard) > plain
    feats = [{"input_ids": [1, 2], "labels": 1}, {"input_ids": [3], "labels": 0}]
    add_hard_negatives(feats, ["a longer hard negative", "b"], tokenizer, max_length=3)
    batch = PairViewCollator(0)([{**f, "sentence1_input_ids": [5], "sentence2_input_ids": [6]} for f in feats])
    assert batch[HARD_KEY].shape == (2, 3) and batch["hard_negative_attention_mask"].tolist() == [[1, 1, 1],
                                                                                                  [1, 0, 0]]
    assert isinstance(PadCollator(0)(feats)["input_ids"], torch.Tensor)


def test_hard_negatives_reach_the_loss_from_the_cli(tmp_path, monkeypatch):
    seen = []
    real = combined.pair_views_loss

    def spy(body, batch, pooling, temperature, gather):
        seen.append(HARD_KEY in batch)
        return real(body, batch, pooling, temperature, gather)

    monkeypatch.setattr(combined, "pair_views_loss", spy)
    para.main(paraphrase_args(tmp_path, "hard", "--contrastive_weight", "1", "--contrastive_supervised",
                              "--contrastive_hard_negatives"))
    assert seen and all(seen)
