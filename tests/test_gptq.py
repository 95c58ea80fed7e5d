"""GPTQ (``decoding.gptq``): round-to-nearest's integers when the Hessian is the identity, a
smaller output error than round-to-nearest on correlated inputs, the error feedback equal to
re-solving the remaining columns by least squares after each rounding (a brute-force reference),
the stored format served by ``decoding.quant``'s layouts and kernels, and ``--quantize
int8-gptq|int4-gptq`` from the command line."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

import generate as cli
from config import GPT2Config, get_config
from decoding.decode_weights import DecodeLinear
from decoding.gptq import Calibration, dequantize, gptq_layouts, gptq_model, gptq_quantize, hessian
from decoding.inference import prepare_for_decoding, prepare_for_inference
from decoding.quant import Int4Layout, Int8Layout, quantize_int4, quantize_int8
from methods.restore import save_model
from models.generation import generate, trim
from models.gpt2 import GPT2Model

RTN = {8: quantize_int8, 4: quantize_int4}
ROOT = Path(__file__).resolve().parents[1]


def correlated_inputs(n: int, k: int, rank: int = 16, seed: int = 0) -> torch.Tensor:
    """(n, k) inputs that mostly live in ``rank`` directions, as a transformer's do."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, rank, generator=g) @ torch.randn(rank, k, generator=g) + 0.1 * torch.randn(n, k, generator=g)


@pytest.mark.parametrize("bits", [8, 4])
def test_identity_hessian_gives_round_to_nearest(bits: int) -> None:
    """Uncorrelated inputs leave no error to spread: GPTQ's integers and scales are RTN's, bit for bit."""
    w = torch.randn(48, 256) * torch.rand(48, 1) * 3
    q, s = gptq_quantize(w, torch.eye(256), bits)
    rq, rs = RTN[bits](w)
    assert q.dtype == rq.dtype and torch.equal(q, rq) and torch.equal(s, rs)


@pytest.mark.parametrize("bits", [8, 4])
def test_lower_output_error_than_round_to_nearest_on_correlated_inputs(bits: int) -> None:
    w, x = torch.randn(64, 256), correlated_inputs(2048, 256)
    gptq = dequantize(gptq_quantize(w, hessian(x), bits), bits)
    rtn = dequantize(RTN[bits](w), bits)
    err_gptq, err_rtn = (x @ (w - gptq).T).norm(), (x @ (w - rtn).T).norm()
    assert err_gptq < 0.5 * err_rtn


def sequential_least_squares(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The brute-force reference of GPTQ's error feedback (int8 grid, no damping): round column i,
    then set the columns after it to the float values that minimise ``(w - v) H (w - v)^T`` with
    columns 0..i fixed (solving the linear system afresh each time), and go on."""
    v = w.clone().double()
    h = h.double()
    q = torch.zeros_like(v)
    k = w.size(1)
    for i in range(k):
        q[:, i] = torch.round(v[:, i] / scale.double()).clamp(-127, 127)
        v[:, i] = q[:, i] * scale.double()
        fixed, free = slice(0, i + 1), slice(i + 1, k)
        if i + 1 < k:  # v_free = w_free + H_ff^-1 H_f,fixed (w_fixed - v_fixed)
            delta = (w.double()[:, fixed] - v[:, fixed]) @ h[fixed, free]
            v[:, free] = w.double()[:, free] + torch.linalg.solve(h[free, free], delta.T).T
    return q


@pytest.mark.parametrize("block", [2, 128])  # lazy batches of 2 columns, and all columns in one batch
def test_error_feedback_equals_re_solving_the_remaining_columns(block: int) -> None:
    torch.manual_seed(0)
    w = torch.randn(3, 8) * 0.05  # small weights: int8 steps large enough that the feedback matters
    x = correlated_inputs(256, 8, rank=3, seed=1)
    h = hessian(x)
    q, scale = gptq_quantize(w, h, 8, damp=0.0, block=block)
    expected = sequential_least_squares(w, h, scale)
    assert torch.equal(q.double(), expected)
    assert not torch.equal(q, quantize_int8(w)[0])  # the feedback changed some integers


def small_model(seed: int = 0) -> GPT2Model:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=300, max_position_embeddings=64, hidden_size=128, num_hidden_layers=2,
                     num_attention_heads=4, initializer_range=0.2)
    return GPT2Model(cfg).eval()


@pytest.mark.parametrize("bits", [8, 4])
def test_stored_format_runs_in_the_existing_layouts(bits: int) -> None:
    model = small_model()
    before = copy.deepcopy(model.state_dict())
    stored = gptq_model(model, torch.randint(0, 300, (24, 32)), bits)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model is left alone
    linears = [m for m in model.h.modules() if isinstance(m, torch.nn.Linear)]
    assert set(stored) == {id(m.weight) for m in linears}
    fast = prepare_for_inference(model, gptq_layouts(stored, bits), quantize=f"int{bits}")
    decode = [m for m in fast.body.h.modules() if isinstance(m, DecodeLinear)]
    assert len(decode) == len(linears)
    for m, dl in zip(linears, decode):
        q, s = stored[id(m.weight)]
        layout = dl.layout
        assert isinstance(layout, Int8Layout if bits == 8 else Int4Layout)
        x = torch.randn(3, m.in_features)
        want = x @ dequantize((q, s), bits).T + m.bias
        if bits == 8:
            assert torch.equal(layout.q, q) and torch.equal(layout.scale, s)
            torch.testing.assert_close(layout.matmul(x, m.bias), want, rtol=1e-5, atol=1e-5)
        else:  # the int4 kernel rounds the activations to bfloat16
            assert torch.equal(layout.scale_zero, s.to(torch.bfloat16))
            assert (layout.matmul(x, m.bias) - want).norm() < 0.02 * want.norm()
    ids = torch.randint(0, 300, (1, 4))
    assert generate(fast, ids, max_new_tokens=3).shape == (1, 7)


def test_calibration_reads_only_the_head_of_the_text(tokenizer, tmp_path) -> None:
    path = tmp_path / "calib.txt"
    path.write_text("apple " * 5000 + "zebra " * 200)  # the last 7% of the tokens is another word
    blocks = Calibration(path, tokenizer).blocks(64, n_blocks=10, block_size=128)
    assert blocks.shape == (10, 64)
    assert tokenizer.encode(" zebra")[0] not in blocks  # the held-out tail is never read


@pytest.mark.parametrize("quantize", ["int8-gptq", "int4-gptq"])
def test_generate_takes_gptq_choices(tokenizer, tmp_path, quantize: str) -> None:
    torch.manual_seed(0)
    model = GPT2Model(get_config("tiny", initializer_range=0.2)).eval()
    path, calib = tmp_path / "model.pt", tmp_path / "calib.txt"
    save_model(model, path, task="test")
    calib.write_text("Shall I compare thee to a summer's day? Thou art more lovely and more temperate.\n" * 60)
    out = cli.main(["--model", str(path), "--prompt", "Hello there", "--max_new_tokens", "6", "--quantize", quantize,
                    "--calibration", str(calib)])
    bits = int(quantize[3])
    stored = gptq_model(model, Calibration(calib).blocks(model.config.max_position_embeddings), bits)
    fast = prepare_for_inference(model, gptq_layouts(stored, bits), quantize=f"int{bits}")
    ids = torch.tensor([tokenizer.encode("Hello there")])
    row = generate(fast, ids, max_new_tokens=6, eos_token_id=tokenizer.eos_token_id)[0]
    assert out == [[tokenizer.decode(trim(row, ids.size(1), 0, tokenizer.eos_token_id))]]


class CountingTokenizer:
    """The caller's tokenizer, recording the texts it is called on."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.texts = tokenizer, []

    def __call__(self, text, *args, **kwargs):
        self.texts.append(text)
        return self.tokenizer(text, *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.tokenizer, name)


def test_gptq_calibrates_with_the_callers_tokenizer_once_for_target_and_draft(tokenizer, tmp_path) -> None:
    """``--tokenizer`` reaches the calibration (not a default tokenizer loaded again), and with
    ``--draft_model`` the calibration text is read and tokenised once for both models."""
    torch.manual_seed(0)
    path, calib = tmp_path / "model.pt", tmp_path / "calib.txt"
    save_model(GPT2Model(get_config("tiny", initializer_range=0.2)).eval(), path, task="test")
    text = "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.\n" * 60
    calib.write_text(text)
    settings = cli.parse_settings(["--model", str(path), "--prompt", "Hello", "--max_new_tokens", "3", "--quantize",
                                   "int8-gptq", "--calibration", str(calib), "--draft_model", str(path)])
    model, draft = (cli.restore_task_model(str(path), "body").model.eval() for _ in range(2))
    custom = CountingTokenizer(tokenizer)
    fast, draft = cli.prepare(model, custom, settings, 1, draft)
    cli.complete(fast, custom, ["Hello"], settings, draft)
    assert custom.texts.count(text) == 1


def test_a_missing_calibration_file_is_one_error_line(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        cli.run_main(lambda: prepare_for_decoding(small_model(), "int8-gptq", calibration=str(tmp_path / "none.txt")))
    assert e.value.code == 2 and "--calibration" in capsys.readouterr().err


def test_quality_script_measures_gptq_and_compared_models(tmp_path) -> None:
    spec = importlib.util.spec_from_file_location("quant_quality", ROOT / "benchmarks" / "quant_quality.py")
    quant_quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quant_quality)
    torch.manual_seed(0)
    path, calib = tmp_path / "model.pt", tmp_path / "calib.txt"
    save_model(GPT2Model(get_config("tiny")), path)
    calib.write_text("Shall I compare thee to a summer's day? Thou art more lovely and more temperate.\n" * 60)
    data = ROOT / "data"
    res = quant_quality.main(["--model", str(path), "--limit", "2", "--new_tokens", "6", "--chrf_tokens", "8",
                              "--block_size", "16", "--max_blocks", "2", "--text", str(calib),
                              "--held_out_fraction", "0.5", "--prompts", str(data / "sonnets_held_out_dev.txt"),
                              "--references", str(data / "TRUE_sonnets_held_out_dev.txt"), "--quantize", "int8-gptq",
                              "--calibration", str(calib), "--compare", f"same=none:{path}"])
    assert set(res) == {"float32", "int8-gptq", "same"}
    assert res["same"]["agreement"] == 1.0 and res["same"]["perplexity"] == res["float32"]["perplexity"]
    with pytest.raises(SystemExit):
        quant_quality.main(["--model", str(path), "--compare", "no-colon"])
