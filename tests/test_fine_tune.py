"""The fine-tune mode registry: what trains in each mode, which modes a head-less model offers,
adapter settings validated and saved as plain values, and the task scripts' choices and learning
rates taken from it."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import classifier
import sonnet_generation
from config import get_config
from methods.fine_tune import (
    DEFAULT_TARGETS,
    MODES,
    FineTuneConfig,
    FineTuneMode,
    LoraConfig,
    PrefixConfig,
    mode_names,
    register,
    set_fine_tune_mode,
)
from methods.lora import LoRALinear, apply_lora
from models.gpt2 import GPT2Model
from models.heads import GPT2SentimentClassifier
from models.sonnet_gpt import SonnetGPT

ROOT = Path(__file__).resolve().parents[1]


def classifier_model() -> GPT2SentimentClassifier:
    torch.manual_seed(0)
    return GPT2SentimentClassifier(GPT2Model(get_config("tiny")), num_labels=3)


@pytest.mark.parametrize("mode", list(MODES))
def test_each_mode_trains_what_it_says(mode):
    model = classifier_model()
    trainable_only = set_fine_tune_mode(model, FineTuneConfig(mode), model.head)
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= trains
    body = {n for n in trains if n.startswith("gpt.")}
    if mode == "full-model":
        assert not trainable_only and len(trains) == len(list(model.parameters()))
    elif mode == "lora":
        assert trainable_only and body and all("lora_" in n for n in body)
        assert all(m.r == LoraConfig().r for m in model.modules() if isinstance(m, LoRALinear))
    elif mode == "prefix":
        assert trainable_only and body and all(n.startswith("gpt.prefix_encoder.") for n in body)
    elif mode == "reft":
        assert trainable_only and body and all(n.startswith("gpt.reft.interventions.") for n in body)
    else:
        assert trainable_only and not body


def test_head_less_models_do_not_offer_head_only_training():
    assert mode_names(has_head=False) == ("full-model", "lora", "prefix", "reft")
    assert mode_names() == ("last-linear-layer", "full-model", "lora", "prefix", "reft")
    model = SonnetGPT(GPT2Model(get_config("tiny")))
    with pytest.raises(ValueError, match="has none"):
        set_fine_tune_mode(model, FineTuneConfig("last-linear-layer"), model.head)


def test_config_is_validated_and_round_trips_as_plain_values():
    with pytest.raises(ValueError, match="must be one of"):
        FineTuneConfig("adapters")
    with pytest.raises(ValueError, match="takes no adapter"):
        FineTuneConfig("full-model", LoraConfig())
    with pytest.raises(ValueError, match="positive"):
        LoraConfig(r=0)
    cfg = FineTuneConfig("lora", LoraConfig(r=4, targets=["attn.c_attn"], use_dora=True))
    assert cfg.adapter.targets == ("attn.c_attn",)
    assert FineTuneConfig.from_dict(cfg.to_dict()) == cfg
    assert FineTuneConfig.from_dict(FineTuneConfig("full-model").to_dict()) == FineTuneConfig("full-model")


def test_a_registered_mode_reaches_the_task_scripts(monkeypatch):
    """Adding a mode is one ``register``: the scripts' choices and default lr follow."""
    def bias_only(model, head, adapter):
        for n, p in model.named_parameters():
            p.requires_grad = n.endswith("bias")
        return True

    monkeypatch.setattr("methods.fine_tune.MODES", dict(MODES))
    register(FineTuneMode("bias-only", "only biases train", 5e-4, bias_only))
    assert classifier.get_args(["--fine-tune-mode", "bias-only"]).lr == 5e-4
    assert sonnet_generation.get_args(["--fine-tune-mode", "bias-only"]).lr == 5e-4
    model = classifier_model()
    assert set_fine_tune_mode(model, FineTuneConfig("bias-only"), model.head)
    assert all(p.requires_grad == n.endswith("bias") for n, p in model.named_parameters())


def test_adapter_settings_come_from_the_flags_the_registry_names():
    from cli.common import fine_tune_config

    args = classifier.get_args(["--fine-tune-mode", "lora", "--lora_r", "4", "--lora_alpha", "2",
                                "--lora_targets", "attn.c_attn, mlp.c_fc", "--use_dora"])
    assert fine_tune_config(args) == FineTuneConfig("lora", LoraConfig(4, 2.0, 0.05, ("attn.c_attn", "mlp.c_fc"), True))
    del args.use_dora  # flags saved by a run from before --use_dora existed
    assert fine_tune_config(args).adapter.use_dora is False
    assert fine_tune_config(classifier.get_args(["--fine-tune-mode", "full-model"])) == FineTuneConfig("full-model")
    args = sonnet_generation.get_args(["--fine-tune-mode", "prefix", "--prefix_length", "4", "--prefix_hidden", "32"])
    assert fine_tune_config(args) == FineTuneConfig("prefix", PrefixConfig(4, 32)) and args.lr == 5e-4


def test_lora_default_targets_are_the_registrys():
    """``apply_lora``'s own default and the registry's (``LoraConfig``, ``--lora_targets``) are one list."""
    assert inspect.signature(apply_lora).parameters["targets"].default == DEFAULT_TARGETS == LoraConfig().targets


def test_full_fine_tuning_never_loads_the_adapter_machinery():
    """Nor does the classifier script: reading a PEFT adapter (``--load_adapter``) is adapter machinery too."""
    code = ("import sys\nimport classifier\n"
            "from methods.fine_tune import FineTuneConfig, set_fine_tune_mode\n"
            "from models.gpt2 import GPT2Model\nfrom config import get_config\n"
            "set_fine_tune_mode(GPT2Model(get_config('tiny')), FineTuneConfig('full-model'), ())\n"
            "adapters = {'methods.lora', 'methods.prefix', 'methods.reft', 'methods.layer_swap',\n"
            "            'methods.peft_adapters'}\n"
            "assert not adapters & set(sys.modules), adapters & set(sys.modules)\n"
            "set_fine_tune_mode(GPT2Model(get_config('tiny')), FineTuneConfig('lora'), ())\n"
            "assert {'methods.lora', 'methods.prefix'} <= set(sys.modules)\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)

