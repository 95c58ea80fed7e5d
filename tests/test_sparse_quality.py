"""The sparse-attention time-vs-quality runner drives the sonnet task end to end on a tiny
model (the measurement itself is a benchmark, not a test)."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import sparse_quality
from methods.sparse_attention import sparse_attention_of
from tasks.restore import restore_task_model


def test_every_pattern_gets_a_row(tmp_path, capsys):
    out = tmp_path / "rows.json"
    rows = sparse_quality.main(["--random_init", "tiny", "--epochs", "1", "--limit", "2", "--max_length", "24",
                                "--max_new_tokens", "4", "--window", "8", "--block", "8", "--json", str(out),
                                "--out", str(tmp_path / "runs")])
    assert [r["pattern"] for r in rows] == ["dense", "window", "strided", "block_global"]
    for r in rows:
        assert r["sec_per_epoch"] > 0 and math.isfinite(r["dev_ppl"]) and r["dev_ppl"] > 1 and 0 <= r["dev_chrf"] <= 100
    assert json.loads(out.read_text())["rows"] == rows
    printed = capsys.readouterr().out
    assert "block_global" in printed and "--attn_pattern strided --attn_window 8" in printed
    for pattern in ("dense", "window", "strided", "block_global"):  # each run is the sonnet task's own
        settings = sparse_attention_of(restore_task_model(tmp_path / "runs" / pattern / "sonnet-model.pt").model)
        assert (settings.pattern if settings else "dense") == pattern


@pytest.mark.parametrize("flags, message", [(["--patterns", "dense,diagonal"], "unknown ['diagonal']"),
                                            (["--window", "0"], "must be >= 1")])
def test_bad_flags_exit_2(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        sparse_quality.main(["--random_init", "tiny", *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err
