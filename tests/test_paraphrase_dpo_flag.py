"""``paraphrase_detection.py --dpo``: the run trains on the DPO loss of the cloze answers (the
formula by hand on one batch; log 2 at the first step), resumes exactly, and refuses other
losses beside it; the paraphrase and sonnet parsers share the DPO flags and no CLI edits
argparse's private attributes."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import paraphrase_detection
import tasks.paraphrase as paraphrase_task
from cli.paraphrase import build_parser, parse_args, settings_from_args
from cli.sonnet import build_parser as sonnet_parser
from config import get_config
from engine.data import PadCollator
from errors import InputError
from methods.dpo import DEFAULT_BETA, frozen_reference
from models.gpt2 import GPT2Model
from models.heads import ClozeParaphraseScorer
from tasks.paraphrase import ParaphraseSettings
from tasks.paraphrase_dpo import dpo_training_loss
from tasks.quora_data import load_quora_splits, paraphrase_features
from tests.conftest import MICRO

ROOT = Path(__file__).resolve().parents[1]


def run_flags(tmp_path: Path, out: str, *extra: str) -> list[str]:
    micro = tmp_path / "micro"
    micro.mkdir(exist_ok=True)
    (micro / "config.json").write_text(json.dumps(MICRO))
    return ["--model_size", str(micro), "--random_init", "--limit", "8", "--max_length", "64", "--no_progress",
            "--lr", "1e-3", "--dpo", "--dpo_beta", "0.5", "--output_dir", str(tmp_path / out), *extra]


def steps(folder: Path) -> list[float]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["type"] == "step"]


def test_the_loss_is_dpo_by_hand_on_one_batch(tokenizer):
    d = ParaphraseSettings()
    rows = load_quora_splits(d.para_train, d.para_dev, d.para_test, limit=8)["train"]
    batch = PadCollator(tokenizer.pad_token_id)(paraphrase_features(rows, tokenizer, 64, verbose=False))
    torch.manual_seed(0)
    policy = ClozeParaphraseScorer(GPT2Model(get_config("tiny")))
    loss_fn = dpo_training_loss(policy, beta=0.5)
    reference = frozen_reference(policy)  # what the loss holds: the policy as it started
    assert all(m.p == 0 for m in policy.modules() if isinstance(m, torch.nn.Dropout))
    with torch.no_grad():  # the policy moves away from the reference
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    loss = loss_fn(policy.train(), batch)

    ids, mask, y = batch["input_ids"], batch["attention_mask"], batch["labels"]
    yes, no = ClozeParaphraseScorer.answer_ids[1], ClozeParaphraseScorer.answer_ids[0]
    chosen = torch.tensor([yes if label else no for label in y.tolist()])
    rejected = torch.tensor([no if label else yes for label in y.tolist()])
    rows_ = torch.arange(len(y))
    with torch.no_grad():
        lp = policy(ids, mask).log_softmax(-1)
        ref = reference(ids, mask).log_softmax(-1)
    margin = (lp[rows_, chosen] - ref[rows_, chosen]) - (lp[rows_, rejected] - ref[rows_, rejected])
    want = -F.logsigmoid(0.5 * margin).mean()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert abs(loss.item() - math.log(2)) > 1e-3  # not the trivial start


def test_the_flag_trains_on_dpo_and_resumes_exactly(tmp_path, capsys, monkeypatch):
    def no_cross_entropy(*args, **kwargs):
        raise AssertionError("--dpo built the cross-entropy loss it does not use")

    monkeypatch.setattr(paraphrase_task, "training_loss", no_cross_entropy)
    paraphrase_detection.main(run_flags(tmp_path, "one", "--batch_size", "8", "--epochs", "1"))
    assert "DPO (beta 0.5)" in capsys.readouterr().out
    assert steps(tmp_path / "one") == [pytest.approx(math.log(2), abs=1e-6)]  # policy == reference at step 1

    flags = ["--batch_size", "4"]
    paraphrase_detection.main(run_flags(tmp_path, "cut", *flags, "--epochs", "1"))
    paraphrase_detection.main(run_flags(tmp_path, "cut", *flags, "--epochs", "2", "--resume"))
    paraphrase_detection.main(run_flags(tmp_path, "whole", *flags, "--epochs", "2"))
    assert steps(tmp_path / "cut") == steps(tmp_path / "whole") and len(steps(tmp_path / "whole")) == 2  # an epoch each
    a, b = (torch.load(tmp_path / r / "paraphrase-model.pt", weights_only=False) for r in ("cut", "whole"))
    for k, v in b["model"].items():
        torch.testing.assert_close(a["model"][k], v, rtol=0, atol=0)


@pytest.mark.parametrize("extra", [["--loss", "vocab"], ["--rdrop_alpha", "1"], ["--multitask", "sst"],
                                   ["--epochs", "0"]])
def test_dpo_refuses_another_loss_or_no_training(extra):
    with pytest.raises(InputError, match="--dpo"):
        settings_from_args(parse_args(["--dpo", *extra]))


def test_the_tasks_share_the_dpo_flags():
    for parser in (build_parser(), sonnet_parser()):
        args = parser.parse_args(["--dpo"])
        assert args.dpo and args.dpo_beta == DEFAULT_BETA
    settings = settings_from_args(parse_args(["--dpo", "--dpo_beta", "0.3"]))
    assert settings.dpo and settings.dpo_beta == 0.3
    assert not settings_from_args(parse_args([])).dpo


def test_no_command_line_edits_private_argparse_state():
    private = re.compile(r"\._(actions|option_string_actions|action_groups|defaults|registries|positionals|optionals)"
                         r"\b")
    files = [*ROOT.glob("cli/*.py"), *ROOT.glob("*.py")]
    found = [f"{f.name}:{i}" for f in files for i, line in enumerate(f.read_text().splitlines(), 1)
             if private.search(line)]
    assert not found, found
