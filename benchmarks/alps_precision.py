"""Does ALPS need float64? The ranking of real proxy-run scores computed in float32 against float64.

The float32 path is the straightforward one (softmax, then the two CDFs, then their mean absolute
difference, all in float32), as a reimplementation without p2d's care would do it. A proxy fine-tune
moves each head's 36,864-entry distribution very little, so the question is whether float32 rounding
in the CDFs (cumulative sums up to 1.0 with ~6e-8 relative precision) swamps the signal.

    python benchmarks/alps_precision.py --base smollm2-135m --task runs/localize-code/proxy/task_model
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).parent))
from _report import emit, table  # noqa: E402

from p2d.alps import reader_for, score_heads  # noqa: E402
from p2d.selection import select_heads  # noqa: E402


@torch.no_grad()
def naive_scores(base, task, dtype: torch.dtype) -> np.ndarray:
    """W1 = mean |CDF_base - CDF_task| with every step in `dtype`."""
    rb, rt = reader_for(base), reader_for(task)
    g = rb.geometry
    out = np.zeros((g.num_layers, g.num_heads))
    for layer in range(g.num_layers):
        cdfs = []
        for r in (rb, rt):
            q, k, v = (r.get(layer, n).to(dtype) for n in ("q_proj", "k_proj", "v_proj"))
            q, k, v = q.view(g.num_heads, g.head_dim, -1), k.view(g.num_kv_heads, g.head_dim, -1), v.view(g.num_kv_heads, g.head_dim, -1)
            group = torch.arange(g.num_heads) // g.group_size
            w = q.transpose(1, 2) @ (k @ v.transpose(1, 2))[group]
            cdfs.append(torch.cumsum(torch.softmax(w.reshape(g.num_heads, -1), -1), -1))
        out[layer] = (cdfs[0] - cdfs[1]).abs().mean(-1).double().numpy()
    return out


def compare(ref: np.ndarray, other: np.ndarray, frac: float) -> dict:
    k = math.ceil(frac * ref.size)
    top_ref, top_other = set(select_heads(ref, frac)), set(select_heads(other, frac))
    return {"spearman": float(spearmanr(ref.ravel(), other.ravel()).statistic),
            f"top-{k} overlap": f"{len(top_ref & top_other)}/{k}",
            "median rel. error": float(np.median(np.abs(other - ref) / np.maximum(np.abs(ref), 1e-300)))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--task", required=True, help="a proxy task model (e.g. runs/localize-code/proxy/task_model)")
    ap.add_argument("--head-frac", type=float, default=0.1)
    ap.add_argument("--no-publish", action="store_true")
    args = ap.parse_args()
    p2d64 = score_heads(args.base, args.task)
    rows = []
    for name, scores in (("p2d (float64, CDF of the difference)", p2d64),
                         ("naive float64", naive_scores(args.base, args.task, torch.float64)),
                         ("naive float32", naive_scores(args.base, args.task, torch.float32))):
        rows.append({"computation": name, **compare(p2d64, scores, args.head_frac)})
    cols = list(rows[0])
    md = "\n".join([
        f"Scores of every head of `{args.base}` against the proxy task model `{args.task}`, compared with "
        "p2d's float64 scores (range "
        f"{p2d64.min():.2e} to {p2d64.max():.2e}).", "", table(rows, cols)])
    print(md)
    emit("alps_precision", "ALPS: float64 against float32", md, {"rows": rows}, Path("/tmp") if args.no_publish else None)


if __name__ == "__main__":
    main()
