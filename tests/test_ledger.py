"""The cost ledger counts every attempt of a stage, also one killed with SIGKILL."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from p2d.aer import Ledger, aer_report

KILLED = textwrap.dedent("""
    import json, os, signal, sys, time
    from p2d.aer import Ledger
    path = sys.argv[1]
    with Ledger(path, heartbeat=0.02).stage("mine"):
        while not (json.load(open(path))["mine"]["running"] or {}).get("seconds"):
            time.sleep(0.01)  # until a heartbeat has recorded some work
        os.kill(os.getpid(), signal.SIGKILL)
""")


def test_killed_attempt_counts_when_the_stage_resumes(tmp_path):
    path = tmp_path / "ledger.json"
    proc = subprocess.run([sys.executable, "-c", KILLED, str(path)], timeout=120)
    assert proc.returncode == -9
    killed = json.loads(path.read_text())["mine"]["running"]["seconds"]
    assert killed > 0

    ledger = Ledger(path)
    with ledger.stage("mine", resume=True):
        pass
    entry = json.loads(path.read_text())["mine"]
    assert entry["attempts"] == 2 and entry["running"] is None
    assert entry["seconds"] >= killed
    report = aer_report(Ledger(path), {"seconds": 100.0})
    assert report["stages"]["mine"]["attempts"] == 2 and report["stages"]["mine"]["seconds"] == entry["seconds"]


def test_fresh_attempt_drops_the_earlier_cost(tmp_path):
    """A stage redone from scratch (changed options, --from-stage) costs only its new attempt."""
    path = tmp_path / "ledger.json"
    Ledger(path).record("train", 1000.0)
    ledger = Ledger(path)
    with ledger.stage("train", resume=False):
        pass
    entry = json.loads(path.read_text())["train"]
    assert entry["attempts"] == 1 and entry["seconds"] < 1000.0


def test_failed_attempt_is_kept_for_the_resume(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = Ledger(path)
    try:
        with ledger.stage("train"):
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert json.loads(path.read_text())["train"]["running"] is not None
    with Ledger(path).stage("train", resume=True):
        pass
    assert json.loads(path.read_text())["train"]["attempts"] == 2


def test_each_stage_reports_its_own_peak_memory(tmp_path):
    """A small stage after a large one reports its own peak, not the process's (on Linux, where VmHWM resets)."""
    import mmap

    import pytest

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs")
    ledger = Ledger(tmp_path / "ledger.json")
    with ledger.stage("proxy"):
        # 400 MiB of fresh pages, touched: an anonymous mapping, so no allocator can serve it from memory
        # an earlier test left resident (which would not raise the resident set at all)
        big = mmap.mmap(-1, 400 * 2**20)
        for offset in range(0, len(big), mmap.PAGESIZE):
            big[offset] = 1
        big.close()
    with ledger.stage("mine"):
        pass
    peak = {k: v.peak_memory_bytes for k, v in ledger.stages.items()}
    assert peak["proxy"] - peak["mine"] > 300 * 2**20
