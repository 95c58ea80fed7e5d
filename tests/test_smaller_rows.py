"""Issue 28's smaller rows: ``--pooling`` refused where it changes nothing (the cloze paraphrase
answer), report 004's ReLU RNN student for knowledge distillation, and ``setup.sh --poetry``."""

from __future__ import annotations

import os
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

import paraphrase_detection as para
from cli.common import run_main
from cli.paraphrase import POOLING_HELP, build_parser
from distillation.__main__ import build_parser as distillation_parser
from distillation.kd import build_student
from distillation.kd_loss import LSTMStudent, RNNStudent, kd_loss
from errors import InputError
from tests.test_objectives_cli import paraphrase_args

ROOT = Path(para.__file__).resolve().parent


# ----------------------------------------------------------- --pooling on the cloze paraphrase task


def test_pooling_mean_without_simcse_is_refused_before_any_work(tmp_path):
    with pytest.raises(InputError, match="--pooling mean changes nothing here"):
        para.main(paraphrase_args(tmp_path, "mean", "--pooling", "mean"))
    assert not (tmp_path / "mean").exists()  # refused before the run folder


def test_pooling_refusal_is_one_line_and_exit_status_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:  # as the command runs it (paraphrase_detection.py's __main__)
        run_main(lambda: para.main(paraphrase_args(tmp_path, "mean", "--pooling", "mean")))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --pooling mean")


def test_pooling_help_says_what_it_does_here():
    action = next(a for a in build_parser()._actions if a.dest == "pooling")
    assert action.help == POOLING_HELP and "last token" in action.help


# ----------------------------------------------------------- report 004's RNN student


def test_rnn_student_shapes_relu_and_trainable_embeddings():
    emb = torch.randn(50, 8)
    student = RNNStudent(emb, num_labels=3, hidden_size=12)
    assert student.rnn.nonlinearity == "relu" and student.rnn.num_layers == 2
    assert student.embed.weight.requires_grad and not hasattr(student, "lstm")
    ids = torch.randint(0, 50, (4, 7))
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[1, 5:] = 0
    assert student(ids, mask).shape == (4, 3)
    left_ids, left = torch.roll(ids, 2, 1), torch.roll(mask, 2, 1)  # row 1 left-padded by its two pads
    student.eval()
    assert torch.allclose(student(ids[1:2], mask[1:2]), student(left_ids[1:2], left[1:2]), atol=1e-6)


def test_lstm_student_keeps_its_checkpoint_keys():
    keys = set(LSTMStudent(torch.randn(50, 8), 3, 12).state_dict())
    assert {"embed.weight", "lstm.weight_ih_l0", "lstm.weight_hh_l1", "head.weight"} <= keys


def test_rnn_student_training_step_lowers_the_kd_loss_and_moves_embeddings():
    torch.manual_seed(0)
    student = RNNStudent(torch.randn(50, 8), num_labels=3, hidden_size=12, dropout=0.0)
    ids, mask = torch.randint(0, 50, (16, 6)), torch.ones(16, 6, dtype=torch.long)
    teacher, labels = torch.randn(16, 3), torch.randint(0, 3, (16,))
    before = student.embed.weight.detach().clone()
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = kd_loss(student(ids, mask), teacher, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert not torch.equal(before, student.embed.weight)


def test_kd_cli_offers_the_rnn_student():
    args = distillation_parser().parse_args(["kd", "--teacher", "t.pt", "--student", "rnn"])
    assert args.student == "rnn"

    class Teacher(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gpt = torch.nn.Module()
            self.gpt.wte = torch.nn.Embedding(50, 8)

    assert isinstance(build_student("rnn", Teacher(), 5, 16, 0.1), RNNStudent)  # type: ignore[arg-type]
    assert type(build_student("lstm", Teacher(), 5, 16, 0.1)) is LSTMStudent  # type: ignore[arg-type]


# ----------------------------------------------------------- setup.sh --poetry


def poetry(tmp_path: Path, url: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "POETRY_URL": url, "POETRY_CSV": str(tmp_path / "data" / "PoetryFoundationData.csv")}
    return subprocess.run(["bash", str(ROOT / "setup.sh"), "--poetry"], env=env, capture_output=True, text=True,
                          timeout=60)


def test_setup_poetry_unreachable_says_what_to_do_and_exits_1(tmp_path):
    done = poetry(tmp_path, "http://127.0.0.1:9/poems.zip")  # nothing listens on port 9
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "kaggle.com/datasets/tgdivy/poetry-foundation-poems" in done.stderr
    assert not list((tmp_path / "data").iterdir())  # no partial file left


def test_setup_poetry_unpacks_the_kaggle_zip_and_skips_a_second_time(tmp_path):
    csv = ',Title,Poem,Poet,Tags\n0,"A","\r\r\nRoses\r\r\n",Anon,\n'
    archive = tmp_path / "poems.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("PoetryFoundationData.csv", csv)
    done = poetry(tmp_path, archive.as_uri())
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "data" / "PoetryFoundationData.csv").read_bytes() == csv.encode()
    again = poetry(tmp_path, "http://127.0.0.1:9/poems.zip")
    assert again.returncode == 0 and "already there" in again.stdout


def test_setup_poetry_refuses_a_file_that_is_not_the_poems(tmp_path):
    page = tmp_path / "login.html"
    page.write_text("<html>please sign in</html>\n")
    assert poetry(tmp_path, page.as_uri()).returncode == 1
    assert not (tmp_path / "data" / "PoetryFoundationData.csv").exists()
