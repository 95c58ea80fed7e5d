"""Knowledge-distillation loss (Hinton et al. 2015) and the recurrent students it trains (an
LSTM, or report 004's ReLU RNN with trainable embeddings; the small GPT-2 student is the
task's own ``models.heads.GPT2SentimentClassifier``).

Kept apart from ``distillation.kd`` (the CLI and training wiring) so that the
loss and the students can be tested and reused without the engine.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    alpha: float = 0.5,
    temperature: float = 2.0,
) -> torch.Tensor:
    """alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(student, labels).

    The T^2 factor keeps the soft term's gradient on the scale of the hard term's
    when T changes (soft gradients shrink as 1/T^2). With alpha = 0 (or no
    teacher) this is exactly cross-entropy: the baseline student.
    Shapes: logits (B, C), labels (B,).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    ce = F.cross_entropy(student_logits, labels)
    if alpha == 0.0 or teacher_logits is None:
        return ce
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} vs student {tuple(student_logits.shape)}")
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)  # (B, C)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=-1)  # (B, C)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return alpha * temperature**2 * kl + (1.0 - alpha) * ce


class RecurrentStudent(nn.Module):
    """A 2-layer recurrent network over GPT-2 token embeddings, classifying from the state at
    the last real token. The embedding table is copied from the teacher's GPT-2; ``cell`` names
    the recurrent module (and its checkpoint keys)."""

    cell = "lstm"

    def __init__(
        self,
        embeddings: torch.Tensor,
        num_labels: int,
        hidden_size: int = 768,
        num_layers: int = 2,
        dropout: float = 0.1,
        freeze_embeddings: bool = True,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding.from_pretrained(embeddings.detach().clone(), freeze=freeze_embeddings)
        kind = {"lstm": nn.LSTM, "rnn": nn.RNN}[self.cell]
        extra = {"nonlinearity": "relu"} if self.cell == "rnn" else {}
        self.add_module(self.cell, kind(embeddings.size(1), hidden_size, num_layers, batch_first=True,
                                        dropout=dropout if num_layers > 1 else 0.0, **extra))
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) right- or left-padded ids -> (B, num_labels) logits."""
        lengths = attention_mask.long().sum(-1).clamp(min=1)  # (B,)
        # Move every row's real tokens to the front, so packing sees right padding.
        order = torch.argsort((1 - attention_mask.long()), dim=-1, stable=True)  # (B, T)
        ids = torch.gather(input_ids, 1, order)
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(ids), lengths.cpu(), batch_first=True,
                                                   enforce_sorted=False)
        _, state = getattr(self, self.cell)(packed)  # h_n (num_layers, B, H), with the LSTM's c_n
        h_n = state[0] if isinstance(state, tuple) else state
        return self.head(self.drop(h_n[-1]))  # (B, num_labels)


class LSTMStudent(RecurrentStudent):
    """The LSTM student. Its embeddings are frozen by default: it learns the sequence model, not
    38M embedding weights, which is what makes it small to train."""

    cell = "lstm"


class RNNStudent(RecurrentStudent):
    """Report 004's student: a 2-layer Elman RNN with ReLU units whose embeddings (copied from the
    teacher) are trained too."""

    cell = "rnn"

    def __init__(self, embeddings: torch.Tensor, num_labels: int, hidden_size: int = 768, num_layers: int = 2,
                 dropout: float = 0.1, freeze_embeddings: bool = False) -> None:
        super().__init__(embeddings, num_labels, hidden_size, num_layers, dropout, freeze_embeddings)
