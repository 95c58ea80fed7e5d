"""LoReFT (``methods.reft``, the ``reft`` fine-tune mode): the intervention's formula, R's
orthonormal rows through training, the positions it edits under either padding and on a KV
cache, saving and restoring, and the mode through the classifier's real command line."""

from __future__ import annotations

import copy

import pytest
import torch

import classifier
import sonnet_generation
from cli.common import fine_tune_config
from config import get_config
from engine.checkpoints import load_checkpoint
from methods.export import ExportError, merged_state
from methods.fine_tune import FineTuneConfig, ReftConfig, set_fine_tune_mode
from methods.gradient_checkpointing import enable_gradient_checkpointing
from methods.reft import (
    LoreftIntervention,
    ReftCheckpointedLayer,
    ReftLayer,
    ReftLayerError,
    apply_reft,
    ensure_reft,
    reft_of,
    select_positions,
)
from methods.restore import load_model, save_model
from models.generation import generate
from models.gpt2 import GPT2Model
from optimizer import AdamW
from tasks.restore import restore_task_model


def intervention(hidden: int = 6, rank: int = 2, seed: int = 0) -> LoreftIntervention:
    torch.manual_seed(seed)
    return LoreftIntervention(hidden, rank).double()


def body(seed: int = 0, **overrides) -> GPT2Model:
    torch.manual_seed(seed)
    return GPT2Model(get_config("tiny", **overrides)).eval()


def test_the_formula_on_known_tensors():
    """With R the first two coordinate axes, the edit sets those coordinates to W h + b and
    leaves the others; a general orthonormal R gives h + R^T (W h + b - R h) exactly."""
    m = intervention()
    W = torch.arange(12.0, dtype=torch.float64).view(2, 6) / 10
    b = torch.tensor([1.0, -2.0], dtype=torch.float64)
    with torch.no_grad():
        m.rotate.weight = torch.eye(2, 6, dtype=torch.float64)
        m.learned_source.weight.copy_(W)
        m.learned_source.bias.copy_(b)
    h = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]], dtype=torch.float64)
    want = h.clone()
    want[0, :2] = W @ h[0] + b  # (0.1*2+0.2*3+...)
    assert torch.allclose(m(h), want)

    Q, _ = torch.linalg.qr(torch.randn(6, 2, dtype=torch.float64))
    with torch.no_grad():
        m.rotate.weight = Q.T.contiguous()
    R = Q.T
    h = torch.randn(3, 5, 6, dtype=torch.float64)
    assert torch.allclose(m(h), h + (h @ W.T + b - h @ R.T) @ R)


def test_an_edit_towards_the_current_projection_is_the_identity():
    """W = R and b = 0: the target W h + b is R h itself, so nothing moves."""
    m = intervention(hidden=8, rank=3)
    with torch.no_grad():
        m.learned_source.weight.copy_(m.rotate.weight)
        m.learned_source.bias.zero_()
    h = torch.randn(2, 4, 8, dtype=torch.float64)
    assert torch.allclose(m(h), h)


def test_rows_of_R_stay_orthonormal_through_optimizer_steps():
    m = LoreftIntervention(16, 4)
    before = m.rotate.weight.detach().clone()
    opt = AdamW(m.parameters(), lr=0.05)
    for _ in range(25):
        loss = (m(torch.randn(8, 16)) - torch.randn(8, 16)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    R = m.rotate.weight.detach()
    assert (R - before).abs().max() > 0.05  # R trained
    assert torch.allclose(R @ R.T, torch.eye(4), atol=1e-5)


def test_positions_are_counted_over_real_tokens_under_either_padding():
    right = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    left = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    assert select_positions(right, 2, 5, 0, 1, 1).tolist() == [[True, False, False, False, True],
                                                              [True, False, True, False, False]]
    assert select_positions(left, 2, 5, 0, 2, 0).tolist() == [[True, True, False, False, False],
                                                             [False, False, True, True, False]]
    assert select_positions(None, 1, 3, 0, 0, 1).tolist() == [[False, False, True]]
    # A decoding step on a cache: the new token is edited only among the first positions.
    assert select_positions(torch.ones(1, 3), 1, 1, 2, 3, 1).tolist() == [[True]]
    assert select_positions(torch.ones(1, 4), 1, 1, 3, 3, 1).tolist() == [[False]]
    assert select_positions(torch.ones(1, 4), 1, 1, 3, 0, 1) is None


@pytest.mark.parametrize("side", ["right", "left"])
def test_only_the_chosen_positions_change(side):
    """Edited at the last block only, the final states differ from the plain model's exactly at
    the first and last real token of each row."""
    plain = body()
    model = copy.deepcopy(plain)
    apply_reft(model, rank=2, layers=[len(model.h) - 1], first=1, last=1)
    assert type(model.h[-1]) is ReftLayer and type(model.h[0]) is not ReftLayer
    ids = torch.randint(0, 1000, (2, 6))
    mask = torch.tensor([[1] * 6, [1, 1, 1, 1, 0, 0]])
    if side == "left":
        mask = mask.flip(-1)
    with torch.no_grad():
        a = plain(ids, mask)["last_hidden_state"]
        b = model(ids, mask)["last_hidden_state"]
    changed = (a - b).abs().amax(-1) > 1e-6  # (B, T)
    real = mask.bool()
    first = real & (real.long().cumsum(-1) == 1)
    last = real & (real.long().cumsum(-1) == real.sum(-1, keepdim=True))
    assert changed.tolist() == (first | last).tolist()


def test_cached_decoding_edits_the_positions_a_full_pass_edits():
    """First positions are the same tokens whether the sequence is read at once or step by step,
    so greedy decoding gives the same tokens with and without the KV cache."""
    model = body()
    apply_reft(model, rank=2, first=4, last=0)
    with torch.no_grad():
        for p in reft_of(model).parameters():
            p.add_(0.5 * torch.randn_like(p))  # a strong edit, so a missed position would show
    ids = torch.randint(0, 1000, (2, 3))
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    cached = generate(model, ids, mask, max_new_tokens=5)
    assert torch.equal(cached, generate(model, ids, mask, max_new_tokens=5, use_cache=False))


def test_a_saved_body_restores_its_interventions_and_a_mode_keeps_them(tmp_path):
    model = body()
    apply_reft(model, rank=3, layers=[1], first=2, last=1)
    save_model(model, tmp_path / "model.pt")
    loaded = load_model(tmp_path / "model.pt").eval()
    ids = torch.randint(0, 1000, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(ids)["last_hidden_state"], loaded(ids)["last_hidden_state"])
    reft = reft_of(loaded)
    assert (reft.first, reft.last, list(reft.interventions)) == (2, 1, ["1"])
    assert ensure_reft(loaded, 3, [1], 2, 1) is reft  # --load of a ReFT model: its interventions go on
    with pytest.raises(ReftLayerError, match="--reft_rank"):
        ensure_reft(loaded, 4, [1], 2, 1)
    with pytest.raises(ReftLayerError, match="has 2 blocks"):
        apply_reft(body(), rank=2, layers=[5])


def test_export_refuses_a_model_with_interventions():
    """A Hugging Face GPT-2 has no place for them: exporting the body alone would silently drop them."""
    model = body()
    apply_reft(model, rank=2)
    with pytest.raises(ExportError, match="ReFT"):
        merged_state(model)


def test_gradient_checkpointed_blocks_stay_checkpointed_and_edit_the_same():
    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    plain = body(**no_dropout)
    apply_reft(plain, rank=2)
    checkpointed = enable_gradient_checkpointing(body(**no_dropout))
    apply_reft(checkpointed, rank=2)
    checkpointed.load_state_dict(plain.state_dict())
    assert all(type(b) is ReftCheckpointedLayer for b in checkpointed.h)
    ids = torch.randint(0, 1000, (2, 5))
    grads = []
    for m in (plain, checkpointed):
        m.train()
        m(ids)["last_hidden_state"].square().sum().backward()
        grads.append(reft_of(m).interventions["0"].learned_source.weight.grad)
    assert torch.allclose(*grads, atol=1e-5)


def test_settings_come_from_the_flags():
    args = classifier.get_args(["--fine-tune-mode", "reft", "--reft_rank", "2", "--reft_layers", "1, 0",
                                "--reft_positions", "l3+f2"])
    assert fine_tune_config(args) == FineTuneConfig("reft", ReftConfig(2, "0,1", "f2+l3")) and args.lr == 1e-3
    assert FineTuneConfig.from_dict(fine_tune_config(args).to_dict()) == fine_tune_config(args)
    assert ReftConfig().layer_indices is None and ReftConfig(layers="2,0").layer_indices == (0, 2)
    assert fine_tune_config(sonnet_generation.get_args(["--fine-tune-mode", "reft"])).adapter.positions == "f4"
    for bad in (["--reft_positions", "m2"], ["--reft_positions", "f0"], ["--reft_layers", "one"]):
        with pytest.raises(SystemExit):
            classifier.get_args(["--fine-tune-mode", "reft", *bad])


def test_the_mode_trains_and_reloads_through_the_classifier_cli(tmp_path, classifier_cli):
    """A trainable-only checkpoint (interventions and head) that ``--load`` predicts with exactly."""
    first = classifier.main(classifier_cli("reft", "--dataset", "sst", "--reft_layers", "1"))
    best = next((tmp_path / "runs").rglob("best.pt"))
    ckpt = load_checkpoint(best)
    assert ckpt["trainable_only"] and ckpt["model"] and all(
        k.startswith(("gpt.reft.interventions.1.", "classifier.")) for k in ckpt["model"])
    restored = restore_task_model(best, "classifier").model
    for k, v in ckpt["model"].items():
        assert torch.equal(restored.state_dict()[k], v), k
    fresh = GPT2Model(restored.gpt.config)
    set_fine_tune_mode(fresh, FineTuneConfig("reft", ReftConfig(layers="1")), ())
    assert not torch.equal(reft_of(fresh).interventions["1"].learned_source.weight,
                           reft_of(restored).interventions["1"].learned_source.weight)

    again = classifier.main(classifier_cli("reft", "--dataset", "sst", "--reft_layers", "1", "--load", str(best),
                                           "--epochs", "0", "--output_dir", str(tmp_path / "again"),
                                           "--predictions_dir", str(tmp_path / "pred2")))
    assert again["sst"]["accuracy"] == first["sst"]["accuracy"]
    for split in ("dev", "test"):
        name = f"reft-sst-{split}-out.csv"
        written = list(tmp_path.glob(f"runs/**/{name}")) + list(tmp_path.glob(f"pred/{name}"))
        reloaded = list(tmp_path.glob(f"again/**/{name}")) + list(tmp_path.glob(f"pred2/{name}"))
        assert written and reloaded and written[0].read_text() == reloaded[0].read_text()
