"""``generate.py``: prompts in, completions out, from each model format, every strategy's flags
checked at parse time."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import generate as cli
from config import get_config
from decoding import inference
from engine.checkpoints import atomic_save
from methods.restore import save_model
from models.generation import generate, trim
from models.gpt2 import GPT2Model
from models.loading import CheckpointError
from tests.conftest import make_hf_folder


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = GPT2Model(get_config("tiny", initializer_range=0.2)).eval()
    path = tmp_path_factory.mktemp("gen") / "model.pt"
    save_model(model, path, task="test")
    return model, path


def expected(model, tokenizer, prompt: str, **kw) -> str:
    ids = torch.tensor([tokenizer.encode(prompt)])
    out = generate(model, ids, eos_token_id=tokenizer.eos_token_id, **kw)
    return tokenizer.decode(trim(out[0], ids.size(1), 0, tokenizer.eos_token_id))


def test_completes_every_prompt_and_writes_them(saved, tokenizer, tmp_path, capsys):
    model, path = saved
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Shall I compare thee\\nto a summer's day\n\nThe rose\n")
    out = cli.main(["--model", str(path), "--prompt", "Hello there", "--prompts_file", str(prompts),
                    "--max_new_tokens", "6"])
    texts = ["Hello there", "Shall I compare thee\nto a summer's day", "The rose"]
    assert out == [[expected(model, tokenizer, t, max_new_tokens=6)] for t in texts]
    assert capsys.readouterr().out == "".join(c[0] + "\n\n" for c in out)
    # a file, then refusal to overwrite it, then --overwrite
    dest = tmp_path / "out.jsonl"
    argv = ["--model", str(path), "--prompt", "Hello there", "--max_new_tokens", "5", "--num_beams", "3",
            "--num_return_sequences", "2", "--output", str(dest)]
    out = cli.main(argv)
    rows = [json.loads(line) for line in dest.read_text().splitlines()]
    assert [r["completion"] for r in rows] == out[0] and len(out[0]) == 2
    assert out[0][0] == expected(model, tokenizer, "Hello there", max_new_tokens=5, num_beams=3)
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2 and "exists; pass --overwrite" in capsys.readouterr().err
    cli.main(argv + ["--overwrite", "--num_beams", "4"])


def test_a_bar_counts_the_prompts_when_they_take_several_batches(saved, tokenizer, capsys):
    _, path = saved
    argv = ["--model", str(path), "--prompt", "Hello", "--prompt", "The rose", "--prompt", "A", "--max_new_tokens", "3"]
    quiet = cli.main(argv)  # one batch of 8: no bar
    assert "generating" not in capsys.readouterr().err
    assert cli.main(argv + ["--batch_size", "2"]) == quiet
    err = capsys.readouterr().err
    assert "generating: 100%" in err and "3/3" in err
    cli.main(argv + ["--batch_size", "2", "--no_progress"])
    assert "generating" not in capsys.readouterr().err


@pytest.mark.parametrize("flags", [
    ["--penalty_alpha", "0.6", "--top_k", "4", "--contrastive_mean_sim", "--contrastive_dynamic_alpha"],
    ["--do_sample", "--top_p", "0.9", "--temperature", "1.2"],
    ["--mbr_pool", "beam:2,sample:2,contrastive", "--no_cache"],
    ["--num_lines", "2", "--no_eos", "--repetition_penalty", "1.3"],
])
def test_every_strategy_runs_from_flags(saved, flags):
    _, path = saved
    out = cli.main(["--model", str(path), "--prompt", "A", "--prompt", "Longer prompt here", "--max_new_tokens", "5",
                    *flags])
    assert len(out) == 2 and all(len(c) == 1 and c[0] for c in out)


def test_other_model_formats(saved, tokenizer, tmp_path):
    model, _ = saved
    ckpt = tmp_path / "best.pt"  # a Trainer checkpoint of a sonnet head: every weight under gpt.
    atomic_save({"model": {f"gpt.{k}": v for k, v in model.state_dict().items()},
                 "model_config": model.config.to_dict(), "trainable_only": False}, ckpt)
    assert cli.main(["--model", str(ckpt), "--prompt", "Hi", "--max_new_tokens", "4"]) == [
        [expected(model, tokenizer, "Hi", max_new_tokens=4)]]
    atomic_save({"model": {}, "model_config": model.config.to_dict(), "trainable_only": True}, ckpt)
    with pytest.raises(CheckpointError, match="only the trained parameters"):
        cli.main(["--model", str(ckpt), "--prompt", "Hi"])
    folder = make_hf_folder(tmp_path / "hf", n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=50257)
    assert len(cli.main(["--model", str(folder), "--prompt", "Hi", "--max_new_tokens", "3"])[0]) == 1


@pytest.mark.parametrize("flags, message", [
    (["--top_p", "0"], "--top_p must be in (0, 1]"),
    (["--num_beams", "0"], "--num_beams must be >= 1"),
    (["--max_new_tokens", "0"], "--max_new_tokens must be >= 1"),
    (["--num_return_sequences", "2"], "--num_return_sequences must be 1 for greedy"),
    (["--do_sample", "--temperature", "0"], "--temperature must be > 0"),
    (["--penalty_alpha", "1.5"], "--penalty_alpha must be in [0, 1]"),
    (["--mbr_pool", "beam:2,nucleus:3"], "unknown strategy 'nucleus'"),
    (["--top_k", "x"], "invalid int value"),
    (["--prompts_file", "nowhere.txt"], "nowhere.txt does not exist"),
    (["--model", "runs/none/model.pt"], "does not exist"),
])
def test_bad_flags_exit_2_before_loading(saved, flags, message, capsys, monkeypatch):
    _, path = saved
    monkeypatch.setattr(cli, "restore_task_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as e:
        cli.main(["--model", str(path), "--prompt", "A", *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_no_prompt_is_an_error(saved, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--model", str(saved[1])])
    assert e.value.code == 2 and "at least one --prompt" in capsys.readouterr().err


@pytest.mark.parametrize("fold", [True, False])
def test_a_prefix_tuned_model_keeps_its_prefix(saved, tokenizer, tmp_path, fold):
    from methods.prefix import apply_prefix

    model, _ = saved
    tuned = GPT2Model(model.config).eval()
    tuned.load_state_dict(model.state_dict())
    torch.manual_seed(3)
    enc = apply_prefix(tuned, 4, hidden=16)
    with torch.no_grad():
        for p in enc.parameters():
            p.mul_(30)
    if fold:
        enc.fold()
    save_model(tuned, tmp_path / "prefix.pt")
    out = cli.main(["--model", str(tmp_path / "prefix.pt"), "--prompt", "Shall I", "--max_new_tokens", "6"])
    assert out == [[expected(tuned, tokenizer, "Shall I", max_new_tokens=6)]]
    assert out != [[expected(model, tokenizer, "Shall I", max_new_tokens=6)]]  # the prefix mattered


@pytest.mark.parametrize("quantize", ["bf16", "int8", "int4"])
def test_quantize_decodes_with_quantised_weights(saved, tokenizer, quantize):
    """--quantize decodes exactly as the model prepared with that quantisation."""
    from decoding.inference import prepare_for_inference

    model, path = saved
    out = cli.main(["--model", str(path), "--prompt", "Hello there", "--max_new_tokens", "8", "--quantize", quantize])
    prepared = prepare_for_inference(model, quantize=quantize)
    assert out == [[expected(prepared, tokenizer, "Hello there", max_new_tokens=8)]]


def test_int4_where_no_kernel_fits_is_one_error_line(tokenizer, tmp_path, capsys):
    path = tmp_path / "narrow.pt"
    save_model(GPT2Model(get_config("tiny", hidden_size=64, num_attention_heads=2)), path, task="test")
    with pytest.raises(SystemExit) as e:
        cli.run_main(lambda: cli.main(["--model", str(path), "--prompt", "Hello", "--quantize", "int4"]))
    assert e.value.code == 2 and "--quantize int4: " in capsys.readouterr().err


def test_a_prepared_model_is_not_prepared_again(saved, tokenizer, monkeypatch):
    """``generate.prepare`` folds adapters and calibrates GPTQ once; ``complete`` decodes the model it is
    given (the demo's cached one, for each request) without preparing it again."""
    calls = []

    def counted(name, real):
        return lambda *args, **kwargs: calls.append(name) or real(*args, **kwargs)

    monkeypatch.setattr(inference, "fold_adapters", counted("fold", inference.fold_adapters))
    monkeypatch.setattr(inference, "gptq_policy", counted("gptq", inference.gptq_policy))
    settings = cli.parse_settings(["--model", str(saved[1]), "--prompt", "Hello", "--max_new_tokens", "3",
                                   "--quantize", "int8-gptq"])
    prepared, _ = cli.prepare(copy.deepcopy(saved[0]), tokenizer, settings, 1)
    assert calls == ["fold", "gptq"]
    first = cli.complete(prepared, tokenizer, ["Hello"], settings)
    assert cli.complete(prepared, tokenizer, ["Hello"], settings) == first
    assert calls == ["fold", "gptq"]
