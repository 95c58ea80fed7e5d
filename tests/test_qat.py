"""Quantisation-aware training (``methods.qat``): the straight-through gradient, the fake-quantised
weights equal to what ``--quantize`` stores, the fake-quantised forward equal to the quantised
model's forward, plain weights back after ``remove_qat``, and ``pretrain.py --qat``."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import methods.qat
from config import GPT2Config
from decoding import cpu_kernels
from decoding.decode_weights import DecodeLinear
from decoding.inference import prepare_for_inference
from decoding.quant import QuantizationUnavailable, dequantize_int4, dequantize_int8, quantize_int4
from methods.qat import FakeQuantize, apply_qat, fake_quantize, has_qat, remove_qat
from methods.restore import load_model
from models.gpt2 import GPT2Model
from models.sonnet_gpt import SonnetGPT
from pretrain import main as pretrain_main
from tasks.lm import causal_lm_loss


def small_model(width: int = 128, seed: int = 0) -> GPT2Model:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=300, max_position_embeddings=64, hidden_size=width, num_hidden_layers=2,
                     num_attention_heads=4, initializer_range=0.2)
    return GPT2Model(cfg).eval()


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.hidden_state_to_token(model(ids)["last_hidden_state"])


@pytest.mark.parametrize("bits", [8, 4])
def test_straight_through_gradient(bits: int) -> None:
    """The forward sees the rounded weight; the float weight gets the gradient the rounded one would."""
    w = nn.Parameter(torch.randn(16, 256))
    g = torch.randn(16, 256)
    fq = FakeQuantize(bits)(w)
    assert torch.equal(fq, fake_quantize(w, bits)) and not torch.equal(fq, w)
    (fq * g).sum().backward()
    assert torch.equal(w.grad, g)


@pytest.mark.parametrize("choice", ["int8", "int4"])
def test_model_gradients_are_those_of_the_rounded_model(choice: str) -> None:
    model = small_model()
    rounded = copy.deepcopy(model)
    apply_qat(model, choice)
    with torch.no_grad():  # the same model with its weights rounded once, no QAT
        for name, b in rounded.named_modules():
            if isinstance(b, (nn.Linear, nn.Embedding)):
                b.weight.copy_(model.get_submodule(name).weight)
    ids = torch.randint(0, 300, (2, 12))
    for m in (model, rounded):
        m.hidden_state_to_token(m(ids)["last_hidden_state"]).logsumexp(-1).sum().backward()
    grads = {name.replace("parametrizations.weight.original", "weight"): p.grad for name, p in model.named_parameters()}
    for name, p in rounded.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6)


def test_the_tied_embedding_is_rounded_once_per_training_forward(monkeypatch) -> None:
    """The tied embedding serves the input lookup and the LM head: one rounding of it per forward
    and loss (``causal_lm_loss``, what pretraining trains and evaluates with), with the loss and
    gradients of rounding it at each use, bit for bit."""
    rounded: list[tuple[int, ...]] = []

    def counting(w: torch.Tensor, bits: int, group: int = 128) -> torch.Tensor:
        rounded.append(tuple(w.shape))
        return fake_quantize(w, bits, group)

    monkeypatch.setattr(methods.qat, "fake_quantize", counting)
    lm = SonnetGPT(small_model())
    apply_qat(lm, "int8")
    ids = torch.randint(0, 300, (2, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    grads = []
    for loss_fn in (causal_lm_loss, lambda m, b: m.loss(b["input_ids"], b["attention_mask"])):  # cached, each use
        rounded.clear()
        loss = loss_fn(lm, batch)
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in lm.parameters()]))
        lm.zero_grad()
        calls = rounded.count(tuple(lm.gpt.wte.parametrizations.weight.original.shape))
        assert calls == (1 if loss_fn is causal_lm_loss else 2)
    (cached_loss, cached), (loss, each_use) = grads
    assert torch.equal(cached_loss, loss) and all(torch.equal(a, b) for a, b in zip(cached, each_use, strict=True))


def test_parameters_keep_their_identity_and_come_back_plain() -> None:
    model = small_model()
    params = list(model.parameters())
    names = list(model.state_dict())
    apply_qat(model, "int8")
    assert has_qat(model) and {id(p) for p in model.parameters()} == {id(p) for p in params}
    remove_qat(model)
    assert not has_qat(model) and list(model.state_dict()) == names
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))


def prepared_weights(model: GPT2Model, choice: str) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The dequantised weights the layouts of ``prepare_for_inference(model, quantize=choice)`` store:
    the block linears', and the tied head's."""
    fast = prepare_for_inference(model, quantize=choice)
    blocks = []
    for m in fast.body.h.modules():
        if isinstance(m, DecodeLinear):
            layout = m.layout
            if choice == "int8":
                blocks.append(dequantize_int8(layout.q, layout.scale))
            else:  # unpack what the kernel stores by multiplying the identity through it
                blocks.append(layout.matmul(torch.eye(layout.packed.size(1) * 2), None).T.float())
    head = fast.head.layout.inner
    return blocks, dequantize_int8(head.q, head.scale)


@pytest.mark.parametrize("choice", ["int8", "int4"])
def test_fake_quantised_weights_are_the_exported_ones(choice: str) -> None:
    model = small_model()
    apply_qat(model, choice)
    fake = [m.weight.detach().clone() for m in model.h.modules() if isinstance(m, nn.Linear)]
    fake_head = model.wte.weight.detach().clone()
    remove_qat(model)
    blocks, head = prepared_weights(model, choice)
    assert torch.equal(fake_head, head)  # int8 in both cases, bit for bit
    for a, b in zip(fake, blocks, strict=True):
        if choice == "int8":
            assert torch.equal(a, b)
        else:  # read back through the kernel: bfloat16 products of exact bfloat16-representable values
            torch.testing.assert_close(a, b, rtol=0, atol=1e-2 * a.abs().max().item())


def test_fake_quantised_forward_equals_the_int8_model() -> None:
    model = small_model()
    ids = torch.randint(0, 300, (2, 40))  # 80 rows: the float32 product of the dequantised int8 weights
    apply_qat(model, "int8")
    trained, step = logits(model, ids), logits(model, ids[:1, :1])
    remove_qat(model)
    fast = prepare_for_inference(model, quantize="int8")
    torch.testing.assert_close(logits(fast, ids), trained, rtol=1e-5, atol=1e-4)  # summation order only
    if cpu_kernels.unavailable() is None:  # a decoding step of one row: the project's float32 kernel
        torch.testing.assert_close(logits(fast, ids[:1, :1]), step, rtol=1e-5, atol=1e-5)
    assert (logits(model, ids) - trained).abs().max() > 1e-3  # the float model does differ


def test_fake_quantised_forward_matches_the_int4_model_up_to_its_bfloat16_activations() -> None:
    model = small_model()
    ids = torch.randint(0, 300, (2, 16))
    apply_qat(model, "int4")
    trained = logits(model, ids)
    remove_qat(model)
    real = logits(prepare_for_inference(model, quantize="int4"), ids)
    float_gap = (logits(model, ids) - real).norm()
    assert (trained - real).norm() < 0.1 * float_gap


def test_int4_needs_whole_groups() -> None:
    with pytest.raises(QuantizationUnavailable, match="--qat int4"):
        apply_qat(small_model(width=64), "int4")
    assert apply_qat(small_model(width=64), "none") is not None


def test_pretrain_cli_trains_quantisation_aware_and_saves_plain_weights(tmp_path) -> None:
    corpus = tmp_path / "poems.txt"
    corpus.write_text("Shall I compare thee to a summer's day?\nThou art more lovely and more temperate.\n" * 12)
    out = tmp_path / "qat"
    pretrain_main(["--corpus", str(corpus), "--model_size", "tiny", "--random_init", "--epochs", "1", "--max_length",
                   "32", "--limit", "6", "--lr", "1e-3", "--output_dir", str(out), "--no_progress", "--device", "cpu",
                   "--qat", "int4"])
    saved = torch.load(out / "model.pt", weights_only=True)["model"]
    assert not any("parametrizations" in k for k in saved)
    model = load_model(out / "model.pt")
    assert isinstance(model, GPT2Model) and not has_qat(model)
    w = model.h[0].mlp.c_fc.weight
    assert not torch.equal(w, dequantize_int4(*quantize_int4(w)))  # the float weights, not their rounding
