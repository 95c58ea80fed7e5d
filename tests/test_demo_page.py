"""The sonnet demo behind its page, without a browser (``tests/test_demo_browser.py`` drives the page):
the sonnet streams in pieces that join to what ``generate.py`` prints with the command shown, a model is
prepared for decoding once and reused, the shown command comes from ``generate.py``'s own flag table,
a run folder is read as ``export.py`` reads it, and without Gradio the demo says how to install it."""

from __future__ import annotations

import importlib
import os
import shlex
import shutil
import sys

import pytest
import torch

try:
    import gradio  # noqa: F401  (the page's)
except ModuleNotFoundError:
    pytest.fail("the demo's tests need the demo extras: bash setup.sh --demo (or pip install -r "
                "requirements-demo.txt)", pytrace=False)

import demo
import generate
from cli.common import run_main
from cli.demo import DemoSettings
from cli.generate import command_line, parse_settings
from config import get_config
from methods.restore import save_model
from models.gpt2 import GPT2Model
from tasks.demo import SONNET_18, model_file, sonnet_request
from tasks.restore import restore_task_model

SLIDERS = dict(max_new_tokens=24, temperature=0.7, top_k=4, top_p=0.8, penalty_alpha=0.6)


@pytest.fixture(scope="module")
def continuer(tiny_sonnet_model) -> demo.SonnetContinuer:
    return demo.SonnetContinuer(DemoSettings(model=str(tiny_sonnet_model), device="cpu"))


@pytest.mark.parametrize("strategy", ["top-p", "contrastive"])
def test_the_streamed_sonnet_is_what_generate_py_prints(strategy, continuer, tiny_sonnet_model, capsys):
    request = sonnet_request(str(tiny_sonnet_model), SONNET_18, strategy, **SLIDERS)
    pieces = list(continuer.stream(request))
    assert len(pieces) > 2 and pieces[0].startswith(SONNET_18)  # the prompt at once, then token by token
    argv = shlex.split(continuer.command(request))
    assert argv[:2] == ["python", "generate.py"] and "--device" in argv  # the demo's --device cpu
    assert generate.main(argv[2:]) == [["".join(pieces)]]
    capsys.readouterr()


def test_beam_search_and_mbr_show_their_final_choice(continuer, tiny_sonnet_model):
    for strategy in ("beam", "mbr"):
        request = sonnet_request(str(tiny_sonnet_model), SONNET_18, strategy, mbr_pool="sample:2,beam:2", num_beams=2,
                                 max_new_tokens=8)
        (sonnet,) = continuer.stream(request)
        assert sonnet.startswith(SONNET_18)


def test_two_requests_prepare_the_model_once(continuer, tiny_sonnet_model, monkeypatch):
    prepared = []

    def counted(model, tokenizer, settings, num_prompts):
        prepared.append(settings.quantize)
        return generate.prepare(model, tokenizer, settings, num_prompts)

    monkeypatch.setattr(demo, "prepare", counted)
    continuer.prepared.clear()
    for max_new_tokens in (4, 6):  # two requests of one model and weights: one preparation
        request = sonnet_request(str(tiny_sonnet_model), SONNET_18, "greedy", max_new_tokens=max_new_tokens)
        list(continuer.stream(request))
    assert prepared == ["none"]
    list(continuer.stream(sonnet_request(str(tiny_sonnet_model), SONNET_18, "greedy", "int8", max_new_tokens=4)))
    assert prepared == ["none", "int8"] and len(continuer.prepared) == 2


def test_a_rewritten_model_file_is_loaded_afresh(continuer, tiny_sonnet_model, tmp_path):
    """Keyed on the resolved file and its modification time: a rewritten file serves its new weights, the
    older entries go, and a relative path shares the absolute path's entry."""
    path = tmp_path / "sonnet-model.pt"
    shutil.copy(tiny_sonnet_model, path)
    request = sonnet_request(str(path), SONNET_18, "greedy", max_new_tokens=4)
    list(continuer.stream(request))
    assert continuer.model(os.path.relpath(path)) is continuer.model(str(path))
    torch.manual_seed(1)
    save_model(GPT2Model(get_config("tiny")), path)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # a coarse clock: a later time
    list(continuer.stream(request))
    new = restore_task_model(path, "body").model.state_dict()
    assert all(torch.equal(v, new[k]) for k, v in continuer.model(str(path)).state_dict().items())
    assert sum(k[0] == path.resolve() for k in continuer.models) == 1
    assert sum(k[0][0] == path.resolve() for k in continuer.prepared) == 1


def test_the_shown_command_parses_back_into_the_settings():
    """``cli.generate.command_line`` is ``parse_settings`` read backwards, every flag from its table:
    ``--early_stopping true`` (a bool the demo's own flag writer wrote as a bare flag, which argparse refuses),
    ``--no_cache``, the pool, the quantisation."""
    for argv in (["--model", "gpt2", "--prompt", "a b", "--prompt", "c"],
                 ["--model", "gpt2", "--prompt=- a dash first", "--prompt=--x=y"],  # read back as prompts, not flags
                 ["--model", "gpt2", "--prompt", "x", "--num_beams", "3", "--early_stopping", "true", "--no_cache",
                  "--num_lines", "14", "--quantize", "int8", "--seed", "3"],
                 ["--model", "gpt2", "--prompt", "x", "--do_sample", "--temperature", "0.7", "--no_eos",
                  "--mbr_pool", "beam:4,sample:2", "--early_stopping", "never"],
                 ["--model", "gpt2", "--prompt", "x", "--penalty_alpha", "0.6", "--top_k", "4",
                  "--contrastive_mean_sim", "--contrastive_alpha_min", "0.2", "--draft_k", "3"]):
        settings = parse_settings(argv)
        assert parse_settings(command_line(settings)) == settings
        assert sorted(a.split("=")[0] for a in command_line(settings) if a.startswith("--")) == sorted(
            a.split("=")[0] for a in argv if a.startswith("--"))  # no flag more, none less


def test_a_run_folder_is_read_as_export_py_reads_it(tmp_path, tiny_sonnet_model):
    """A run folder without a final model file (an interrupted full-model run): its best checkpoint."""
    (tmp_path / "best.pt").write_bytes(b"")
    (tmp_path / "last.pt").write_bytes(b"")
    assert model_file(tmp_path) == tmp_path / "best.pt"
    assert model_file(tiny_sonnet_model.parent) == tiny_sonnet_model


def test_without_gradio_the_demo_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if not installed: importing it fails
    monkeypatch.delitem(sys.modules, "tasks.demo")
    monkeypatch.delitem(sys.modules, "demo")  # both imported afresh, and put back afterwards
    bare = importlib.import_module("demo")
    assert not bare.HAS_GRADIO
    with pytest.raises(SystemExit) as end:
        run_main(lambda: bare.main(["--model", "x.pt"]))
    assert end.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"error: {demo.INSTALL}"]
    assert demo.INSTALL.endswith("pip install -r requirements-demo.txt")


def test_only_the_models_asked_for_last_are_kept(continuer, tiny_sonnet_model, tmp_path):
    """A page that offers many runs keeps ``MODELS_KEPT`` restored models, the ones asked for last, and drops
    the prepared copies of the others with them."""
    paths = []
    for i in range(demo.MODELS_KEPT + 1):
        paths.append(tmp_path / f"run{i}" / "sonnet-model.pt")
        paths[-1].parent.mkdir()
        shutil.copy(tiny_sonnet_model, paths[-1])
    for path in paths:
        list(continuer.stream(sonnet_request(str(path), SONNET_18, "greedy", max_new_tokens=2)))
    continuer.model(str(paths[1]))  # asked for again: now the newest
    list(continuer.stream(sonnet_request(str(tiny_sonnet_model), SONNET_18, "greedy", max_new_tokens=2)))
    kept = [k[0] for k in continuer.models]
    assert demo.MODELS_KEPT == 2 and kept == [paths[1].resolve(), tiny_sonnet_model.resolve()]
    assert {k[0][0] for k in continuer.prepared} <= set(kept)
