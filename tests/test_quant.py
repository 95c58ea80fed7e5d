"""Weight-only quantisation (``decoding.quant``) and inference-only preparation
(``decoding.inference``): quantisation round trips, layout products close to float, a quantised
model's logits close to the float model's, the original weights released in inference-only
mode with the same tokens decoded, and ``--quantize`` validated before any work."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import decoding.decode_weights as dw
from cli.common import run_main
from cli.decoding import add_inference_args
from config import GPT2Config
from decoding import cpu_kernels
from decoding.inference import held_bytes, prepare_for_decoding, prepare_for_inference
from decoding.quant import (
    KERNEL_BF16_ROWS,
    Int4Layout,
    Int8Layout,
    QuantizationUnavailable,
    dequantize_int4,
    dequantize_int8,
    quantize_int4,
    quantize_int8,
)
from models.generation import generate
from models.gpt2 import GPT2Model

needs_onednn = pytest.mark.skipif(not dw._HAS_ONEDNN, reason="this PyTorch build has no oneDNN")


def model_of(width: int = 128, seed: int = 0) -> GPT2Model:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=300, max_position_embeddings=64, hidden_size=width, num_hidden_layers=2,
                     num_attention_heads=4, initializer_range=0.2)
    return GPT2Model(cfg).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_int8_round_trip_is_within_half_a_step() -> None:
    w = torch.randn(64, 256) * torch.rand(64, 1) * 3  # rows of different ranges
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (64,)
    err = (dequantize_int8(q, scale) - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-6).all()
    assert (q.abs().amax(1) == 127).all()  # each row's extreme hits the end of the range


def test_int4_round_trip_is_within_half_a_step() -> None:
    w = torch.randn(32, 256)
    q, sz = quantize_int4(w, 128)
    assert q.min() >= 0 and q.max() <= 15 and sz.shape == (2, 32, 2)
    step = sz[..., 0].t().repeat_interleave(128, dim=1)  # (out, in): each weight's group scale
    assert ((dequantize_int4(q, sz, 128) - w).abs() <= step / 2 + 1e-5).all()
    with pytest.raises(QuantizationUnavailable, match="divisible by 128"):
        quantize_int4(torch.randn(4, 96), 128)


def offset_groups(n: int = 64, k: int = 512, group: int = 128, seed: int = 0) -> torch.Tensor:
    """(n, k) weights whose groups of ``group`` inputs sit around offsets of up to +-4 (a bias-like
    shift per group), the case where bfloat16 rounding of the zero moves the whole grid."""
    g = torch.Generator().manual_seed(seed)
    offsets = (torch.rand(n, k // group, 1, generator=g) - 0.5) * 8
    return (torch.randn(n, k // group, group, generator=g) * 0.5 + offsets).reshape(n, k)


def test_int4_rounds_against_the_scale_and_zero_the_kernel_stores() -> None:
    w = offset_groups()
    q, sz = quantize_int4(w, 128)
    assert torch.equal(sz, sz.to(torch.bfloat16).float())  # already what the kernel holds: nothing rounds later
    step = sz[..., 0].t().repeat_interleave(128, dim=1)  # (out, in): each weight's stored group scale
    err = (dequantize_int4(q, sz, 128) - w).abs() / step  # in stored quantisation steps
    assert err.max() <= 0.5 + 1e-3, err.max()


@pytest.mark.skipif(not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"), reason="no int4 CPU kernel")
def test_int4_kernel_reconstructs_offset_groups_within_half_a_step() -> None:
    w = offset_groups(256, 384)
    layout = Int4Layout(w)
    q, sz = quantize_int4(w)
    assert torch.equal(layout.scale_zero.float(), sz)
    # The identity's rows (exact in bfloat16) read back the weights as the kernel reconstructs them.
    seen = layout.matmul(torch.eye(384), None).t()  # (out, in)
    step = sz[..., 0].t().repeat_interleave(128, dim=1)
    err = ((seen - w).abs() - w.abs() * 2**-8) / step  # less the rounding of the kernel's bfloat16 output
    assert err.max() <= 0.5 + 1e-3, err.max()


@pytest.mark.parametrize("rows", [1, 8, 100])  # the kernel (decoding) and dequantise (prefill) paths
def test_int8_layout_product_is_close_to_float(rows: int) -> None:
    torch.manual_seed(0)
    w, b, x = torch.randn(384, 256), torch.randn(384), torch.randn(rows, 256)
    layout = Int8Layout(w)
    y = layout.matmul(x, b)
    assert y.dtype == torch.float32 and y.shape == (rows, 384)
    assert rel_err(y, F.linear(x, dequantize_int8(layout.q, layout.scale), b)) < 5e-3  # bf16 activations only
    assert rel_err(y, F.linear(x, w, b)) < 1.5e-2
    ids = torch.tensor([[3, 5]])
    torch.testing.assert_close(layout.lookup(ids), dequantize_int8(layout.q, layout.scale)[ids])


@pytest.mark.parametrize("rows", [1, 8, 100])
def test_int4_layout_product_is_close_to_its_dequantised_weight(rows: int) -> None:
    torch.manual_seed(0)
    w, x = torch.randn(256, 384), torch.randn(2, rows, 384)
    y = Int4Layout(w).matmul(x, None)
    q, sz = quantize_int4(w)
    assert y.shape == (2, rows, 256)
    assert rel_err(y, F.linear(x, dequantize_int4(q, sz))) < 5e-3
    assert rel_err(y, F.linear(x, w)) < 0.15  # 4 bits per weight: ~10% of each weight


def rounded_copy(model: GPT2Model, quantize: str) -> GPT2Model:
    """A float model holding the weights as ``quantize`` rounds them: what the layouts should compute."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if name.startswith("h.") and name.endswith("weight") and p.dim() == 2:
                four = quantize == "int4"
                rounded = dequantize_int4(*quantize_int4(p)) if four else dequantize_int8(*quantize_int8(p))
                p.copy_(rounded)
        out.wte.weight.copy_(dequantize_int8(*quantize_int8(out.wte.weight)))
    return out


@pytest.mark.parametrize("quantize,bound,bound_rounded", [("bf16", 0.02, 0.02), ("int8", 0.03, 0.02),
                                                          ("int4", 0.45, 0.02)])
def test_quantised_model_logits_are_close_to_float(quantize: str, bound: float, bound_rounded: float) -> None:
    """On a random model only the logits are compared (its greedy tokens are near ties). Its
    Gaussian weights are int4's worst case (~30% logit error at this width); against a float
    model holding the rounded weights only the kernels' bf16 activations differ."""
    model = model_of()
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        ref = model.hidden_state_to_token(model(ids)["last_hidden_state"])
        rounded = model if quantize == "bf16" else rounded_copy(model, quantize)
        ref_rounded = rounded.hidden_state_to_token(rounded(ids)["last_hidden_state"])
        fast = prepare_for_inference(model, quantize=quantize)
        cache = fast.new_cache(2, 12)
        pre = fast.hidden_state_to_token(fast(ids[:, :8], cache=cache)["last_hidden_state"])  # prefill
        steps = [fast.hidden_state_to_token(fast(ids[:, i : i + 1], cache=cache)["last_hidden_state"])
                 for i in range(8, 12)]  # one-row decoding steps
    got = torch.cat([pre, *steps], 1)
    assert 0 < rel_err(got, ref) < bound and rel_err(got, ref_rounded) < bound_rounded


def test_int4_reports_what_it_cannot_do() -> None:
    with pytest.raises(QuantizationUnavailable, match="divisible by 128"):
        prepare_for_inference(model_of(width=64), quantize="int4")
    with pytest.raises(ValueError, match="quantize must be one of"):
        prepare_for_inference(model_of(), quantize="int3")


@pytest.mark.parametrize("quantize", [pytest.param("none", marks=needs_onednn),
                                      pytest.param("bf16", marks=needs_onednn), "int8", "int4"])
@pytest.mark.parametrize("decode_rows", [1, 2, 8])
def test_inference_only_releases_the_original_weights_and_decodes_the_same(quantize: str, decode_rows: int,
                                                                           monkeypatch) -> None:
    monkeypatch.setattr(dw, "PACKED_MIN_NUMEL", 0)  # the float layouts would leave small weights alone
    model = model_of()
    ids = torch.randint(0, 300, (2, 5))
    beside = prepare_for_inference(model, quantize=quantize)
    expected = generate(beside, ids, max_new_tokens=12)
    before = held_bytes(model)
    if quantize == "none":  # without inference_only the packed copies sit beside the shared originals
        assert held_bytes(beside) > 1.8 * before
    fast = prepare_for_inference(model, quantize=quantize, inference_only=True, decode_rows=decode_rows)
    layouts = [getattr(m.layout, "inner", m.layout) for m in fast.modules() if hasattr(m, "layout")]  # bf16 wraps
    packed = [la for la in layouts if isinstance(la, dw.StandalonePackedLayout)]
    bf16_kernel = cpu_kernels.unavailable() is None and decode_rows <= KERNEL_BF16_ROWS  # keeps the rows
    assert len(packed) == (4 * len(model.h) if quantize == "none" or (quantize == "bf16" and not bf16_kernel)
                           else 0)
    assert {p.hint for p in packed} <= {1 if decode_rows == 1 else 8}  # packed for the batch it will decode
    linear_and_embedding = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                               if n.endswith("weight") and p.dim() == 2 and not n.startswith("wpe"))
    assert linear_and_embedding == 0 and held_bytes(model) < 0.05 * before  # released, not just unreferenced
    assert held_bytes(fast) <= before  # one copy of each weight (bf16 / int8 / int4 far less)
    assert not any(isinstance(m, torch.nn.Embedding) and m.weight.numel() > 64 * 128
                   for m in fast.modules() if m is not fast.body.wpe)
    assert torch.equal(generate(fast, ids, max_new_tokens=12), expected)


def parse(argv: list[str]):
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--generate_only", action="store_true")
    add_inference_args(p)
    return p.parse_args(argv)


def test_quantize_flag_is_validated(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        parse(["--quantize", "int3"])
    assert e.value.code == 2 and "invalid choice: 'int3'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # no int4 kernel fits a width of 64: refused before decoding
        run_main(lambda: prepare_for_decoding(model_of(width=64), parse(["--quantize", "int4"]).quantize))
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: --quantize int4: ")
    model = model_of()
    fast = prepare_for_decoding(model, parse(["--quantize", "int8"]).quantize, inference_only=True)
    assert isinstance(fast.head.layout.inner, Int8Layout) and model.wte.weight.numel() == 0


def test_sonnet_generation_takes_the_flag() -> None:
    from sonnet_generation import get_args

    assert get_args(["--quantize", "int8"]).quantize == "int8"
    with pytest.raises(SystemExit) as e:
        get_args(["--quantize", "fp8"])
    assert e.value.code == 2


def test_inference_only_folds_lora_adapters_in() -> None:
    from methods.lora import apply_lora

    model = model_of()
    apply_lora(model, r=2)
    with pytest.raises(ValueError, match="unwrap_lora"):
        prepare_for_inference(copy.deepcopy(model), quantize="int8")
    fast = prepare_for_decoding(model, "int8")
    generate(fast, torch.randint(0, 300, (1, 4)), max_new_tokens=3)


def test_bf16_rounds_only_the_weights_and_the_products_inputs() -> None:
    """--quantize bf16 keeps float32 around the products (residual stream, LayerNorm, attention,
    logits): its logits are closer to float32 than a whole-model bfloat16 cast's."""
    model = model_of(width=256)
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        ref = model.hidden_state_to_token(model(ids)["last_hidden_state"])
        fast = prepare_for_inference(model, quantize="bf16")
        hidden = fast(ids)["last_hidden_state"]
        got = fast.hidden_state_to_token(hidden)
        cast = copy.deepcopy(model).bfloat16()
        whole = cast.hidden_state_to_token(cast(ids)["last_hidden_state"])
    assert hidden.dtype == torch.float32 and got.dtype == torch.float32
    assert all(p.dtype == torch.float32 for n, p in fast.named_parameters() if "ln" in n)
    assert rel_err(got, ref) < 0.8 * rel_err(whole, ref)  # 0.0149 against 0.0206 here


@pytest.mark.parametrize("quantize", ["bf16", "int8"])
def test_low_precision_head_refines_its_top_logits_in_float32(quantize: str, fresh_kernel_state) -> None:
    """PyTorch's head kernels return bfloat16 logits (ties and swaps near the top); the top
    REFINED_LOGITS of each row are the float32 dot products with the head's own rounded rows,
    so greedy decoding picks what float32 arithmetic on those weights picks. (The project's
    kernel computes float32 logits and needs no refining: tests/test_cpu_kernels.py.)"""
    from decoding.quant import REFINED_LOGITS, RefinedHead

    fresh_kernel_state.setenv("GPT2_CPU_KERNELS", "0")  # the path that refines

    torch.manual_seed(0)
    w = torch.randn(5000, 256) * 0.5
    x = torch.randn(3, 1, 256)
    fast = prepare_for_inference(model_of(width=256), quantize=quantize)
    assert isinstance(fast.head.layout, RefinedHead)
    layout = type(fast.head.layout)(fast.head.layout.inner.__class__(w, "head") if quantize == "bf16"
                                    else Int8Layout(w))
    rounded = layout.lookup(torch.arange(5000))  # (V, d) float32: the weights as the head holds them
    exact = x @ rounded.t()
    assert not layout.inner.float32_products(x)
    y = layout.matmul(x, None)
    unrefined = layout.inner.matmul(x, None)
    top = unrefined.topk(REFINED_LOGITS, dim=-1).indices  # the candidates the head refines
    torch.testing.assert_close(y.gather(-1, top), exact.gather(-1, top), rtol=1e-5, atol=1e-5)
    assert torch.equal(y.argmax(-1), exact.argmax(-1))
    assert not torch.equal(unrefined.gather(-1, top), exact.gather(-1, top))  # bfloat16 logits alone differ
