"""LoRA and DoRA: zero-initialised adapters leave the model unchanged, merging does not change
outputs, only adapters (with DoRA's magnitudes) and the head train and are saved, and both match
PEFT on the same weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from config import GPT2Config
from engine.checkpoints import trainable_state_dict
from methods.lora import LoRALinear, apply_lora, lora_modules, mark_only_lora_trainable, unwrap_lora
from models.gpt2 import GPT2Model
from models.heads import GPT2SentimentClassifier
from tasks.restore import restore_task_model


def merge_all(model: nn.Module) -> None:
    for m in lora_modules(model):
        m.merge()


def small_model() -> GPT2SentimentClassifier:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=100, max_position_embeddings=32, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return GPT2SentimentClassifier(GPT2Model(cfg), num_labels=3, hidden_dropout_prob=0.0).eval()


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 100, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # one right-padded row
    return ids, mask


def randomize_b(model: nn.Module) -> None:
    """Nonzero ``B`` (and, for DoRA, magnitudes away from the base norms) so adapters act."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.1)
                if m.use_dora:
                    m.lora_magnitude.mul_(torch.rand_like(m.lora_magnitude) + 0.5)


def test_init_and_scaling():
    m = LoRALinear(nn.Linear(8, 5), r=4, alpha=12, dropout=0.1)
    assert m.scaling == 3.0
    assert m.lora_A.shape == (4, 8) and m.lora_B.shape == (5, 4)
    assert torch.count_nonzero(m.lora_B) == 0 and torch.count_nonzero(m.lora_A) == 32
    bound = 1 / 8**0.5  # kaiming_uniform(a=sqrt(5)) on fan_in 8
    assert m.lora_A.abs().max() <= bound


def test_fresh_wrap_equals_base():
    model = small_model()
    ids, mask = inputs()
    before = model(ids, mask)
    names = apply_lora(model, r=4, alpha=8)
    assert len(names) == 2 * 4 and all(isinstance(model.get_submodule(n), LoRALinear) for n in names)
    assert torch.equal(model(ids, mask), before)


def test_fresh_dora_wrap_equals_base():
    model = small_model()
    ids, mask = inputs()
    before = model(ids, mask)
    w = model.gpt.h[0].attn.c_attn.weight.clone()
    apply_lora(model, r=4, alpha=8, dropout=0.1, use_dora=True)
    m = model.gpt.h[0].attn.c_attn
    assert m.use_dora and m.lora_magnitude.shape == (w.shape[0],)
    torch.testing.assert_close(m.lora_magnitude, w.norm(dim=1))  # one norm per output row (over inputs)
    torch.testing.assert_close(model(ids, mask), before, rtol=1e-6, atol=1e-6)


def adapted_model(use_dora: bool) -> tuple[GPT2SentimentClassifier, torch.Tensor, torch.Tensor]:
    """A small model with trained-looking (nonzero B) adapters on two targets, and its inputs."""
    model = small_model()
    apply_lora(model, ("attn.c_attn", "mlp.c_fc"), r=4, alpha=8, use_dora=use_dora)
    randomize_b(model)
    return model, *inputs()


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_equals_unmerged_and_unmerge_restores(use_dora):
    model, ids, mask = adapted_model(use_dora)
    base_w = model.gpt.h[0].attn.c_attn.base.weight.clone()
    unmerged = model(ids, mask)
    merge_all(model)
    assert not torch.equal(model.gpt.h[0].attn.c_attn.base.weight, base_w)
    torch.testing.assert_close(model(ids, mask), unmerged, rtol=1e-5, atol=1e-5)
    merge_all(model)  # idempotent
    torch.testing.assert_close(model(ids, mask), unmerged, rtol=1e-5, atol=1e-5)
    for m in lora_modules(model):
        m.unmerge()
    torch.testing.assert_close(model.gpt.h[0].attn.c_attn.base.weight, base_w, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(ids, mask), unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_dora", [False, True])
def test_unwrap_leaves_plain_linears_with_the_adapted_outputs(use_dora):
    model, ids, mask = adapted_model(use_dora)
    adapted = model(ids, mask)
    unwrap_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert type(model.gpt.h[0].attn.c_attn) is nn.Linear
    assert not any("lora_" in k for k in model.state_dict())
    torch.testing.assert_close(model(ids, mask), adapted, rtol=1e-5, atol=1e-5)


def test_adapters_change_output():
    model = small_model()
    ids, mask = inputs()
    before = model(ids, mask)
    apply_lora(model, r=2, alpha=2)
    randomize_b(model)
    assert not torch.allclose(model(ids, mask), before)


@pytest.mark.parametrize("use_dora", [False, True])
def test_only_adapters_and_head_train_and_are_saved(use_dora):
    model = small_model()
    apply_lora(model, r=4, alpha=8, use_dora=use_dora)
    n = mark_only_lora_trainable(model, extra_trainable=("classifier",))
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    adapters = ("lora_A", "lora_B", "lora_magnitude") if use_dora else ("lora_A", "lora_B")
    assert trainable and all(k.startswith("classifier.") or k.endswith(adapters) for k in trainable)
    assert ("gpt.h.0.attn.c_attn.lora_magnitude" in trainable) == use_dora
    assert "classifier.weight" in trainable and "gpt.h.0.attn.c_attn.base.weight" not in trainable
    assert n == sum(model.get_parameter(k).numel() for k in trainable)
    assert set(trainable_state_dict(model)) == trainable


def test_typo_in_targets_is_an_error():
    with pytest.raises(ValueError, match="no nn.Linear matches"):
        apply_lora(small_model(), ("attn.q_proj",))


def peft_pair(use_dora: bool = False, dropout: float = 0.0) -> tuple[nn.Module, nn.Module, list[str]]:
    """The same two-Linear model (one with bias, one without) adapted by PEFT and by us, with
    PEFT's ``A``, a random nonzero ``B`` and (DoRA) perturbed magnitudes copied into ours."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 5, bias=False))
    ours = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 5, bias=False))
    ours.load_state_dict(base.state_dict())
    targets = ["0", "2"]
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets, use_dora=use_dora)
    theirs = peft.inject_adapter_in_model(cfg, base)
    apply_lora(ours, targets, r=4, alpha=8, dropout=dropout, use_dora=use_dora)
    with torch.no_grad():
        for t in targets:
            lin, mine = theirs.get_submodule(t), ours.get_submodule(t)
            lin.lora_B["default"].weight.normal_()
            mine.lora_A.copy_(lin.lora_A["default"].weight)
            mine.lora_B.copy_(lin.lora_B["default"].weight)
            if use_dora:
                mag = lin.lora_magnitude_vector["default"].weight
                torch.testing.assert_close(mine.lora_magnitude, mag)  # same initial norms
                mag.mul_(torch.rand_like(mag) + 0.5)
                mine.lora_magnitude.copy_(mag)
    return ours, theirs, targets


def test_matches_peft():
    ours, theirs, _ = peft_pair()
    x = torch.randn(5, 8)
    torch.testing.assert_close(ours(x), theirs(x))


def test_dora_matches_peft_forward_and_gradients():
    ours, theirs, targets = peft_pair(use_dora=True)
    x = torch.randn(5, 8)
    y_ours, y_theirs = ours(x), theirs(x)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-5, atol=1e-5)
    y_ours.pow(2).sum().backward()
    y_theirs.pow(2).sum().backward()
    for t in targets:
        lin, mine = theirs.get_submodule(t), ours.get_submodule(t)
        for g_ours, p_theirs in ((mine.lora_A.grad, lin.lora_A["default"].weight),
                                 (mine.lora_B.grad, lin.lora_B["default"].weight),
                                 (mine.lora_magnitude.grad, lin.lora_magnitude_vector["default"].weight)):
            assert g_ours is not None and g_ours.abs().sum() > 0
            torch.testing.assert_close(g_ours, p_theirs.grad, rtol=1e-5, atol=1e-5)


def test_dora_with_dropout_in_training_matches_peft():
    """With dropout PEFT feeds the dropped input to the direction term as well; same masks, same outputs."""
    ours, theirs, _ = peft_pair(use_dora=True, dropout=0.3)
    ours.train()
    theirs.train()
    x = torch.randn(5, 8)
    torch.manual_seed(5)
    y_ours = ours(x)
    torch.manual_seed(5)
    torch.testing.assert_close(y_ours, theirs(x), rtol=1e-5, atol=1e-5)


def test_dora_merge_matches_peft_merge():
    ours, theirs, targets = peft_pair(use_dora=True)
    merge_all(ours)
    for t in targets:
        theirs.get_submodule(t).merge()
        torch.testing.assert_close(ours.get_submodule(t).base.weight, theirs.get_submodule(t).base_layer.weight,
                                   rtol=1e-5, atol=1e-6)


def test_dora_from_the_classifier_cli_and_as_a_kd_teacher(tmp_path, classifier_cli):
    """``--use_dora`` reaches the model: the checkpoint holds the magnitudes, and the kd teacher
    is rebuilt from the saved args as DoRA with the trained outputs."""
    import classifier

    classifier.main(classifier_cli("lora", "--use_dora", "--dataset", "sst", "--lr", "1e-2"))
    ckpt = torch.load(tmp_path / "runs" / "best.pt", map_location="cpu", weights_only=False)
    saved = set(ckpt["model"])
    assert ckpt["extra"]["args"]["use_dora"] is True and ckpt["extra"]["fine_tune"]["adapter"]["use_dora"] is True
    assert any(k.endswith("lora_magnitude") for k in saved) and any(k.startswith("classifier.") for k in saved)
    assert all(k.startswith("classifier.") or k.endswith(("lora_A", "lora_B", "lora_magnitude")) for k in saved)
    teacher = restore_task_model(tmp_path / "runs" / "best.pt", "classifier").model
    mods = [m for m in teacher.modules() if isinstance(m, LoRALinear)]
    assert mods and all(m.use_dora for m in mods)
    for k, v in ckpt["model"].items():
        torch.testing.assert_close(teacher.state_dict()[k], v)
    # A checkpoint from before the FineTuneConfig was saved: the teacher is rebuilt from the flags.
    del ckpt["extra"]["fine_tune"]
    torch.save(ckpt, tmp_path / "old.pt")
    old = restore_task_model(tmp_path / "old.pt", "classifier").model
    assert all(m.use_dora for m in old.modules() if isinstance(m, LoRALinear))
    torch.testing.assert_close(old.state_dict(), teacher.state_dict())
