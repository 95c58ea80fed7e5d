"""Knowledge distillation: the loss reduces to cross-entropy at alpha = 0, its
soft term pulls the student toward the teacher, and the students run."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from distillation.kd_loss import LSTMStudent, kd_loss


def _logits(seed: int, B: int = 6, C: int = 5) -> torch.Tensor:
    return torch.randn(B, C, generator=torch.Generator().manual_seed(seed)) * 2


def test_alpha_zero_is_cross_entropy() -> None:
    s, t = _logits(0), _logits(1)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    for T in (1.0, 4.0):
        torch.testing.assert_close(kd_loss(s, t, y, alpha=0.0, temperature=T), F.cross_entropy(s, y))
    torch.testing.assert_close(kd_loss(s, None, y, alpha=0.7), F.cross_entropy(s, y))


def test_soft_term_value_and_zero_at_teacher() -> None:
    s, t = _logits(2), _logits(3)
    y = torch.zeros(6, dtype=torch.long)
    T = 3.0
    p_t = F.softmax(t / T, -1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / T, -1))).sum(-1).mean()
    torch.testing.assert_close(kd_loss(s, t, y, alpha=1.0, temperature=T), T**2 * kl)
    mixed = kd_loss(s, t, y, alpha=0.3, temperature=T)
    torch.testing.assert_close(mixed, 0.3 * T**2 * kl + 0.7 * F.cross_entropy(s, y))
    assert kd_loss(t, t, y, alpha=1.0, temperature=T).abs() < 1e-6  # student == teacher: no soft loss


@pytest.mark.parametrize("T", [1.0, 2.0, 5.0])
def test_gradient_step_moves_student_toward_teacher(T: float) -> None:
    t = _logits(4)
    s = _logits(5).requires_grad_(True)
    y = torch.zeros(6, dtype=torch.long)

    def kl_to_teacher(logits: torch.Tensor) -> float:
        return F.kl_div(F.log_softmax(logits, -1), F.log_softmax(t, -1), reduction="batchmean", log_target=True).item()

    before = kl_to_teacher(s)
    kd_loss(s, t, y, alpha=1.0, temperature=T).backward()
    with torch.no_grad():
        stepped = s - 0.05 * s.grad
    assert kl_to_teacher(stepped) < before
    # The teacher is a target, never trained through the loss.
    t2 = t.clone().requires_grad_(True)
    kd_loss(s.detach().requires_grad_(True), t2, y, alpha=1.0, temperature=T).backward()
    assert t2.grad is None


def test_bad_arguments() -> None:
    s = _logits(0)
    y = torch.zeros(6, dtype=torch.long)
    with pytest.raises(ValueError, match="alpha"):
        kd_loss(s, s, y, alpha=1.5)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(s, s, y, temperature=0.0)
    with pytest.raises(ValueError, match="teacher logits"):
        kd_loss(s, _logits(1, C=3), y)


def test_lstm_student_ignores_padding_side() -> None:
    torch.manual_seed(0)
    emb = torch.randn(50, 16)
    student = LSTMStudent(emb, num_labels=3, hidden_size=12).eval()
    ids = torch.tensor([[5, 6, 7, 0, 0], [8, 9, 10, 11, 12]])
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left_ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    left = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    out_r, out_l = student(ids, right), student(left_ids, left)
    assert out_r.shape == (2, 3)
    torch.testing.assert_close(out_r, out_l)
    assert not student.embed.weight.requires_grad


def test_kd_cli_on_a_classifier_checkpoint(tmp_path, capsys, classifier_cli) -> None:
    """classifier.py trains a micro teacher; ``python -m distillation kd`` distils it into an
    LSTM student and trains the same student without the teacher, and reports both."""
    import json

    import classifier
    from distillation.__main__ import main
    from tests.conftest import SHARED_DATA as SHARED

    teacher_run = classifier.main(classifier_cli("full-model", "--dataset", "sst", "--limit", "16", "--lr", "1e-3"))
    teacher = tmp_path / "runs" / "best.pt"  # one dataset: its run folder is --output_dir itself
    assert teacher.exists()
    summary = main(["kd", "--teacher", str(teacher), "--dataset", "sst", "--train", str(SHARED / "ids-sst-train.csv"),
                    "--dev", str(SHARED / "ids-sst-dev.csv"), "--limit", "16", "--epochs", "1", "--batch_size", "8",
                    "--student_hidden", "16", "--max_length", "32", "--no_progress",
                    "--output_dir", str(tmp_path / "kd")])
    results = summary["results"]
    assert set(results) == {"teacher", "kd", "baseline"}
    assert results["kd"]["alpha"] == 0.5 and results["baseline"]["alpha"] == 0.0
    # The rebuilt teacher scores the same 16 dev sentences exactly as classifier.py did.
    assert results["teacher"]["dev_accuracy"] == pytest.approx(teacher_run["sst"]["accuracy"])
    assert all((16 * results[k]["dev_accuracy"]).is_integer() and Path(results[k]["checkpoint"]).exists()
               for k in ("kd", "baseline"))
    saved = json.loads((tmp_path / "kd" / "kd.summary.json").read_text())
    assert saved["results"]["teacher"]["dev_accuracy"] == results["teacher"]["dev_accuracy"]
    assert "student+KD" in capsys.readouterr().out
