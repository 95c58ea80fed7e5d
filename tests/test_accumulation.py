"""Gradient accumulation weighs micro-batches by what their losses average over, and a run
saved on an epoch's last accumulated step resumes.

An accumulated step must have the gradient of one batch holding the whole group: micro-batch
means are weighted by their count of targets (LM) or examples (classification) over the
group's total, as ``transformers`` does with ``num_items_in_batch``. Averaging the means
instead was 32% off for an LM group of 25 and 14 target tokens.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from config import GPT2Config
from engine.data import ListDataset, PadCollator
from engine.trainer import Callback, TrainConfig, Trainer
from models.gpt2 import GPT2Model
from models.sonnet_gpt import SonnetGPT
from modules.losses import count_lm_targets


def one_sgd_step(tmp_path, model: nn.Module, loss_fn, loader, grad_accum: int, **trainer_kw) -> dict[str, torch.Tensor]:
    """The gradient the Trainer applied in its first optimizer step (SGD with lr 1, no clipping)."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = TrainConfig(epochs=1, lr=1.0, grad_accum=grad_accum, max_grad_norm=0.0, output_dir=str(tmp_path),
                      progress=False, plot=False, save_top_k=0, max_steps=1)
    Trainer(model, loss_fn, loader, None, cfg, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
            **trainer_kw).fit()
    return {n: before[n] - p.detach() for n, p in model.named_parameters()}


def tiny_lm() -> SonnetGPT:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=61, max_position_embeddings=32, hidden_size=16, num_hidden_layers=1,
                     num_attention_heads=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return SonnetGPT(GPT2Model(cfg))


def lm_loss_fn(model: SonnetGPT, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model.loss(batch["input_ids"], batch["attention_mask"])


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_accumulated_lm_step_equals_the_full_batch_gradient(tmp_path, padding_side):
    # Micro-batch 1: 14 + 11 = 25 target tokens; micro-batch 2: 9 + 5 = 14 (rows of 15, 12, 10, 6 tokens).
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(1, 61, (n,), generator=g).tolist() for n in (15, 12, 10, 6)]
    collate = PadCollator(0, padding_side=padding_side)
    feats = [{"input_ids": r} for r in rows]
    loader = DataLoader(ListDataset(feats), batch_size=2, shuffle=False, collate_fn=collate)
    assert [int(count_lm_targets(b)) for b in loader] == [25, 14]

    model = tiny_lm()
    full = collate(feats)
    model.zero_grad()
    lm_loss_fn(model, full).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}

    got = one_sgd_step(tmp_path, tiny_lm(), lm_loss_fn, loader, grad_accum=2, count_fn=count_lm_targets)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=n)


def test_uneven_last_classification_group_is_weighted_by_examples(tmp_path):
    """10 examples in batches of 4, 4 and 2, accumulated together: the gradient of all 10 at once
    (not the mean of three batch means, which gives the batch of 2 the weight of 4)."""
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(10, 6, generator=g), torch.randint(0, 3, (10,), generator=g)

    def make() -> nn.Module:
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

    def loss_fn(m: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(m(batch[0]), batch[1])

    model = make()
    loss_fn(model, [X, y]).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    loader = DataLoader(TensorDataset(X, y), batch_size=4, shuffle=False)
    got = one_sgd_step(tmp_path, make(), loss_fn, loader, grad_accum=3)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7, msg=n)


class KillAtFirstEpochEnd(Callback):
    """Stands for a kill after the step save of an epoch's last step, before the epoch's own save."""

    def on_epoch_end(self, trainer, epoch, metrics):
        raise KeyboardInterrupt


def test_resume_from_a_save_on_the_last_accumulated_step(tmp_path):
    """5 batches with grad_accum 2 make 3 steps per epoch, the last one of a single batch; a
    --save_every_steps 3 save lands on it. Resuming used to skip 3 x 2 = 6 of the 5 batches
    (``generator raised StopIteration``); now it finishes equal to an uninterrupted run."""
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(40, 6, generator=g), torch.randint(0, 2, (40,), generator=g)

    def fit(name: str, callbacks=(), resume: bool = False) -> Trainer:
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
        loader = DataLoader(TensorDataset(X, y), batch_size=8, shuffle=True)
        cfg = TrainConfig(epochs=2, lr=1e-2, grad_accum=2, save_every_steps=3, output_dir=str(tmp_path / name),
                          progress=False, plot=False, resume=resume)
        t = Trainer(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), loader, None, cfg, callbacks=callbacks)
        t.fit()
        return t

    full = fit("full")
    with pytest.raises(KeyboardInterrupt):
        fit("killed", callbacks=[KillAtFirstEpochEnd()])
    torch.manual_seed(1234)
    resumed = fit("killed", resume=True)
    assert resumed.global_step == full.global_step == 6
    for a, b in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    assert [h["train_loss"] for h in resumed.history] == pytest.approx([h["train_loss"] for h in full.history])
