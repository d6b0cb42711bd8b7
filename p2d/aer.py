"""AER accounting: what the whole pipeline cost against full-data, full-parameter training.

AER = (T_proxy + T_localize + T_mine + T_train) / T_ref, speedup = 1 / AER. Stage times are
wall-clock seconds of every attempt that produced each stage's output (a killed and resumed stage
counts both); a stage reused from cache keeps the time it cost when it ran, so a re-run reports the
same cost.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from p2d.io import read_json, write_json

STAGES = ("proxy", "localize", "mine", "train")


HEARTBEAT_S = 5.0  # how often a running stage writes its elapsed time: a killed attempt loses at most this


@dataclass
class StageTime:
    seconds: float = 0.0  # every finished or killed attempt of the stage's current output, summed
    gpu_seconds: float = 0.0
    attempts: int = 0
    peak_memory_bytes: int = 0  # GPU: max allocated during the stage; CPU: peak RSS during the stage (Linux)
    running: dict | None = None  # the attempt in progress, as of its last heartbeat: {seconds, gpu_seconds}


class Ledger:
    """Per-stage wall-clock (and GPU) seconds, persisted so cached stages keep their cost.

    A stage that is killed and resumed costs both attempts: while a stage runs, a heartbeat
    thread writes its elapsed time every `heartbeat` seconds, and the resumed attempt adds what
    the killed one had recorded.
    """

    def __init__(self, path: str | Path, heartbeat: float = HEARTBEAT_S):
        self.path = Path(path)
        self.heartbeat = heartbeat
        raw = read_json(self.path) if self.path.is_file() else {}
        self.stages = {k: StageTime(**v) for k, v in raw.items()}
        self._lock = threading.Lock()

    def _save(self) -> None:
        with self._lock:
            write_json(self.path, {k: vars(v) for k, v in self.stages.items()})

    @contextlib.contextmanager
    def stage(self, name: str, resume: bool = False) -> Iterator[None]:
        """Time one attempt of stage `name`; `resume`: it continues an earlier attempt, whose cost counts."""
        n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
        prior = self.stages.get(name) if resume else None
        entry = StageTime()
        if prior is not None:
            killed = prior.running or {"seconds": 0.0, "gpu_seconds": 0.0}
            entry = StageTime(prior.seconds + killed["seconds"], prior.gpu_seconds + killed["gpu_seconds"], prior.attempts)
        entry.attempts += 1
        entry.running = {"seconds": 0.0, "gpu_seconds": 0.0}
        self.stages[name] = entry
        self._save()
        if n_gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            _reset_peak_rss()
        start = time.perf_counter()
        stop = threading.Event()

        def elapsed() -> dict:
            s = time.perf_counter() - start
            return {"seconds": s, "gpu_seconds": s * n_gpu}

        def beat() -> None:
            while not stop.wait(self.heartbeat):
                entry.running = elapsed()
                self._save()

        thread = threading.Thread(target=beat, name=f"p2d-ledger-{name}", daemon=True)
        thread.start()
        try:
            yield
            if n_gpu:
                torch.cuda.synchronize()
        finally:  # an error leaves the attempt as `running`, so a resume counts it
            stop.set()
            thread.join()
            entry.running = elapsed()
            self._save()
        entry.seconds += entry.running["seconds"]
        entry.gpu_seconds += entry.running["gpu_seconds"]
        entry.running = None
        entry.peak_memory_bytes = max(entry.peak_memory_bytes, peak_memory(n_gpu))
        self._save()

    def record(self, name: str, seconds: float, gpu_seconds: float = 0.0) -> None:
        self.stages[name] = StageTime(seconds, gpu_seconds, 1)
        self._save()


def _reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS count (VmHWM), so a stage reports its own peak, not an earlier stage's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux, or not allowed: the peak stays the process's so far
        pass


def peak_memory(n_gpu: int) -> int:
    """Bytes: the GPUs' max allocated since the stage's reset, else this process's peak resident set
    since `_reset_peak_rss` (VmHWM), or since the process started where that is unavailable."""
    if n_gpu:
        return sum(torch.cuda.max_memory_allocated(i) for i in range(n_gpu))
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def aer_report(ledger: Ledger, reference: dict) -> dict:
    """The aer.json contract: stages, total, reference {seconds, method}, aer, speedup."""
    stages = {name: {k: v for k, v in vars(ledger.stages.get(name, StageTime())).items() if k != "running"}
              for name in STAGES}
    total = sum(s["seconds"] for s in stages.values())
    aer = total / reference["seconds"] if reference["seconds"] > 0 else float("inf")
    return {"stages": stages, "total_seconds": total, "reference": reference, "aer": aer,
            "speedup": 1.0 / aer if aer > 0 else float("inf")}


def aer_table(report: dict):
    """A rich table of the report, for the terminal."""
    from rich.table import Table

    table = Table(title="AER: P2D end-to-end cost vs full-data full-parameter training")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    table.add_column("share of reference", justify="right")
    ref = report["reference"]["seconds"]
    for name, s in report["stages"].items():
        label = name + (f" ({s['attempts']} attempts)" if s.get("attempts", 1) > 1 else "")
        table.add_row(label, f"{s['seconds']:.1f}", f"{s['seconds'] / ref:.1%}" if ref else "-")
    table.add_row("[bold]P2D total", f"[bold]{report['total_seconds']:.1f}", f"[bold]{report['aer']:.1%}")
    table.add_row(f"reference ({report['reference']['method']})", f"{ref:.1f}", "100.0%")
    table.caption = f"AER = {report['aer']:.3f}   speedup = {report['speedup']:.2f}x"
    return table


def write_aer(out_dir: str | Path, report: dict) -> None:
    from p2d.plots import plot_aer

    out_dir = Path(out_dir)
    write_json(out_dir / "aer.json", report)
    plot_aer(report, out_dir / "aer.png")
