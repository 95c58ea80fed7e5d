"""benchmarks/bench.py end to end on a tiny model: both halves in one run, so decoding must
compare the two sides on identical weights (the training half used to leave each side's own
trained weights, and float32 greedy agreement read 0.000 on gpt2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_then_decode_compares_identical_weights():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--model_size", "tiny", "--reps", "1", "--warmup", "0",
         "--batch_size", "2", "--seq_len", "16", "--new_tokens", "4", "--decode_batches", "1", "--quantize", "none",
         "--threads", "1"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if "greedy agreement" in line]
    assert len(lines) == 2 and all("greedy agreement 1.000" in line for line in lines), proc.stdout
