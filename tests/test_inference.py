"""Preparation for inference (``decoding.inference``, ``decoding.decode_weights``): the prepared
model decodes the same tokens as the plain one, its layouts equal ``F.linear`` in every
regime, and the original model (training, checkpoints, copies, LoRA) never sees it."""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import decoding.decode_weights as dw
from config import GPT2Config
from decoding.decode_weights import DecodeLinear, PackedLayout, WeightLayout
from decoding.inference import InferenceModel, prepare_for_inference
from engine.device import maybe_compile
from methods.lora import apply_lora
from models.generation import generate
from models.gpt2 import GPT2Model

pytestmark = pytest.mark.skipif(not dw._HAS_ONEDNN, reason="this PyTorch build has no oneDNN")


def small_model(seed: int = 0, **kw) -> GPT2Model:
    torch.manual_seed(seed)
    base = dict(vocab_size=101, max_position_embeddings=48, hidden_size=32, num_hidden_layers=2,
                num_attention_heads=4, initializer_range=0.2)
    return GPT2Model(GPT2Config(**{**base, **kw})).eval()


@pytest.fixture
def pack_small_weights(monkeypatch):
    """The tests' tiny block weights are below the size that gets packed; pack them anyway."""
    monkeypatch.setattr(dw, "PACKED_MIN_NUMEL", 0)


def block_linears(model) -> list[torch.nn.Module]:
    return [m for b in model.h for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)]


@pytest.mark.parametrize("kw", [dict(), dict(num_beams=3), dict(penalty_alpha=0.6, top_k=4),
                                dict(do_sample=True, top_k=20)])
def test_prepared_model_decodes_the_same_tokens(kw, pack_small_weights) -> None:
    model = small_model()
    fast = prepare_for_inference(model)
    assert all(isinstance(m, DecodeLinear) for m in block_linears(fast.body))
    ids = torch.randint(1, 101, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    outs = [generate(m, ids, mask, max_new_tokens=12, eos_token_id=0, generator=torch.Generator().manual_seed(3),
                     **kw) for m in (model, fast)]
    assert torch.equal(outs[0], outs[1])
    assert all(m.layout._packed for m in block_linears(fast.body))  # the packed path really ran


def test_prepared_cached_steps_equal_the_plain_forward(pack_small_weights) -> None:
    model = small_model()
    fast = prepare_for_inference(model)
    ids = torch.randint(0, 101, (2, 9))
    full = model(ids)["last_hidden_state"]
    with torch.no_grad():
        cache = fast.new_cache(2, 9)
        steps = [fast(ids[:, :5], cache=cache)["last_hidden_state"]]
        for t in range(5, 9):
            steps.append(fast(ids[:, t : t + 1], cache=cache)["last_hidden_state"])
    torch.testing.assert_close(torch.cat(steps, 1), full.detach(), rtol=1e-5, atol=1e-5)


def test_the_original_model_stays_plain_gpt2(pack_small_weights) -> None:
    """Preparing and decoding add nothing to the model: plain nn.Linear layers without
    patched methods, the same state_dict, the same parameters shared (not copied), and
    copies, pickles and training work as before."""
    model = small_model()
    keys = list(model.state_dict())
    fast = prepare_for_inference(model)
    generate(fast, torch.randint(0, 101, (1, 5)), max_new_tokens=4)
    for m in block_linears(model):
        assert type(m) is torch.nn.Linear and "forward" not in m.__dict__ and set(m.__dict__) == set(
            torch.nn.Linear(2, 2).__dict__)
    assert list(model.state_dict()) == keys
    assert fast.body.wte.weight is model.wte.weight  # shared, no second copy of the weights
    assert fast.body.h[0].mlp.c_fc.weight is model.h[0].mlp.c_fc.weight
    pickle.loads(pickle.dumps(copy.deepcopy(model)))
    model.train()
    h = model(torch.randint(0, 101, (2, 1)))["last_hidden_state"]
    model.hidden_state_to_token(h).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p is not model.wpe.weight)
    with pytest.raises(RuntimeError, match="cannot train"):
        fast.train()


@pytest.mark.parametrize("batch", [1, 3])
def test_decode_linear_equals_linear_in_every_regime(batch: int) -> None:
    """Decoding steps use the packed layout (one per row regime), prefill and anything with
    gradients use F.linear; bf16 inputs to a float32 layout fall back to F.linear."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 48)
    fast = DecodeLinear.from_linear(lin, PackedLayout(lin.weight))
    x = torch.randn(batch, 1, 32)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), F.linear(x, lin.weight, lin.bias))
        assert list(fast.layout._packed) == [1 if batch == 1 else 8]
        prefill = torch.randn(batch, 4, 32)
        fast.layout._packed.clear()
        torch.testing.assert_close(fast(prefill), F.linear(prefill, lin.weight, lin.bias))
        assert not fast.layout._packed  # prefill never touched the layout
        if dw.packing_available(lin.weight.bfloat16()):  # a bfloat16 model packs its bfloat16 weights
            lb = copy.deepcopy(lin).bfloat16()
            fb = DecodeLinear.from_linear(lb, PackedLayout(lb.weight))
            torch.testing.assert_close(fb(x.bfloat16()), F.linear(x.bfloat16(), lb.weight, lb.bias))
            assert fb.layout._packed
    xg = x.clone().requires_grad_(True)  # autograd: the plain path, gradients flow
    fast(xg).pow(2).sum().backward()
    ref = x.clone().requires_grad_(True)
    F.linear(ref, lin.weight, lin.bias).pow(2).sum().backward()
    torch.testing.assert_close(xg.grad, ref.grad)
    assert lin.weight.grad is not None


@pytest.mark.parametrize("one_row", ["transposed", "packed"])
def test_prepared_logits_equal_the_tied_embedding(one_row, monkeypatch) -> None:
    """The LM head takes a transposed copy for one row on one thread (or small width), the
    packed layout otherwise; both give F.linear's logits, and with gradients the plain path."""
    if one_row == "packed":  # what gpt2-size widths take on several threads
        monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
        monkeypatch.setattr(dw, "ONE_ROW_PACKED_MIN_D", 0)
    model = small_model()
    fast = prepare_for_inference(model)
    head = fast.head.layout
    for rows in (1, 3):
        h = torch.randn(rows, 32)
        with torch.no_grad():
            torch.testing.assert_close(fast.hidden_state_to_token(h), F.linear(h, model.wte.weight))
    assert (head.transposed._t is not None) == (one_row == "transposed")
    assert list(head.packed._packed) == ([8] if one_row == "transposed" else [1, 8])
    h = torch.randn(2, 5, 32, requires_grad=True)
    fast.hidden_state_to_token(h).sum().backward()
    assert h.grad is not None and model.wte.weight.grad is not None


def test_prepare_again_after_the_weights_change() -> None:
    """A prepared model is a snapshot; a new preparation follows the new weights."""
    model = small_model()
    h = torch.randn(1, 32)
    with torch.no_grad():
        prepare_for_inference(model).hidden_state_to_token(h)
        model.wte.weight.mul_(2.0)  # an optimizer step
        torch.testing.assert_close(prepare_for_inference(model).hidden_state_to_token(h),
                                   F.linear(h, model.wte.weight))


def test_lora_models_prepare_through_their_base_linears(pack_small_weights) -> None:
    model = small_model()
    apply_lora(model, r=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.3)
    fast = prepare_for_inference(model)
    assert all(isinstance(m.base, DecodeLinear) for m in block_linears(fast.body))
    ids = torch.randint(1, 101, (2, 6))
    assert torch.equal(generate(fast, ids, max_new_tokens=10), generate(model, ids, max_new_tokens=10))


def test_a_layout_that_replaces_the_weight_serves_every_product() -> None:
    """The inference-only seam: with ``replaces_weight`` the DecodeLinear keeps no reference to
    the original weight and the layout computes prefill too."""

    class Replacing(WeightLayout):  # a stand-in for a quantised layout: its own representation only
        replaces_weight = True

        def __init__(self, weight: torch.Tensor) -> None:
            super().__init__(weight)
            self.wt = weight.detach().t().contiguous()  # (in, out)

        def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            return x @ self.wt + bias

    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 24)
    fast = DecodeLinear.from_linear(lin, Replacing(lin.weight))
    assert fast.weight is None and fast.layout.wt.data_ptr() != lin.weight.data_ptr()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), F.linear(x, lin.weight, lin.bias))


def test_small_weights_and_compiled_models(monkeypatch) -> None:
    """Block weights below PACKED_MIN_NUMEL stay nn.Linear; a model whose forward
    maybe_compile replaced still decodes through the prepared modules."""
    model = small_model()
    fast = prepare_for_inference(model)
    assert all(type(m) is torch.nn.Linear for m in block_linears(fast.body))
    monkeypatch.setattr(dw, "PACKED_MIN_NUMEL", 0)
    maybe_compile(model, backend=lambda gm, inputs: gm.forward)
    fast = prepare_for_inference(model)
    assert prepare_for_inference(fast) is fast and isinstance(fast, InferenceModel)
    generate(fast, torch.randint(0, 101, (1, 5)), max_new_tokens=3)
    assert all(m.layout._packed for m in block_linears(fast.body))
    with pytest.raises(TypeError, match="GPT2Model"):
        prepare_for_inference(torch.nn.Linear(2, 2))


def test_decoding_rows_counts_beams_samples_and_pools():
    """The rows an inference-only model is packed for: one only for a single prompt decoded alone."""
    from decoding.inference import decoding_rows

    assert decoding_rows(1) == 1 and decoding_rows(12) == 12
    assert decoding_rows(1, num_beams=4) == 4 and decoding_rows(2, num_return_sequences=3) == 6
    assert decoding_rows(1, pooled=True) > 1


_RSS_SCRIPT = """
import sys, torch
from config import GPT2Config
from models.gpt2 import GPT2Model
from decoding.inference import prepare_for_inference
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 1024
torch.manual_seed(0)
cfg = GPT2Config(vocab_size=1000, max_position_embeddings=64, hidden_size=512, num_hidden_layers=8,
                 num_attention_heads=8)
model = GPT2Model(cfg).eval()
weights = sum(p.numel() * 4 for p in model.parameters()) / 2**20
before = rss()
fast = prepare_for_inference(model, quantize="int8", inference_only=True)
print(weights, before, rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_inference_only_int8_gives_the_released_float_weights_back_to_the_system() -> None:
    # glibc keeps freed blocks below its adaptive mmap threshold in the heap; whether the float32
    # weights land there varies from run to run (bench.py's int8 probe: 517 MiB once, 156 usually).
    # The threshold raised past every tensor puts all of them there, which makes the case certain:
    # without malloc_trim resident memory rose (322 -> 474 MiB) though the model now holds a
    # quarter of the bytes; with it, it falls (322 -> 253).
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "MALLOC_MMAP_THRESHOLD_": str(2**30)}
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT], cwd=root, capture_output=True, text=True,
                         env=env, check=True)
    weights, before, after = map(float, out.stdout.split())
    assert after < before - 0.5 * weights, (weights, before, after)
