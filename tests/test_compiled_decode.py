"""The compiled decoding step (``decoding.compiled``, ``--compile_decode``): compiled once per
(rows, maximum length), never per layer or position; the tokens of eager decoding (greedy, beam,
left padding, prefix tuning) through dynamo's functionalised graph and through inductor; one
warning line and eager decoding when compilation fails."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from torch._dynamo.utils import counters

import decoding.compiled
import generate as cli
import sonnet_generation
import tasks.sonnet
from cli.sonnet import settings_from_args
from config import get_config
from decoding.compiled import compile_decoding
from decoding.inference import prepare_for_inference
from methods.prefix import apply_prefix
from methods.restore import save_model
from models.generation import generate
from models.gpt2 import GPT2Model
from models.sonnet_gpt import SonnetGPT
from tasks.sonnet import complete_prompts
from tests.test_static_cache import prompts, tiny

# Inductor's own code calls torch.jit.script_method, which torch 2.13 deprecates: not ours to change.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_compiles_once_per_rows_and_length_never_per_layer_or_position() -> None:
    model = tiny()
    fast = compile_decoding(model, backend="eager")  # dynamo's capture only: what is compiled, and how often
    ids, mask = prompts(True)
    for seed in (5, 6):  # two calls, other prompts, the same (rows, length)
        ids = torch.randint(0, 101, (3, 6), generator=torch.Generator().manual_seed(seed))
        assert torch.equal(generate(fast, ids, mask, max_new_tokens=6), generate(model, ids, mask, max_new_tokens=6))
        assert counters["stats"]["unique_graphs"] == 1  # 5 steps x 2 layers x 2 calls: one graph
    generate(fast, ids[:1], max_new_tokens=6)  # 1 row: one graph more
    assert counters["stats"]["unique_graphs"] == 2
    generate(fast, ids, mask, max_new_tokens=6, num_beams=2)  # 3 x 2 rows: one graph more
    assert counters["stats"]["unique_graphs"] == 3
    assert not counters["graph_break"] and not counters["recompiles"]


@pytest.mark.parametrize("settings", [{}, {"num_beams": 3}], ids=["greedy", "beam"])
def test_the_functionalised_step_decodes_the_eager_tokens(settings) -> None:
    """aot_eager runs the graph with the cache writes functionalised (copied back), as inductor does."""
    model = tiny()
    apply_prefix(model, length=2, hidden=16).fold()
    ids, mask = prompts(True)
    fast = compile_decoding(model, backend="aot_eager")
    for m in (mask, None):
        want = generate(model, ids, m, max_new_tokens=7, **settings)
        assert torch.equal(generate(fast, ids, m, max_new_tokens=7, **settings), want)


def test_inductor_decodes_the_eager_tokens() -> None:
    """The real CPU path, on the smallest model and a few tokens (inductor compiles C++)."""
    model = tiny()
    model.h = model.h[:1]  # one block
    ids, mask = prompts(True)
    want = generate(model, ids, mask, max_new_tokens=3)
    assert torch.equal(generate(compile_decoding(model), ids, mask, max_new_tokens=3), want)


def test_a_step_that_breaks_the_graph_is_never_compiled_per_layer() -> None:
    """int8 layouts call a kernel dynamo cannot trace: one graph for the whole step or none (eager,
    one warning), never a piece per layer recompiled per layer index."""
    model = prepare_for_inference(tiny(), quantize="int8")
    ids, mask = prompts(True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = generate(compile_decoding(model, backend="eager"), ids, mask, max_new_tokens=5)
    assert torch.equal(out, generate(model, ids, mask, max_new_tokens=5))
    graphs = counters["stats"].get("unique_graphs", 0)
    assert graphs == 1 or (graphs == 0 and sum("decoding eagerly" in str(w.message) for w in record) == 1)


def test_cache_tensors_are_marked_static_once_per_cache_not_per_step(monkeypatch) -> None:
    """On CUDA the cache's tensors are marked as static addresses for the CUDA graph: once per cache
    storage, not at every step. On the CPU, by taking the CUDA path (marking, output copies) with a
    compilation that is not CUDA graphs; the tokens stay the eager ones."""
    marked: list[torch.Tensor] = []
    monkeypatch.setattr(decoding.compiled, "cuda_graphs", lambda device: True)
    monkeypatch.setattr(torch._dynamo, "mark_static_address", marked.append)
    model = tiny()
    fast = compile_decoding(model, backend="eager", mode=None)
    ids, mask = prompts(True)
    assert torch.equal(generate(fast, ids, mask, max_new_tokens=6), generate(model, ids, mask, max_new_tokens=6))
    tensors = fast.cache.step_tensors()
    assert len(marked) == len(tensors) and all(a is b for a, b in zip(marked, tensors))  # 5 steps, marked once
    generate(fast, ids, mask, max_new_tokens=6)  # the same cache again: nothing to mark
    assert len(marked) == len(tensors)
    beams = generate(fast, ids, mask, max_new_tokens=6, num_beams=2)  # 3 x 2 rows: new storage, marked once more
    assert torch.equal(beams, generate(model, ids, mask, max_new_tokens=6, num_beams=2))
    assert len(marked) == 2 * len(tensors)


def failing_backend(gm, example_inputs):
    raise RuntimeError("no compiler here\nsecond line")


def test_a_failed_compilation_warns_once_and_decodes_eagerly() -> None:
    model = tiny()
    fast = compile_decoding(model, backend=failing_backend)
    ids, mask = prompts(True)
    with pytest.warns(UserWarning, match="compiling the decoding step failed, decoding eagerly") as record:
        out = generate(fast, ids, mask, max_new_tokens=5)
    assert len(record) == 1 and "\n" not in str(record[0].message)
    assert torch.equal(out, generate(model, ids, mask, max_new_tokens=5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate(fast, ids, mask, max_new_tokens=5)  # eager for good: no second warning


def test_generate_cli_takes_compile_decode(tmp_path, monkeypatch) -> None:
    torch.manual_seed(0)
    path = tmp_path / "model.pt"
    save_model(GPT2Model(get_config("tiny", initializer_range=0.2)).eval(), path, task="test")
    argv = ["--model", str(path), "--prompt", "Hello there", "--prompt", "A", "--max_new_tokens", "4"]
    monkeypatch.setattr(cli, "compile_decoding", lambda m: compile_decoding(m, backend="eager"))
    assert cli.main(argv + ["--compile_decode"]) == cli.main(argv)
    assert counters["stats"]["unique_graphs"] == 1


def test_sonnet_generation_takes_compile_decode(tokenizer, monkeypatch) -> None:
    """The flag reaches the sonnet settings, and sampled sonnets are the eager ones (same stream)."""
    assert settings_from_args(sonnet_generation.get_args(["--compile_decode"])).compile_decode
    assert not settings_from_args(sonnet_generation.get_args([])).compile_decode
    torch.manual_seed(0)
    model = SonnetGPT(GPT2Model(get_config("tiny", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)))
    monkeypatch.setattr(tasks.sonnet, "compile_decoding", lambda m: compile_decoding(m, backend="eager"))
    config = dataclasses.replace(tasks.sonnet.SonnetDecoding().generation(tokenizer), max_new_tokens=6)
    prompts = ["From fairest creatures we desire increase,", "When I do count"]
    kw = dict(batch_size=2, seed=3)
    assert complete_prompts(model, tokenizer, prompts, config, compile_decode=True, **kw) == \
        complete_prompts(model, tokenizer, prompts, config, **kw)
    assert counters["stats"]["unique_graphs"] == 1
