"""benchmarks/gpu_suite.py runs end to end on the CPU with tiny shapes, so its one GPU run is not its first run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.py"


@pytest.mark.deepspeed
def test_gpu_suite_cpu_path(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert r["tiny"] and r["alps"]["heads"] == 32 and len(r["alps"]["times"]) == 3  # 8B shape scaled down: 4 x 8 heads
    assert [m["layers run"] for m in r["mining"]] == [2, 6]  # the early stop really stops after the shallow heads
    heads, full = r["training"]["heads"], r["training"]["full"]
    assert heads["frozen_bit_identical"] and heads["frozen_checked"] > 0
    assert heads["trainable_params"] < full["trainable_params"] == full["total_params"]
    assert r["optimizer_state_ratio"] == heads["optimizer_state_bytes"] / full["optimizer_state_bytes"] < 0.15
    assert set(r["deepspeed"]) == {"zero2", "zero3"}
    assert all("step_s" in d or d["status"].startswith(("not run", "failed")) for d in r["deepspeed"].values())
    md = (tmp_path / "gpu_suite.md").read_text()
    assert "tiny shapes, not a GPU figure" in md and "frozen weights" in md
