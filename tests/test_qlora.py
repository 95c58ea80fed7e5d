"""QLoRA from the command line (``--quantize_base``): adapters over a frozen base stored in int8 or
int4, its forward and backward the float layer's on the dequantised weight, the flag refused where
no adapter sits on the base, the setting saved with the run, and decoding merging into the
dequantised base."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import classifier
from cli.common import run_main
from decoding.quant import Int8Linear
from engine.checkpoints import load_checkpoint
from engine.resume import changed_settings
from methods import fine_tune, qlora
from methods.fine_tune import FineTuneConfig, LoraConfig
from methods.lora import LoRALinear, apply_lora, lora_modules
from methods.qlora import Int4Linear


def linear(n_in: int = 64, n_out: int = 48) -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(n_in, n_out)
    with torch.no_grad():
        layer.weight.add_(torch.linspace(-0.3, 0.5, n_in))  # an offset per input column: asymmetric groups
    return layer


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_quantised_base_is_the_float_layer_on_its_dequantised_weight(kind):
    base = qlora.base_layer_for(kind)(linear())
    w = base.weight
    assert isinstance(base, Int8Linear if kind == "int8" else Int4Linear) and not any(
        p.requires_grad for p in base.parameters())
    step = (linear().weight - w).abs().max()
    assert 0 < step < (0.02 if kind == "int8" else 0.1)  # stored on a grid, close to the float weight
    x = torch.randn(3, 5, 64, requires_grad=True)
    y = base(x)
    ref_x = x.detach().clone().requires_grad_(True)
    ref = nn.functional.linear(ref_x, w, base.bias)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, ref_x.grad)
    stored = sum(b.numel() * b.element_size() for b in base.buffers())
    assert stored < w.numel() * 4 / (3.5 if kind == "int8" else 6.0)  # bytes: float32's over 4 or 8, plus scales


def test_the_choices_are_the_same_in_the_registry_and_the_method():
    assert fine_tune.QUANTIZE_BASE == qlora.QUANTIZE_BASE
    with pytest.raises(ValueError, match="quantize_base must be one of"):
        LoraConfig(quantize_base="nf4")


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_adapters_train_and_fold_into_the_dequantised_base(kind):
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    apply_lora(model, ["0", "2"], r=4, quantize_base=kind)
    layers = lora_modules(model)
    assert len(layers) == 2 and all(not isinstance(m.base, nn.Linear) for m in layers)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(8, 32)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()
    assert all(m.lora_B.abs().sum() > 0 for m in layers)  # the adapters trained
    want = model(x)
    for i, m in ((0, layers[0]), (2, layers[1])):
        model[i] = m.folded()
    assert all(type(m) is nn.Linear for m in (model[0], model[2]))
    torch.testing.assert_close(model(x), want, atol=1e-5, rtol=1e-5)


def test_quantize_base_reaches_the_model_and_is_saved_with_the_run(tmp_path, classifier_cli):
    metrics = classifier.main(classifier_cli("lora", "--quantize_base", "int4", "--dataset", "sst"))
    assert 0 <= metrics["sst"]["accuracy"] <= 1
    best = next((tmp_path / "runs").rglob("best.pt"))
    saved = load_checkpoint(best)["extra"]["fine_tune"]
    assert saved == {"mode": "lora", "adapter": {**saved["adapter"], "quantize_base": "int4"}}
    rebuilt = FineTuneConfig.from_dict(saved)
    assert rebuilt.adapter.quantize_base == "int4"
    model = nn.Sequential(nn.Linear(32, 32))
    model.head = ()
    config = FineTuneConfig("lora", LoraConfig(targets=("0",), quantize_base="int8"))
    fine_tune.set_fine_tune_mode(model, config, ())
    assert isinstance(model[0], LoRALinear) and isinstance(model[0].base, Int8Linear)


@pytest.mark.parametrize("mode", ["full-model", "last-linear-layer"])
def test_quantize_base_without_adapters_is_one_line_before_any_work(mode, classifier_cli, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["classifier.py", *classifier_cli(mode, "--quantize_base", "int8")])
    with pytest.raises(SystemExit) as e:
        run_main(classifier.main)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --quantize_base int8 quantises the frozen base under LoRA/DoRA adapters: add "
                   "--fine-tune-mode lora"]


def test_runs_saved_before_the_qlora_and_reft_flags_resume_unchanged():
    """A checkpoint from before ``--quantize_base`` and ``--reft_*`` holds neither: it trained on a
    float base and in no ReFT mode, so the flags' values now are no change (unless quantised)."""
    now = {"lr": 1e-3, "fine_tune_mode": "lora", "optimizer": "adamw", "quantize_base": "none", "reft_rank": 4,
           "reft_layers": "all", "reft_positions": "f4"}
    saved = {"lr": 1e-3, "fine_tune_mode": "lora"}
    assert changed_settings(saved, now) == []
    assert changed_settings(saved, {**now, "quantize_base": "int8"}) == ["quantize_base 'none' -> 'int8'"]


def test_int4_values_are_packed_two_per_byte_and_unpack_exactly():
    q = torch.randint(0, 16, (6, 64), dtype=torch.int32)
    packed = qlora.pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (6, 32)
    assert torch.equal(qlora.unpack_int4(packed), q.to(torch.uint8))
