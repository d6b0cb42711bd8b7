"""ALPS scoring time for every head of a model pair: SmolLM2-135M (real weights) and Llama-3.2-1B / 3.1-8B shapes.

Scoring only reads q/k/v, so the large shapes never build a model: an in-memory reader serves seeded
random q/k/v tensors (bf16, like the released checkpoints) and a perturbed twin stands in for the
task model. All tensors exist before the clock starts, so the time is p2d.alps.score_heads alone
(float64 maths, host-to-device copies included): the median of --repeats runs after one warm-up.
Target (GPU): the 8B pair in under 5 s on one H100; on a CPU the figures are only reported.

    python benchmarks/alps_speed.py [--device cuda]
    python benchmarks/alps_speed.py --quick   # SmolLM2 only, nothing in docs/
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _report import emit, table  # noqa: E402

from p2d.alps import SafetensorsReader, score_heads  # noqa: E402
from p2d.geometry import AttentionGeometry  # noqa: E402
from p2d.models import default_device, resolve_model  # noqa: E402

QKV = ("q_proj", "k_proj", "v_proj")
SHAPES = {"Llama-3.2-1B": AttentionGeometry("llama", 16, 32, 8, 64, 2048),
          "Llama-3.1-8B": AttentionGeometry("llama", 32, 32, 8, 128, 4096)}
TARGET_S = {"Llama-3.1-8B": 5.0}  # on one H100
PERTURB = 0.01  # task = base + PERTURB · std(base) · noise: a fine-tune-sized change that survives bf16


class MemoryReader:
    """A WeightReader over q/k/v tensors already in memory."""

    def __init__(self, geometry: AttentionGeometry, weights: dict[tuple[int, str], torch.Tensor]):
        self.geometry = geometry
        self.weights = weights

    def get(self, layer: int, name: str) -> torch.Tensor:
        return self.weights[layer, name]


def shape(geom: AttentionGeometry, name: str) -> tuple[int, int]:
    rows = geom.num_heads if name == "q_proj" else geom.num_kv_heads
    return rows * geom.head_dim, geom.hidden_size


def random_weights(geom: AttentionGeometry, seed: int = 0) -> dict[tuple[int, str], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {(l, n): (torch.randn(shape(geom, n), generator=g) * 0.02).to(torch.bfloat16)
            for l in range(geom.num_layers) for n in QKV}


def perturbed(weights: dict, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, w in weights.items():
        w32 = w.float()
        out[k] = (w32 + PERTURB * w32.std() * torch.randn(w.shape, generator=g)).to(w.dtype)
    return out


def smollm2_weights() -> tuple[AttentionGeometry, dict]:
    reader = SafetensorsReader(resolve_model("smollm2-135m"))
    geom = reader.geometry
    return geom, {(l, n): reader.get(l, n) for l in range(geom.num_layers) for n in QKV}


def time_scoring(base: MemoryReader, task: MemoryReader, device: torch.device, repeats: int) -> list[float]:
    """Wall seconds of score_heads over all heads, after one untimed warm-up (CUDA context, kernels)."""
    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        score_heads(base, task, device=device)  # returns numpy: the result is on the host when it ends
        return time.perf_counter() - t0

    once()
    return [once() for _ in range(repeats)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default=str(default_device()))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="SmolLM2 only; nothing in docs/")
    ap.add_argument("--no-publish", action="store_true", help="write to --out-dir only, not docs/")
    ap.add_argument("--out-dir", type=Path, help="where results go without publishing (default: a temp dir)")
    args = ap.parse_args()
    device = torch.device(args.device)

    rows = []
    for name in ["SmolLM2-135M"] + ([] if args.quick else list(SHAPES)):
        if name == "SmolLM2-135M":
            geom, base = smollm2_weights()
            kind = "real weights vs perturbed"
        else:
            geom, base = SHAPES[name], random_weights(SHAPES[name])
            kind = "random bf16 vs perturbed"
        task = perturbed(base)
        times = time_scoring(MemoryReader(geom, base), MemoryReader(geom, task), device, args.repeats)
        del base, task
        sec = statistics.median(times)
        row = {"model": name, "weights": kind, "layers × heads": f"{geom.num_layers} × {geom.num_heads}",
               "kv heads": geom.num_kv_heads, "head_dim": geom.head_dim, "hidden": geom.hidden_size,
               "device": str(device), "seconds": sec, "min s": min(times), "ms/layer": 1000 * sec / geom.num_layers,
               "times": times}
        if name in TARGET_S and device.type == "cuda":
            row["target"] = f"< {TARGET_S[name]:g} s: {'met' if sec < TARGET_S[name] else 'not met'}"
        rows.append(row)
        print(f"{name:14s} {sec:8.3f} s  {times}", flush=True)

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    md = "\n".join([
        f"`p2d.alps.score_heads` (metric w1, tau 1, float64) over every head of a base/task pair on {gpu}; "
        f"median of {args.repeats} runs after one warm-up. Weights are in memory before timing (reading a "
        f"checkpoint is not included; host-to-device copies are). Task = base + {PERTURB:g}·std·noise.",
        "",
        table(rows, ["model", "weights", "layers × heads", "kv heads", "head_dim", "hidden", "device", "seconds",
                     "min s", "ms/layer"] + (["target"] if any("target" in r for r in rows) else [])),
        "",
        "Target: Llama-3.1-8B in < 5 s on one H100" + ("." if device.type == "cuda" else
                                                     " (GPU target; this run is on the CPU, so it is not judged)."),
    ])
    print(md)
    results = {"device": str(device), "repeats": args.repeats, "rows": rows}
    local = (args.out_dir or Path(tempfile.mkdtemp(prefix="p2d-bench-alps-speed-"))) if args.quick or args.no_publish else None
    emit("alps_speed", "ALPS scoring time", md, results, local)


if __name__ == "__main__":
    main()
