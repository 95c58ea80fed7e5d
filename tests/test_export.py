"""Models that leave: our GPT-2 bodies, classifiers and LoRA/DoRA adapters exported to ``transformers`` and
PEFT (``export.py``, ``tasks.export``, ``methods.export``, ``methods.peft_adapters``), and PEFT adapters
loaded back here (``--load_adapter``), each checked against ``transformers``/``peft`` on the same inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import classifier
import sonnet_generation
from cli.common import fine_tune_config
from cli.export import main as export_main
from cli.lm import build_pretrain_parser, pretrain_settings_from_args
from config import get_config
from engine.run_dir import new_run_folder
from errors import InputError
from methods.export import (
    ExportError,
    check_plain,
    export_classifier,
    export_lm,
    export_peft,
    fold_head_bias,
    push_to_hub,
)
from methods.fine_tune import FineTuneConfig, LoraConfig, set_fine_tune_mode
from methods.peft_adapters import load_peft_adapter, read_peft_adapter
from methods.restore import load_model, save_model
from methods.sparse_attention import SparseAttention, apply_sparse_attention
from models import loading
from models.generation import generate
from models.gpt2 import GPT2Model
from models.heads import GPT2SentimentClassifier
from models.sonnet_gpt import SonnetGPT
from tasks.restore import restore_task_model
from tests.conftest import sonnet_data_flags

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-5
EOS = 50256


@pytest.fixture(autouse=True)
def quiet_transformers():
    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def lm_logits(gpt: GPT2Model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return gpt.hidden_state_to_token(gpt(ids)["last_hidden_state"])


def random_ids(seed: int = 0, shape: tuple[int, int] = (2, 9)) -> torch.Tensor:
    return torch.randint(0, EOS, shape, generator=torch.Generator().manual_seed(seed))


def lora_model(seed: int, dora: bool, targets: tuple[str, ...] = LoraConfig().targets) -> SonnetGPT:
    """A tiny random LM with adapters that change its output (``lora_B`` is zero when fresh)."""
    torch.manual_seed(seed)
    model = SonnetGPT(GPT2Model(get_config("tiny")))
    set_fine_tune_mode(model, FineTuneConfig("lora", LoraConfig(r=4, alpha=8.0, targets=targets, use_dora=dora)), ())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
            if "lora_magnitude" in name:
                p.mul_(1.0 + 0.3 * torch.rand_like(p))
    return model.eval()


def test_an_lm_exports_as_gpt2lmheadmodel_with_the_same_logits_and_greedy_text(tmp_path, tokenizer):
    torch.manual_seed(0)
    gpt = GPT2Model(get_config("tiny")).eval()
    folder = export_lm(gpt, tmp_path / "hf", tokenizer)
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    ids = random_ids()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, lm_logits(gpt, ids), atol=ATOL, rtol=0)
    prompt = "Shall I compare thee to a summer's day?"
    ours = generate(gpt, torch.tensor([tokenizer.encode(prompt)]), max_new_tokens=12, eos_token_id=EOS)
    pipe = transformers.pipeline("text-generation", model=str(folder))
    theirs = pipe(prompt, max_new_tokens=12, do_sample=False)[0]["generated_text"]
    assert theirs == tokenizer.decode(ours[0])
    # and our own loader reads the folder back to the same weights
    back = GPT2Model.from_pretrained(folder)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), gpt.state_dict().values()))


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_adapters_export_to_peft_and_merged_with_the_same_logits_and_load_back(tmp_path, tokenizer, dora):
    model = lora_model(1, dora)
    ids = random_ids(1)
    want = lm_logits(model.gpt, ids)
    export_peft(model, tmp_path / "peft", tokenizer, base=None)  # a random base: written to peft/base
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "peft" / "base").resolve())
    assert config["use_dora"] is dora and config["r"] == 4 and config["lora_alpha"] == 8.0
    base = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "peft" / "base")
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
        torch.testing.assert_close(theirs(ids).logits, want, atol=ATOL, rtol=0)
        merged = theirs.merge_and_unload()  # PEFT's merge equals our merged export
        export_lm(model.gpt, tmp_path / "merged", tokenizer)
        ours_merged = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
        torch.testing.assert_close(ours_merged(ids).logits, merged(ids).logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(lm_logits(model.gpt, ids), want, atol=0, rtol=0)  # exporting left it unmerged
    # the folder loads back here: same settings, same tensors
    fresh = lora_model(2, dora)
    assert load_peft_adapter(fresh, tmp_path / "peft") == 8
    fresh.gpt.load_state_dict({k: v for k, v in model.gpt.state_dict().items() if "lora_" not in k}, strict=False)
    torch.testing.assert_close(lm_logits(fresh.gpt, ids), want, atol=ATOL, rtol=0)


def test_a_legacy_torch_adapter_file_reads_its_names_too(tmp_path, tokenizer):
    """A pre-zip ``adapter_model.bin`` cannot be memory-mapped: its names are read from the whole file."""
    export_peft(lora_model(1, False), tmp_path / "peft", tokenizer, base=None)
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    torch.save(load_file(weights), tmp_path / "peft" / "adapter_model.bin", _use_new_zipfile_serialization=False)
    weights.unlink()
    settings, tensors = read_peft_adapter(tmp_path / "peft")
    names_only = read_peft_adapter(tmp_path / "peft", tensors=False)
    assert names_only[0] == settings and names_only[1].keys() == tensors.keys()


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_an_adapter_trained_with_peft_loads_here_with_the_same_logits(tmp_path, dora):
    torch.manual_seed(3)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64))
    hf.save_pretrained(tmp_path / "base")
    # "c_proj" adapts both the attention and the MLP output projections, as PEFT matches suffixes
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=12, target_modules=["c_attn", "c_proj"],
                                                     fan_in_fan_out=True, use_dora=dora, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    theirs.save_pretrained(tmp_path / "adapter")
    settings, tensors = read_peft_adapter(tmp_path / "adapter")
    assert settings == {"r": 4, "alpha": 12.0, "dropout": 0.0, "targets": ("attn.c_attn", "attn.c_proj", "mlp.c_proj"),
                        "use_dora": dora}
    ours = SonnetGPT(GPT2Model.from_pretrained(tmp_path / "base"))
    set_fine_tune_mode(ours, FineTuneConfig("lora", LoraConfig(**settings), str(tmp_path / "adapter")), ())
    ids = random_ids(3)
    with torch.no_grad():
        torch.testing.assert_close(lm_logits(ours.gpt.eval(), ids), theirs.eval()(ids).logits, atol=ATOL, rtol=0)


def test_load_adapter_on_the_command_line_trains_from_the_peft_adapter(tmp_path, monkeypatch):
    """``sonnet_generation.py --load_adapter``: the run's adapters start as the folder's (a learning rate of
    1e-30 leaves them there), and its saved model is PEFT's merged model. The adapter's tensors are read
    once, when they load (the command line reads only their names)."""
    torch.manual_seed(4)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128))
    hf.save_pretrained(tmp_path / "base")
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"],
                                                     fan_in_fan_out=True, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    theirs.save_pretrained(tmp_path / "adapter")
    flags = ["--model_size", str(tmp_path / "base"), "--fine-tune-mode", "lora", "--load_adapter",
             str(tmp_path / "adapter"), "--limit", "2", "--max_new_tokens", "4", "--max_length", "48",
             *sonnet_data_flags(tmp_path)]
    assert fine_tune_config(sonnet_generation.get_args(flags)).adapter == LoraConfig(r=2, alpha=4.0, dropout=0.0,
                                                                                      targets=("attn.c_attn",))
    reads = []
    monkeypatch.setattr("models.loading.load_file", lambda path: reads.append(Path(path).name) or load_file(path))
    sonnet_generation.main([*flags, "--epochs", "1", "--lr", "1e-30"])
    assert reads.count("adapter_model.safetensors") == 1
    ids = random_ids(4)
    gpt = load_model(tmp_path / "run" / "sonnet-model.pt").eval()
    with torch.no_grad():
        torch.testing.assert_close(lm_logits(gpt, ids), theirs.eval()(ids).logits, atol=ATOL, rtol=0)
    with pytest.raises(InputError, match="add --fine-tune-mode lora"):
        fine_tune_config(sonnet_generation.get_args([*flags, "--fine-tune-mode", "full-model"]))
    pretraining = build_pretrain_parser().parse_args(["--corpus", "c.txt", "--load_adapter", str(tmp_path / "adapter")])
    with pytest.raises(InputError, match="this script trains the full model"):
        pretrain_settings_from_args(pretraining)


def test_what_we_cannot_compute_is_refused_in_one_line(tmp_path):
    base = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=32))
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["c_attn"], use_rslora=True))
    theirs.save_pretrained(tmp_path / "rslora")
    with pytest.raises(InputError, match="use_rslora=True has no counterpart"):
        read_peft_adapter(tmp_path / "rslora")
    with pytest.raises(InputError, match="no adapter_config.json"):
        read_peft_adapter(tmp_path)
    sparse = apply_sparse_attention(GPT2Model(get_config("tiny")), SparseAttention("window", window=4))
    with pytest.raises(ExportError, match="SparseCausalSelfAttention cannot be a plain Hugging Face GPT-2"):
        check_plain(sparse)
    prefix = SonnetGPT(GPT2Model(get_config("tiny")))
    set_fine_tune_mode(prefix, FineTuneConfig("prefix"), ())
    with pytest.raises(ExportError, match="PrefixCausalSelfAttention"):
        export_lm(prefix.gpt, tmp_path / "prefix", None)
    with pytest.raises(ExportError, match="linearly dependent"):
        fold_head_bias(torch.ones(2, 8), torch.tensor([0.0, 1.0]), torch.zeros(8))


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_a_classifier_exports_with_identical_predictions(tmp_path, tokenizer, pooling):
    torch.manual_seed(5)
    model = GPT2SentimentClassifier(GPT2Model(get_config("tiny")), 5, pooling=pooling).eval()
    with torch.no_grad():
        model.classifier.bias.normal_(0, 1.0)  # a bias transformers' bias-free score cannot hold as such
    ids, mask = random_ids(5, (3, 7)), torch.ones(3, 7, dtype=torch.long)
    ids[0, 4:], mask[0, 4:] = EOS, 0  # a right-padded row, padded with EOS as our collator does
    with torch.no_grad():
        want = model(ids, mask)
    folder = export_classifier(model, tmp_path / "cls", tokenizer)
    head = load_file(str(folder / "head.safetensors"))
    assert torch.equal(head["bias"], model.classifier.bias.detach())
    with torch.no_grad():
        if pooling == "last":
            hf = transformers.GPT2ForSequenceClassification.from_pretrained(folder).eval()
            got = hf(ids, attention_mask=mask).logits
        else:  # the body in transformers, the head beside it
            hidden = transformers.GPT2Model.from_pretrained(folder).eval()(ids, attention_mask=mask).last_hidden_state
            pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            got = pooled @ head["weight"].t() + head["bias"]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_a_head_whose_bias_cannot_fold_leaves_beside_the_body(tmp_path, tokenizer, capsys):
    model = GPT2SentimentClassifier(GPT2Model(get_config("tiny")), 2).eval()
    with torch.no_grad():
        model.classifier.weight[1] = model.classifier.weight[0]  # dependent rows, different biases
        model.classifier.bias.copy_(torch.tensor([0.0, 1.0]))
    folder = export_classifier(model, tmp_path / "cls", tokenizer)
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["GPT2Model"]
    assert torch.equal(load_file(str(folder / "head.safetensors"))["bias"], torch.tensor([0.0, 1.0]))
    assert "linearly dependent" in capsys.readouterr().err


def test_a_lora_classifier_run_exports_through_the_cli(tmp_path, classifier_cli):
    """A real ``classifier.py`` LoRA run, exported with ``--format both``: transformers' sequence classifier
    and PEFT's adapter on the exported base predict what the run's checkpoint predicts."""
    classifier.main(classifier_cli("lora", "--dataset", "sst"))
    run = tmp_path / "runs"
    export_main([str(run), "--out", str(tmp_path / "out"), "--format", "both"])
    restored = restore_task_model(run / "best.pt", "classifier").model
    ids, mask = random_ids(6, (4, 10)), torch.ones(4, 10, dtype=torch.long)
    ids[1, 6:], mask[1, 6:] = EOS, 0
    with torch.no_grad():
        want = restored(ids, mask)
        hf = transformers.GPT2ForSequenceClassification.from_pretrained(tmp_path / "out").eval()
        torch.testing.assert_close(hf(ids, attention_mask=mask).logits, want, atol=ATOL, rtol=0)
        base = transformers.GPT2ForSequenceClassification.from_pretrained(tmp_path / "out" / "adapter" / "base",
                                                                         num_labels=5, pad_token_id=EOS)
        theirs = peft.PeftModel.from_pretrained(base, tmp_path / "out" / "adapter").eval()
        torch.testing.assert_close(theirs(ids, attention_mask=mask).logits, want, atol=ATOL, rtol=0)


def test_a_full_sonnet_run_exports_and_generates_the_same_greedy_text(tmp_path, tokenizer):
    sonnet_generation.main(["--model_size", "tiny", "--random_init", "--limit", "2", "--epochs", "1",
                            "--max_new_tokens", "4", "--max_length", "48", *sonnet_data_flags(tmp_path)])
    export_main([str(tmp_path / "run"), "--out", str(tmp_path / "hf")])
    gpt = load_model(tmp_path / "run" / "sonnet-model.pt").eval()
    prompt = "From fairest creatures we desire increase,"
    ours = generate(gpt, torch.tensor([tokenizer.encode(prompt)]), max_new_tokens=10, eos_token_id=EOS)
    pipe = transformers.pipeline("text-generation", model=str(tmp_path / "hf"))
    assert pipe(prompt, max_new_tokens=10, do_sample=False)[0]["generated_text"] == tokenizer.decode(ours[0])
    with pytest.raises(ExportError, match="not empty; pass --overwrite"):
        export_main([str(tmp_path / "run"), "--out", str(tmp_path / "hf")])
    with pytest.raises(ExportError, match="has no LoRA/DoRA adapters"):
        export_main([str(tmp_path / "run"), "--out", str(tmp_path / "peft"), "--format", "peft"])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="replaces exports only"):
        export_main([str(tmp_path / "run"), "--out", str(tmp_path / "mine"), "--overwrite"])
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_a_dora_sonnet_checkpoint_exports_its_adapters_to_peft(tmp_path):
    """A LoRA/DoRA LM checkpoint holds only the adapters: the body is rebuilt from the run's flags (its random
    base from the seed) and PEFT's adapter on the exported base computes the run's saved (merged) model."""
    sonnet_generation.main(["--model_size", "tiny", "--random_init", "--fine-tune-mode", "lora", "--use_dora",
                            "--limit", "2", "--epochs", "1", "--lr", "1e-2", "--max_new_tokens", "4",
                            "--max_length", "48", *sonnet_data_flags(tmp_path)])
    export_main([str(tmp_path / "run"), "--out", str(tmp_path / "peft"), "--format", "peft"])
    ids = random_ids(7)
    want = lm_logits(load_model(tmp_path / "run" / "sonnet-model.pt").eval(), ids)
    base = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "peft" / "base")
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
        torch.testing.assert_close(theirs(ids).logits, want, atol=ATOL, rtol=0)


def run_export(*argv: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "export.py", *argv], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env})


def test_bad_input_and_an_offline_push_are_one_line_and_exit_2(tmp_path):
    with pytest.raises(ExportError, match="no such run folder or checkpoint"):
        export_main([str(tmp_path / "nothing"), "--out", str(tmp_path / "out")])
    save_model(GPT2Model(get_config("tiny")), tmp_path / "model.pt")
    offline = run_export(str(tmp_path / "model.pt"), "--out", str(tmp_path / "out"), "--push_to_hub", "me/gpt2",
                         HF_HUB_OFFLINE="1")
    assert offline.returncode == 2 and (tmp_path / "out" / "model.safetensors").is_file()
    errors = [line for line in offline.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: cannot push to the hub: it is unreachable (offline or HF_HUB_OFFLINE=1); the export "
                      f"is in {tmp_path / 'out'}: push it later with `hf upload me/gpt2 {tmp_path / 'out'}`"]


def test_push_to_an_unreachable_endpoint_says_so(tmp_path, monkeypatch, use_hub_cache):
    """The hub's address on this machine (a refused connection): no network is contacted."""
    use_hub_cache(tmp_path / "hf_home", offline=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1")
    loading.hub_reachable.cache_clear()
    with pytest.raises(ExportError, match=r"it is unreachable .* push it later with `hf upload me/gpt2 "):
        push_to_hub(tmp_path, "me/gpt2")



def test_latest_as_a_pointer_file_names_the_run(tmp_path, monkeypatch):
    """Where symlinks fail, ``latest`` is a one-line pointer file: ``export.py RUN/latest`` (and a file
    through it) exports the run it names, as through a symlink."""
    def no_symlinks(*a, **k):
        raise OSError("symlinks not supported")

    monkeypatch.setattr(os, "symlink", no_symlinks)
    run = new_run_folder(tmp_path / "runs")
    save_model(GPT2Model(get_config("tiny")), run / "model.pt")
    assert (tmp_path / "runs" / "latest").is_file()
    assert export_main([str(tmp_path / "runs" / "latest"), "--out", str(tmp_path / "a")]) is None
    export_main([str(tmp_path / "runs" / "latest" / "model.pt"), "--out", str(tmp_path / "b")])
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
