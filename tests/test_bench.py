"""benchmarks/bench.py end to end on a tiny model: both halves in one run, so decoding must
compare the two sides on identical weights (the training half used to leave each side's own
trained weights, and float32 greedy agreement read 0.000 on gpt2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from benchmarks import bench
from config import get_config
from models.gpt2 import GPT2Model

ROOT = Path(__file__).resolve().parents[1]


def test_train_then_decode_compares_identical_weights():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--model_size", "tiny", "--reps", "1", "--warmup", "0",
         "--batch_size", "2", "--seq_len", "16", "--new_tokens", "4", "--decode_batches", "1", "--quantize", "none",
         "--threads", "1"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if "greedy agreement" in line]
    assert len(lines) == 2 and all("greedy agreement 1.000" in line for line in lines), proc.stdout


def test_the_bandwidth_bound_is_measured_once_per_quantisation(monkeypatch, capsys):
    """The bound depends on the weights' representation only, not on the decoding cache: the matvec
    rate is measured once for each --quantize, and printed for every cache variant."""
    measured: list[str] = []
    monkeypatch.setattr(bench, "matvec_bandwidth", lambda device, kind: measured.append(kind) or {"kernel": 1e9})
    monkeypatch.setattr(bench, "decode_fn", lambda model, side, args, B: lambda: torch.zeros(1, 8, dtype=torch.long))
    monkeypatch.setattr(bench, "time_interleaved", lambda fns, *a: ({k: 1e-3 for k in fns}, {k: [1e-3] for k in fns}))
    monkeypatch.setattr(bench, "peak_memory", lambda fns, *a: {k: 1.0 for k in fns})
    ours = GPT2Model(get_config("tiny"))
    hf = SimpleNamespace(transformer=SimpleNamespace(wte=ours.wte))
    args = SimpleNamespace(model_size="tiny", prompt_len=4, new_tokens=4, decode_batches=[1], warmup=0, reps=1,
                           quantize=["none", "int8"], bf16_decode=False, decode_cache=["dynamic", "static", "compiled"])
    bench.bench_decode(ours, hf, args, torch.device("cpu"))
    assert measured == ["float32", "int8"]
    bounds = [line for line in capsys.readouterr().out.splitlines() if line.startswith("bandwidth bound")]
    assert len(bounds) == 6 and sum("ours+compiled" in line for line in bounds) == 2
