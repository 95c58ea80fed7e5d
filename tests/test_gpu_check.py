"""``benchmarks/gpu_check.py``, the GPU acceptance run, in its reduced CPU mode: the rows it would
run on a GPU are all there, those that can run on a CPU pass, and the CUDA-only ones say why they
were skipped. Only the classifier among the task scripts runs here (``tests/test_hub_cache.py``
runs all four on the same kind of cache), so that the whole command stays quick."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.gpu_check import CPU_PLAN, same_tokens
from benchmarks.gpu_rows import Report, Row, Skip, run_wrapped

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_smoke_runs_every_row_and_names_each_skip(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--cpu-smoke",
                           "--tasks", "classifier", "--jobs", "1", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["mode"] == "cpu-smoke" and report["failed"] == 0
    rows = {r["name"]: r for r in report["rows"]}
    passed = {n for n, r in rows.items() if r["status"] == "pass"}
    assert {"fake hub cache", "task classifier float32", "parity gpt2", "parity gpt2-medium",
            "train gpt2 bf16", "train gpt2-medium bf16", "decode gpt2 B=1 float32", "decode gpt2 B=1 bf16",
            "decode gpt2 B=8 float32", "decode gpt2 B=8 bf16", "decode gpt2 B=1 int8"} <= passed
    for name in ("tokens cpu=cuda greedy", "tokens cpu=cuda beam", "torchrun ddp (gloo)", "torchrun fsdp (gloo)",
                 "task classifier bf16", "task classifier float32 compile", "train gpt2-medium bf16 ours compiled",
                 "task sonnet"):
        assert rows[name]["status"] == "skipped", name
    for r in rows.values():
        assert r["status"] in ("pass", "skipped")
        if r["status"] == "skipped":
            assert r["reason"] and f"[skipped] {r['name']} ({r['reason']})" in proc.stdout
        else:
            assert r["peak_mib"] and r["peak_mib"] > 0, r
    assert float(rows["parity gpt2"]["numbers"]["float32_max_abs"]) <= 1e-5
    assert rows["train gpt2 bf16"]["numbers"]["ours tok/s"] > 0
    assert rows["train gpt2 bf16"]["numbers"]["transformers tok/s"] > 0
    assert rows["decode gpt2 B=8 bf16"]["numbers"]["transformers ms/token"] > 0
    table = (out / "gpu_check.md").read_text()
    assert "| parity gpt2 | pass |" in table and "| tokens cpu=cuda beam | skipped: needs CUDA" in table


def test_a_failing_row_does_not_stop_the_others_and_the_budget_skips_late_rows(tmp_path):
    report = Report(torch.device("cpu"), budget_s=60, out=tmp_path, header={"mode": "test"})

    def fails(r):
        r.numbers["before"] = 1
        raise RuntimeError("boom")

    def skips(r):
        raise Skip("not here")

    report.check("a", fails)
    assert json.loads((tmp_path / "gpu_check.json").read_text())["failed"] == 1  # written row by row
    report.check("b", lambda r: r.numbers.update(x=2))
    report.check("c", skips)
    report.budget_s = -1.0  # spent
    report.check("d", lambda r: r.numbers.update(never=True))
    got = {r.name: (r.status, r.reason, r.numbers) for r in report.rows}
    assert got == {"a": ("fail", "RuntimeError: boom", {"before": 1}), "b": ("pass", "", {"x": 2}),
                   "c": ("skipped", "not here", {}),
                   "d": ("skipped", "the time budget of -1 s (--budget_s) was spent", {})}
    assert [r.name for r in report.failed()] == ["a"]
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["failed"] == 1 and [r["name"] for r in data["rows"]] == ["a", "b", "c", "d"]
    assert "| a | fail: RuntimeError: boom | before 1 |" in (tmp_path / "gpu_check.md").read_text()


@pytest.mark.parametrize("beams", [1, 4])
def test_the_cpu_cuda_token_row_compares_two_devices(beams, hub_cache, use_hub_cache):
    """The CUDA-only row's own code, with the CPU standing in for CUDA: equal tokens pass."""
    use_hub_cache(hub_cache)
    row = Row("tokens")
    same_tokens(row, CPU_PLAN, beams, torch.device("cpu"))
    assert row.numbers == {"new_tokens": CPU_PLAN.new_tokens, "num_beams": beams, "agreement": 1.0}
    with pytest.raises(Skip, match="needs CUDA"):
        same_tokens(row, CPU_PLAN, beams, None)


def test_a_failing_subprocess_row_fails_with_its_last_error_lines_and_peak(tmp_path):
    script = tmp_path / "broken.py"
    script.write_text("import sys\nprint('step one', file=sys.stderr)\nsys.exit('bad thing: ' + sys.argv[1])\n")
    report = Report(torch.device("cpu"), budget_s=600)
    row = run_wrapped("broken", [str(script), "flag"], tmp_path / "home", tmp_path, report, until=600)
    assert row.status == "fail" and row.reason == "exit 1: step one / bad thing: flag", row.reason
    assert row.peak_mib and row.peak_mib > 0  # the wrapper reported the child's own peak
    late = run_wrapped("late", [str(script)], tmp_path / "home", tmp_path, report, until=0)
    assert late.status == "skipped" and "share of --budget_s" in late.reason
