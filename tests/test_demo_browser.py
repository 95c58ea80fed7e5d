"""The sonnet demo (``demo.py``, ``tasks.demo``) in a real browser: headless Chromium (the system's, driven by
Playwright) opens the page ``demo.py`` serves for a tiny random model, types the opening lines, picks the decoding,
clicks Generate and reads a sonnet that must equal what ``generate.py`` prints for the same settings.

Chromium, Playwright and Gradio are not optional here: where one is missing the test fails and says how to
install it (``.ci/run`` runs ``setup.sh --demo`` and installs Chromium on CI's fresh machine), so the page is
never silently left untested. The page's functions without a browser: ``tests/test_demo_page.py``.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

try:
    import gradio  # noqa: F401  (the page's)
    from playwright.sync_api import Page, sync_playwright
except ModuleNotFoundError:
    pytest.fail("the demo's browser test needs the demo extras: bash setup.sh --demo (or pip install -r "
                "requirements-demo.txt)", pytrace=False)

import demo
import generate
from cli.demo import DemoSettings
from cli.generate import GenerateSettings, command_line, parse_settings
from errors import InputError
from tasks.demo import (
    SONNET_18,
    STRATEGIES,
    STRATEGY_SETTINGS,
    generation_config,
    model_file,
    sonnet_models,
    sonnet_request,
)

# gradio's queue calls pandas in ways pandas 3 deprecates: not ours to fix
pytestmark = [pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
              pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated")]
SLIDERS = dict(max_new_tokens=40, temperature=0.7, top_k=4, top_p=0.8, num_beams=3, length_penalty=1.0,
               penalty_alpha=0.6, no_repeat_ngram_size=0, repetition_penalty=1.0)
POOL = "sample:3,greedy:1"  # MBR's candidates in the test: small, and a sampled one must win or lose by chrF


def chromium() -> str:
    """The system Chromium (``$CHROMIUM`` if set); a failure that says how to install it, never a skip."""
    found = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.fail("the demo's browser test needs headless Chromium: apt-get install -y chromium (Debian/Ubuntu; "
                    ".ci/run does this), or set CHROMIUM=/path/to/chrome")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(settings: DemoSettings) -> Iterator[str]:
    """``demo.py``'s page for ``settings``, served on localhost (in this process: the test imports the
    libraries once): its URL."""
    page, _ = demo.build(settings)
    page.launch(server_name=settings.host, server_port=settings.port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://{settings.host}:{settings.port}/"
    finally:
        page.close()


@contextlib.contextmanager
def browser_page(url: str) -> Iterator[Page]:
    """The page at ``url`` in headless Chromium, loaded."""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            page.wait_for_selector("#generate")
            yield page
        finally:
            browser.close()


@pytest.fixture(scope="module")
def server(tiny_sonnet_model) -> Iterator[str]:
    """``python demo.py --model MODEL --port PORT`` on a free port."""
    settings = DemoSettings(model=str(tiny_sonnet_model), runs=str(tiny_sonnet_model.parent / "none"), port=free_port())
    with served(settings) as url:
        yield url


def pick(page: Page, strategy: str) -> None:
    """Choose ``strategy``, and wait for its settings to show (the page shows them after a round trip)."""
    page.get_by_label(strategy, exact=True).check()
    for name in STRATEGY_SETTINGS[strategy]:
        page.locator(f"#{name}").wait_for(state="visible")


def set_sliders(page: Page, values: dict[str, float]) -> None:
    """Each visible slider's number box set (a hidden one keeps its value: the page sends the ones shown)."""
    for name, value in values.items():
        box = page.locator(f"#{name} input[type=number]")
        if box.is_visible():
            box.fill(str(value))
            box.press("Enter")


def make_sonnet(page: Page, prompt: str, strategy: str, sliders: dict[str, float],
                screenshot: Path | None = None) -> tuple[str, str]:
    """Type ``prompt``, pick ``strategy`` and its ``sliders``, click Generate: the sonnet and the
    ``generate.py`` command shown (settings that differ from the last sonnet's: the new command tells
    the new answer apart)."""
    pick(page, strategy)
    set_sliders(page, sliders)
    if "mbr_pool" in STRATEGY_SETTINGS[strategy]:
        page.locator("#mbr_pool textarea").fill(POOL)
    page.locator("#prompt textarea").fill(prompt)
    before = page.locator("#command textarea").input_value()
    page.locator("#generate").click()
    page.wait_for_function("v => !['', v].includes(document.querySelector('#command textarea').value)",
                           arg=before, timeout=60_000)
    if screenshot is not None:
        page.screenshot(path=str(screenshot), full_page=True)
    return page.locator("#sonnet textarea").input_value(), page.locator("#command textarea").input_value()


def test_the_page_makes_the_sonnet_generate_py_makes(server, tiny_sonnet_model, tmp_path, capsys):
    with browser_page(server) as page:
        assert not page.locator("#num_beams").is_visible()  # only the chosen strategy's settings show
        shown = {}
        for strategy in ("greedy", "beam", "mbr"):  # streamed; shown when done; MBR
            shown[strategy] = make_sonnet(page, SONNET_18, strategy, SLIDERS, tmp_path / f"demo-{strategy}.png")
    assert (tmp_path / "demo-greedy.png").stat().st_size > 10_000
    model, prompt = [f"--model={tiny_sonnet_model}"], [f"--prompt={SONNET_18}"]
    wanted = {"greedy": ["--max_new_tokens", "40"], "beam": ["--max_new_tokens", "40", "--num_beams", "3"],
              "mbr": ["--max_new_tokens", "40", "--temperature", "0.7", "--top_p", "0.8", "--mbr_pool", POOL]}
    for strategy, (sonnet, command) in shown.items():
        argv = shlex.split(command)
        assert argv == ["python", "generate.py", *model, *prompt, *wanted[strategy], "--num_lines", "14"]
        assert sonnet.startswith(SONNET_18) and len(sonnet) > len(SONNET_18)
        capsys.readouterr()
        assert generate.main(argv[2:]) == [[sonnet]]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_each_strategy_reads_as_generate_py_flags(strategy, tiny_sonnet_model):
    """The page's settings and generate.py's flags are one vocabulary: the flags the page shows parse back
    into the very settings (``GenerationConfig``, MBR pool) the page decoded with."""
    request = sonnet_request(str(tiny_sonnet_model), "x", strategy, mbr_pool=POOL, **SLIDERS)
    assert request.generation.strategy == {"top-p": "sample", "mbr": "greedy"}.get(strategy, strategy)
    assert (request.pool is not None) == (strategy == "mbr")
    settings = GenerateSettings(model=request.model, prompts=("x",), generation=request.generation,
                                pool=request.pool, num_lines=14)
    assert parse_settings(command_line(settings)) == settings


def test_bad_settings_and_models_are_one_line(tmp_path, tiny_sonnet_model):
    with pytest.raises(ValueError, match="top_k >= 2"):
        generation_config("contrastive", **{**SLIDERS, "top_k": 0})
    with pytest.raises(InputError, match="no such model file or run folder"):
        demo.main(["--model", str(tmp_path / "nothing.pt")])
    with pytest.raises(InputError, match="no sonnet run under"):
        demo.main(["--runs", str(tmp_path)])
    assert model_file(tiny_sonnet_model.parent) == tiny_sonnet_model  # a run folder: its model file


def test_the_newest_sonnet_run_comes_first_once(tmp_path, monkeypatch):
    """The model picker's runs: each run's sonnet-model.pt, newest first, not again through ``latest``
    (a symlink, or where symlinks fail a pointer file, which ``model_file`` reads)."""
    older, newer = (tmp_path / "full-model-tiny" / name / "sonnet-model.pt" for name in ("b", "a"))
    for n, path in enumerate((older, newer)):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"")
        os.utime(path, (1_000_000 + n, 1_000_000 + n))
    (tmp_path / "full-model-tiny" / "latest").symlink_to("a")
    assert sonnet_models(tmp_path) == [newer, older]
    (tmp_path / "full-model-tiny" / "latest").unlink()
    (tmp_path / "full-model-tiny" / "latest").write_text("b\n")
    assert model_file(tmp_path / "full-model-tiny" / "latest") == older


def screenshot(model: str, out: str, strategy: str = "greedy", prompt: str = SONNET_18, **sliders: float) -> str:
    """The page's picture after one sonnet of ``model`` (the docs' ``docs/img/demo.png``), made by the code
    the test drives the page with; returns the sonnet."""
    with served(DemoSettings(model=model, runs="/nonexistent", port=free_port())) as url, browser_page(url) as page:
        return make_sonnet(page, prompt, strategy, sliders, Path(out))[0]
