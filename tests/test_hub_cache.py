"""The path real users and graders take: ``gpt2`` from a Hugging Face hub cache (as a download
leaves it), the tokenizer from every place it can come from, the task scripts and the course's
own grader scripts on the cached model, and clear errors for partial or corrupt caches.

The caches are written by ``tests/conftest.py`` (small random weights saved by ``transformers``,
the real tokenizer files); ``HF_HOME`` points at them for one test only.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from errors import InputError
from models import loading
from models.gpt2 import GPT2Model
from models.loading import CheckpointError, load_tokenizer
from tests.conftest import SHARED, SHARED_DATA, write_hub_cache

ROOT = Path(__file__).resolve().parents[1]
STARTER = SHARED / "starter"
NO_NETWORK = "http://127.0.0.1:9"  # HF_ENDPOINT with nothing listening: as a machine without network
# The starter's own call needs d=768, l=12, num_heads=12; a 4-wide MLP and a short vocabulary
# (the starter's inputs stop at id 17953) keep that checkpoint at 42M parameters.
STARTER_GPT2 = dict(n_embd=768, n_layer=12, n_head=12, n_inner=4, n_positions=16, vocab_size=18000)


def assert_gpt2_tokenizer(tok) -> None:
    assert len(tok) == 50257 and tok.encode("Hello world") == [15496, 995]
    assert tok.pad_token_id == tok.eos_token_id == 50256


def hidden(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, torch.ones_like(ids))["last_hidden_state"]


def transformers_gpt2(home: Path):
    from transformers import GPT2Model as HFGPT2Model

    return HFGPT2Model.from_pretrained("gpt2", cache_dir=home / "hub", local_files_only=True).eval()


# ----------------------------------------------------------------- the tokenizer


def test_tokenizer_loads_whole_from_the_cache_offline(hub_cache, use_hub_cache, capsys):
    use_hub_cache(hub_cache)
    assert_gpt2_tokenizer(load_tokenizer())
    assert "using the GPT-2 tokenizer files" not in capsys.readouterr().err  # the cache, not the fallback


def test_tokenizer_from_a_folder_and_from_the_shared_fallback(tmp_path, use_hub_cache, capsys):
    folder = tmp_path / "tok"
    shutil.copytree(SHARED / "gpt2-tokenizer", folder)
    assert_gpt2_tokenizer(load_tokenizer(str(folder)))
    use_hub_cache(tmp_path / "empty_home")
    assert_gpt2_tokenizer(load_tokenizer())
    assert "using the GPT-2 tokenizer files in" in capsys.readouterr().err


def test_broken_tokenizer_folders_are_clear_errors(tmp_path, hub_cache, use_hub_cache):
    folder = tmp_path / "tok"
    shutil.copytree(SHARED / "gpt2-tokenizer", folder)
    (folder / "merges.txt").write_text("")  # 50257 entries, but every word falls apart into bytes
    with pytest.raises(CheckpointError, match=r"not the GPT-2 tokenizer \(--tokenizer\): 50257 entries .*"
                                              r"\[39, 68, 75"):
        load_tokenizer(str(folder))
    (folder / "vocab.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="cannot read the GPT-2 tokenizer"):
        load_tokenizer(str(folder))
    (folder / "merges.txt").unlink()
    with pytest.raises(CheckpointError, match=r"tok/merges.txt: missing from the tokenizer folder"):
        load_tokenizer(str(folder))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nowhere"))
    # A corrupt tokenizer in the cache is named, not replaced by another one.
    home = tmp_path / "home"
    snapshot = write_hub_cache(home)
    (snapshot / "merges.txt").write_text("#version: 0.2\n")
    use_hub_cache(home)
    with pytest.raises(CheckpointError, match=f"{snapshot}: not the GPT-2 tokenizer"):
        load_tokenizer()


def test_empty_encodings_and_empty_texts_name_file_and_line(tmp_path, tokenizer):
    from engine.data import DataFormatError, encode
    from tasks.course_data import read_sentiment, sentiment_features
    from tasks.quora_data import ParaphrasePair, paraphrase_features

    data = tmp_path / "sst.csv"
    data.write_text("\tid\tsentence\tsentiment\n0\ta\tfine film\t3\n1\tb\tdull\t1\n")
    rows = read_sentiment(data)

    class Broken:  # what the 1-entry tokenizer did: every text encodes to nothing
        eos_token_id = 50256

        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[] for _ in texts]}

    with pytest.raises(DataFormatError, match=f"{data}:2: 'fine film' encodes to no tokens"):
        sentiment_features(rows, Broken(), 16)
    pair = ParaphrasePair("p", "Is it?", "Is it not?", 1, line=7, path="quora.csv")
    with pytest.raises(DataFormatError, match="quora.csv:7: .* encodes to no tokens"):
        paraphrase_features([pair], Broken(), 64)
    rows[1].text = ""
    with pytest.raises(DataFormatError, match=f"{data}:3: empty text"):
        sentiment_features(rows, tokenizer, 16)
    with pytest.raises(DataFormatError, match="toy: empty text"):
        encode(tokenizer, ["a", " "], 8, "toy")


# ------------------------------------------------------------------ the weights


def test_from_pretrained_gpt2_equals_transformers_on_the_cache(hub_cache, use_hub_cache):
    use_hub_cache(hub_cache)
    ours = GPT2Model.from_pretrained("gpt2")
    assert not ours.training  # eval mode, as transformers returns it: no dropout
    ids = torch.tensor([[15496, 995, 11, 314, 716], [464, 3139, 286, 4881, 318]])
    theirs = transformers_gpt2(hub_cache)(ids).last_hidden_state
    torch.testing.assert_close(hidden(ours, ids), theirs, atol=1e-5, rtol=1e-5)
    assert torch.equal(hidden(ours, ids), hidden(ours, ids))  # deterministic: dropout is off
    # The course starter's call: the sizes are checked against the checkpoint, never applied.
    starter = GPT2Model.from_pretrained(model="gpt2", d=64, l=2, num_heads=4)
    assert not starter.training and torch.equal(hidden(starter, ids), hidden(ours, ids))
    with pytest.raises(CheckpointError, match=r"config.json: hidden_size=768 asked but the checkpoint has "
                                              r"hidden_size=64, num_hidden_layers=12 asked"):
        GPT2Model.from_pretrained(model="gpt2", d=768, l=12, num_heads=4)
    assert GPT2Model.from_pretrained("gpt2", hidden_dropout_prob=0.0).config.hidden_dropout_prob == 0.0


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_cache_is_used_at_once_without_network(tmp_path, use_hub_cache, weights, monkeypatch):
    home = tmp_path / "home"
    write_hub_cache(home, weights=weights)
    use_hub_cache(home, offline=False)
    monkeypatch.setenv("HF_ENDPOINT", NO_NETWORK)
    start = time.monotonic()
    ours = GPT2Model.from_pretrained("gpt2")
    assert_gpt2_tokenizer(load_tokenizer())
    assert time.monotonic() - start < 3
    assert loading.hub_reachable.cache_info().misses == 0  # complete cache: the network was never tried
    ids = torch.tensor([[15496, 995, 0, 17953]])
    torch.testing.assert_close(hidden(ours, ids), transformers_gpt2(home)(ids).last_hidden_state,
                               atol=1e-5, rtol=1e-5)


def test_partial_and_corrupt_caches_name_the_snapshot_and_the_file(tmp_path, use_hub_cache, monkeypatch):
    home = tmp_path / "home"
    snapshot = write_hub_cache(home, weights=None)
    for offline in (True, False):
        use_hub_cache(home, offline=offline)
        monkeypatch.setenv("HF_ENDPOINT", NO_NETWORK)
        with pytest.raises(CheckpointError, match=rf"{snapshot}: the cached copy of 'gpt2' is incomplete: it lacks "
                                                  r"model.safetensors or pytorch_model.bin.*hf download gpt2"):
            GPT2Model.from_pretrained("gpt2")
    (snapshot / "model.safetensors").write_bytes(b"truncated download")
    with pytest.raises(CheckpointError, match=rf"{snapshot / 'model.safetensors'}: cannot read weights.*download"):
        GPT2Model.from_pretrained("gpt2")
    (snapshot / "model.safetensors").unlink()
    (snapshot / "model.safetensors").symlink_to(home / "hub" / "models--gpt2" / "blobs" / "gone")
    with pytest.raises(CheckpointError, match=rf"{snapshot}: .* lacks model.safetensors or pytorch_model.bin "
                                              r"\(model.safetensors is a broken link to "):
        GPT2Model.from_pretrained("gpt2")
    (snapshot / "model.safetensors").unlink()
    (snapshot / "config.json").unlink()
    with pytest.raises(CheckpointError, match=rf"{snapshot}: .* it lacks config.json and model.safetensors"):
        GPT2Model.from_pretrained("gpt2")
    use_hub_cache(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="hub is unreachable and the cache .* holds no copy"):
        GPT2Model.from_pretrained("gpt2")


def test_a_cache_without_config_names_only_what_it_lacks(tmp_path, use_hub_cache, monkeypatch):
    home = tmp_path / "home"
    snapshot = write_hub_cache(home)
    (snapshot / "config.json").unlink()  # the weights are there
    use_hub_cache(home, offline=True)
    monkeypatch.setenv("HF_ENDPOINT", NO_NETWORK)
    with pytest.raises(CheckpointError, match=rf"{snapshot}: the cached copy of 'gpt2' is incomplete: it lacks "
                                              r"config.json, and the hub is unreachable"):
        GPT2Model.from_pretrained("gpt2")


def test_sanity_check_compares_with_the_cached_pretrained_gpt2(hub_cache, use_hub_cache, capsys, monkeypatch):
    import sanity_check

    use_hub_cache(hub_cache, offline=False)
    monkeypatch.setenv("HF_ENDPOINT", NO_NETWORK)
    sanity_check.test_gpt2()
    assert "sanity check: pretrained 'gpt2' from the Hugging Face cache" in capsys.readouterr().out
    assert loading.hub_reachable.cache_info().misses == 0


# ------------------------------------------------------- commands, as users run them


def run(args: list[str], home: Path, cwd: Path = ROOT, timeout: float = 300, **env: str):
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **env}
    env.pop("HF_HUB_CACHE", None)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def task_commands(out: Path) -> dict[str, list[str]]:
    common = ["--limit", "8", "--epochs", "1", "--batch_size", "4", "--no_progress", "--device", "cpu"]
    return {
        # --max_length 16 cuts some SST sentences: proof that they were read as real tokens.
        "classifier": ["classifier.py", "--fine-tune-mode", "full-model", "--dataset", "sst", *common,
                       "--max_length", "16",
                       "--sst_train", str(SHARED_DATA / "ids-sst-train.csv"),
                       "--sst_dev", str(SHARED_DATA / "ids-sst-dev.csv"),
                       "--sst_test", str(SHARED_DATA / "ids-sst-test-student.csv"),
                       "--output_dir", str(out / "run"), "--predictions_dir", str(out / "pred")],
        "paraphrase": ["paraphrase_detection.py", *common, "--para_train", str(out / "absent-train.csv"),
                       "--para_dev", str(out / "absent-dev.csv"), "--para_test", str(out / "absent-test.csv"),
                       "--output_dir", str(out / "run"), "--para_dev_out", str(out / "pred" / "dev.csv"),
                       "--para_test_out", str(out / "pred" / "test.csv")],
        "sonnet": ["sonnet_generation.py", *common, "--max_new_tokens", "8",
                   "--sonnet_path", str(SHARED_DATA / "sonnets.txt"),
                   "--held_out_sonnet_path", str(SHARED_DATA / "sonnets_held_out.txt"),
                   "--dev_held_out_sonnet_path", str(SHARED_DATA / "sonnets_held_out_dev.txt"),
                   "--dev_true_sonnet_path", str(SHARED_DATA / "TRUE_sonnets_held_out_dev.txt"),
                   "--output_dir", str(out / "run"), "--sonnet_out", str(out / "pred" / "test.txt"),
                   "--dev_sonnet_out", str(out / "pred" / "dev.txt")],
        "pretrain": ["pretrain.py", *common, "--corpus", str(SHARED_DATA / "sonnets.txt"),
                     "--output_dir", str(out / "run")],
    }


@pytest.mark.parametrize("task", ["classifier", "paraphrase", "sonnet", "pretrain"])
def test_task_scripts_run_end_to_end_on_the_cached_model(task, hub_cache, tmp_path):
    proc = run(task_commands(tmp_path)[task], hub_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "using the GPT-2 tokenizer files" not in proc.stderr  # the cached tokenizer was used
    if task == "classifier":
        assert re.search(r"sst train: truncated [1-9]\d* of 8 inputs to 16 tokens", proc.stdout), proc.stdout
    assert list((tmp_path / "run").rglob("*")), "the run wrote nothing into its --output_dir"
    if task != "pretrain":
        written = [p for p in (tmp_path / "pred").iterdir() if p.stat().st_size > 0]
        assert written, "no predictions were written"


def test_partial_cache_is_one_error_line_from_the_command(tmp_path):
    snapshot = write_hub_cache(tmp_path / "home", weights=None)
    proc = run(task_commands(tmp_path)["classifier"], tmp_path / "home")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {snapshot}: the cached copy of 'gpt2'")


@pytest.fixture(scope="module")
def starter_cache(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("starter_home")
    write_hub_cache(home, **STARTER_GPT2)
    return home


@pytest.mark.parametrize("script, expected", [("sanity_check.py", "Your GPT2 implementation is correct!"),
                                              ("optimizer_test.py", "Optimizer test passed!")])
def test_the_course_grader_scripts_pass_unmodified_from_the_root(script, expected, starter_cache, tmp_path):
    """The graders' copies, byte for byte, run from the project root as graders run them."""
    copy = tmp_path / script
    shutil.copy(STARTER / script, copy)
    assert copy.read_bytes() == (STARTER / script).read_bytes()
    proc = run([str(copy)], starter_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert expected in proc.stdout


# ------------------------------------------------------------------ the device


def test_default_device_is_cuda_then_mps_then_cpu(monkeypatch, capsys):
    """Picking the device prints nothing: the CPU cost note is the sentiment task's
    (``engine.device.cpu_hint``, tests/test_cpu_note.py), where it is true."""
    from cli.common import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pick_device(False, "auto") == torch.device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device(False, "auto") == torch.device("cpu")
    assert capsys.readouterr().err == ""
    with pytest.raises(InputError, match="--use_gpu was given but CUDA is not available"):
        pick_device(True, "auto")  # the starter's flag keeps its meaning
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device(False, "auto") == pick_device(True, "auto") == torch.device("cuda")
    assert capsys.readouterr().err == ""
