"""The project's CPU decoding kernel (``decoding.cpu_kernels``): exact float32 products of int8
and bfloat16 weights, the layouts that use it, and every way it can be unavailable."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from decoding import cpu_kernels
from decoding.quant import Bf16Layout, Int8Layout, RefinedHead, dequantize_int8, quantize_int8

runs_here = pytest.mark.skipif(cpu_kernels.platform_reason() is not None,
                               reason=f"not this machine: {cpu_kernels.platform_reason()}")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@runs_here
def test_the_kernel_builds_on_a_machine_that_can_run_it() -> None:
    # Only the platform check may skip: a failed build here fails the test.
    assert cpu_kernels.unavailable() is None


def isas() -> list[str]:
    """The instruction sets this CPU can run the kernel with (the best one is used by default)."""
    if cpu_kernels.platform_reason() is not None:
        return []
    return {"AVX512": ["avx2", "avx512"], "AVX2": ["avx2"]}[torch.backends.cpu.get_cpu_capability()]


@runs_here
@pytest.mark.parametrize("isa", isas())
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("width", [768, 100, 64 * 3 + 16 + 5])  # whole 64-byte lines, and tails of both loops
@pytest.mark.parametrize("kind", ["int8", "bf16"])
def test_products_equal_float32_products_of_the_stored_weights(kind: str, width: int, rows: int, isa: str) -> None:
    g = torch.Generator().manual_seed(width * 10 + rows)
    w = torch.randn(150, width, generator=g)
    x = torch.randn(rows, width, generator=g)
    bias = torch.randn(150, generator=g)
    if kind == "int8":
        q, scale = quantize_int8(w)
        stored, expected = q, F.linear(x.double(), dequantize_int8(q, scale).double(), bias.double())
        y = cpu_kernels.lowbit_linear(x, q, scale, bias, isa)
    else:
        stored = w.to(torch.bfloat16)
        expected = F.linear(x.double(), stored.double(), bias.double())
        y = cpu_kernels.lowbit_linear(x, stored, None, bias, isa)
    assert cpu_kernels.serves(x, stored)
    assert y.dtype == torch.float32 and y.shape == (rows, 150)
    # float32 accumulation of exact products: far tighter than bfloat16 activations (~4e-3)
    assert ((y.double() - expected).abs().max() / expected.abs().max()).item() < 1e-6


@runs_here
def test_the_widest_instruction_set_is_used_and_a_missing_one_is_refused() -> None:
    module = cpu_kernels._load()[0]
    assert module.best_isa() == isas()[-1]
    if "avx512" not in isas():
        with pytest.raises(RuntimeError, match="cannot run the avx512 kernel"):
            cpu_kernels.lowbit_linear(torch.zeros(1, 64), torch.zeros(4, 64, dtype=torch.bfloat16), isa="avx512")
    with pytest.raises(RuntimeError, match="cannot run the sse kernel"):
        cpu_kernels.lowbit_linear(torch.zeros(1, 64), torch.zeros(4, 64, dtype=torch.bfloat16), isa="sse")


@runs_here
def test_leading_dims_kept_and_non_contiguous_inputs_accepted() -> None:
    q, scale = quantize_int8(torch.randn(40, 64))
    x = torch.randn(64, 2, 3).permute(1, 2, 0)  # (2, 3, 64), not contiguous
    y = cpu_kernels.lowbit_linear(x, q, scale)
    assert y.shape == (2, 3, 40)
    assert torch.allclose(y, F.linear(x, dequantize_int8(q, scale)), rtol=1e-5, atol=1e-5)


@runs_here
def test_serves_only_what_it_computes() -> None:
    q = torch.zeros(4, 64, dtype=torch.int8)
    assert cpu_kernels.serves(torch.zeros(8, 64), q)
    assert not cpu_kernels.serves(torch.zeros(9, 64), q)  # prefill: PyTorch's kernels
    assert not cpu_kernels.serves(torch.zeros(1, 64, dtype=torch.bfloat16), q)
    assert not cpu_kernels.serves(torch.zeros(1, 64), q.float())
    x = torch.zeros(1, 64, requires_grad=True)
    assert not cpu_kernels.serves(x, q)  # no backward: training goes elsewhere
    with torch.no_grad():
        assert cpu_kernels.serves(x, q)


@runs_here
def test_int8_layout_uses_the_kernel_and_is_closer_to_float32_than_pytorchs_kernel() -> None:
    torch.manual_seed(0)
    w, x = torch.randn(300, 256), torch.randn(1, 256)
    layout = Int8Layout(w)
    exact = F.linear(x.double(), dequantize_int8(layout.q, layout.scale).double())
    assert layout.float32_products(x)
    ours = layout.matmul(x, None)
    aten = torch.ops.aten._weight_int8pack_mm(x.bfloat16(), layout.q, layout.scale.bfloat16()).float()
    assert rel_err(ours, exact) < 1e-6 < 1e-3 < rel_err(aten, exact)  # PyTorch's rounds the activations to bfloat16


@runs_here
@pytest.mark.parametrize("kind", ["int8", "bf16"])
def test_a_kernel_served_head_needs_no_refining(kind: str, monkeypatch) -> None:
    torch.manual_seed(1)
    w, x = torch.randn(1000, 128), torch.randn(1, 128)
    inner = Int8Layout(w) if kind == "int8" else Bf16Layout(w, role="head")
    head = RefinedHead(inner)
    monkeypatch.setattr(torch.Tensor, "topk", lambda *a, **k: pytest.fail("refined a float32 product"))
    assert torch.equal(head.matmul(x, None), inner.matmul(x, None))


@pytest.mark.parametrize("kind", ["int8", "bf16"])
def test_turned_off_the_layouts_fall_back_to_pytorchs_kernels(kind: str, fresh_kernel_state) -> None:
    fresh_kernel_state.setenv("GPT2_CPU_KERNELS", "0")
    assert cpu_kernels.unavailable() == "turned off by GPT2_CPU_KERNELS=0"
    torch.manual_seed(2)
    w, x = torch.randn(200, 128), torch.randn(1, 128)
    layout = Int8Layout(w) if kind == "int8" else Bf16Layout(w, role="head")
    assert not layout.float32_products(x) and not cpu_kernels.serves(x, torch.zeros(1, 128, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="unavailable: turned off"):
        cpu_kernels.lowbit_linear(x, torch.zeros(1, 128, dtype=torch.int8), torch.ones(1))
    reference = dequantize_int8(layout.q, layout.scale) if kind == "int8" else w.bfloat16().float()
    assert rel_err(RefinedHead(layout).matmul(x, None), F.linear(x, reference)) < 1e-2  # bfloat16 activations


@runs_here
def test_a_failed_build_says_why_once_and_pytorchs_kernels_serve(fresh_kernel_state, capsys) -> None:
    from torch.utils import cpp_extension

    def broken(*args, **kwargs):
        raise RuntimeError("Error building extension 'gpt2_lowbit': g++ not found\nmore detail")

    fresh_kernel_state.setattr(cpp_extension, "load", broken)
    reason = cpu_kernels.unavailable()
    assert reason.startswith("could not compile lowbit_matvec.cpp "
                             "(Error building extension 'gpt2_lowbit': g++ not found)")
    assert cpu_kernels.unavailable() == reason  # looked up once
    assert capsys.readouterr().err.count("warning: could not compile") == 1
    torch.manual_seed(3)
    layout = Int8Layout(torch.randn(64, 128))
    x = torch.randn(1, 128)
    assert not layout.float32_products(x)
    assert rel_err(layout.matmul(x, None), F.linear(x, dequantize_int8(layout.q, layout.scale))) < 1e-2


def test_an_unsupported_machine_is_named(fresh_kernel_state) -> None:
    fresh_kernel_state.setattr(cpu_kernels.platform, "machine", lambda: "arm64")
    assert "x86-64 Linux" in cpu_kernels.unavailable() and "arm64" in cpu_kernels.unavailable()
    fresh_kernel_state.undo()
    cpu_kernels._load.cache_clear()
    fresh_kernel_state.setattr(cpu_kernels.sys, "platform", "linux")
    fresh_kernel_state.setattr(cpu_kernels.platform, "machine", lambda: "x86_64")
    fresh_kernel_state.setattr(cpu_kernels.torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert cpu_kernels.unavailable() == "the kernel needs AVX2 or AVX-512; this CPU offers DEFAULT"


def test_a_copy_without_the_source_says_so_and_decodes(fresh_kernel_state, tmp_path) -> None:
    fresh_kernel_state.setattr(cpu_kernels, "SOURCE", tmp_path / "csrc" / "lowbit_matvec.cpp")
    fresh_kernel_state.setattr(cpu_kernels.sys, "platform", "linux")
    fresh_kernel_state.setattr(cpu_kernels.platform, "machine", lambda: "x86_64")
    fresh_kernel_state.setattr(cpu_kernels.torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert "is missing" in cpu_kernels.unavailable()
    layout = Int8Layout(torch.randn(32, 64))
    x = torch.randn(1, 64)
    assert rel_err(layout.matmul(x, None), F.linear(x, dequantize_int8(layout.q, layout.scale))) < 1e-2


@runs_here
@pytest.mark.parametrize("quantize", ["int8", "bf16"])
def test_decoding_goes_through_the_kernel_and_matches_float32_on_the_rounded_weights(quantize: str,
                                                                                     monkeypatch) -> None:
    from config import GPT2Config
    from decoding.inference import prepare_for_inference
    from models.generation import generate
    from models.gpt2 import GPT2Model

    torch.manual_seed(4)
    cfg = GPT2Config(vocab_size=300, max_position_embeddings=64, hidden_size=128, num_hidden_layers=2,
                     num_attention_heads=4, initializer_range=0.2)
    model = GPT2Model(cfg).eval()
    rounded = GPT2Model(cfg).eval()  # float32, holding the weights as the layout stores them
    rounded.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if p.dim() == 2 and not name.startswith("wpe"):
                p.copy_(dequantize_int8(*quantize_int8(p)) if quantize == "int8" else p.bfloat16().float())
    calls = []
    real = cpu_kernels.lowbit_linear
    monkeypatch.setattr(cpu_kernels, "lowbit_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    fast = prepare_for_inference(model, quantize=quantize, inference_only=True)
    ids = torch.randint(0, 300, (1, 6))
    assert torch.equal(generate(fast, ids, max_new_tokens=10), generate(rounded, ids, max_new_tokens=10))
    assert len(calls) >= 9 * (4 * 2 + 1)  # every block product and the head, at each one-row step
