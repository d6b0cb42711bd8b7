"""AER accounting: what the whole pipeline cost against full-data, full-parameter training.

AER = (T_proxy + T_localize + T_mine + T_train) / T_ref, speedup = 1 / AER. Stage times are
wall-clock seconds of the run that produced each stage's output; a stage reused from cache keeps
the time it cost when it ran, so a re-run reports the same cost.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from p2d.io import read_json, write_json

STAGES = ("proxy", "localize", "mine", "train")


@dataclass
class StageTime:
    seconds: float
    gpu_seconds: float = 0.0


class Ledger:
    """Per-stage wall-clock (and GPU) seconds, persisted so cached stages keep their cost."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        raw = read_json(self.path) if self.path.is_file() else {}
        self.stages = {k: StageTime(**v) for k, v in raw.items()}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n_gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        if n_gpu:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        self.record(name, seconds, seconds * n_gpu)

    def record(self, name: str, seconds: float, gpu_seconds: float = 0.0) -> None:
        self.stages[name] = StageTime(seconds, gpu_seconds)
        write_json(self.path, {k: vars(v) for k, v in self.stages.items()})


def aer_report(ledger: Ledger, reference: dict) -> dict:
    """The aer.json contract: stages, total, reference {seconds, method}, aer, speedup."""
    stages = {name: vars(ledger.stages.get(name, StageTime(0.0))) for name in STAGES}
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
        table.add_row(name, f"{s['seconds']:.1f}", f"{s['seconds'] / ref:.1%}" if ref else "-")
    table.add_row("[bold]P2D total", f"[bold]{report['total_seconds']:.1f}", f"[bold]{report['aer']:.1%}")
    table.add_row(f"reference ({report['reference']['method']})", f"{ref:.1f}", "100.0%")
    table.caption = f"AER = {report['aer']:.3f}   speedup = {report['speedup']:.2f}x"
    return table


def write_aer(out_dir: str | Path, report: dict) -> None:
    from p2d.plots import plot_aer

    out_dir = Path(out_dir)
    write_json(out_dir / "aer.json", report)
    plot_aer(report, out_dir / "aer.png")


def measure_reference(model_spec: str, data: list, pad_id: int, config, steps: int = 4, seed: int = 0,
                      work_dir: str | Path | None = None) -> dict:
    """T_ref: full-parameter training on the whole pool, timed on `steps` steps and extrapolated.

    One run of steps + 1 full-parameter steps on a seeded random sample of the pool; the first step
    (allocations, the optimizer's state) is not timed. Cost is counted in padded positions, because
    a step computes on its padding too: a small random sample pads far more (10-15% on the mixed
    benchmark pool) than the whole pool grouped by length (under 1%), and counting only real tokens
    overestimated T_ref by 1.4-1.6x. T_ref = padded positions of the real run's plan × epochs /
    measured positions per second.
    """
    import random
    import shutil
    import tempfile
    from dataclasses import replace

    from p2d.geometry import AttentionGeometry
    from p2d.masking import apply_scope
    from p2d.models import load_model
    from p2d.trainer import step_plan, train

    model, _ = load_model(model_spec)
    apply_scope(model, AttentionGeometry.from_config(model.config), "full")
    rng = random.Random(seed)
    sample = rng.sample(data, min(len(data), (steps + 1) * config.batch_size * config.grad_accum))
    work = Path(tempfile.mkdtemp(dir=work_dir))
    try:
        run = train(model, sample, pad_id, replace(config, max_steps=steps + 1, save_every=10**9), work / "timed",
                    progress=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    timed = slice(1, None) if len(run.step_seconds) > 1 else slice(None)
    positions_per_s = sum(run.step_positions[timed]) / max(sum(run.step_seconds[timed]), 1e-9)
    lengths = [min(len(t), config.max_length) for t in data]
    epochs = config.epochs if config.max_steps is None else 1
    plan = step_plan(lengths, config, 0)
    positions = epochs * sum(max(lengths[i] for i in mb) * len(mb) for step in plan for mb in step)
    return {"seconds": positions / positions_per_s,
            "method": f"extrapolated from {len(run.step_seconds[timed])} timed full-parameter steps",
            "positions_per_s": positions_per_s, "pool_tokens": sum(lengths), "padded_positions": positions,
            "epochs": epochs, "samples": len(data)}
