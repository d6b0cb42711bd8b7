"""How close is `p2d run`'s extrapolated reference to a measured full-data, full-parameter epoch?

AER divides P2D's cost by T_ref, so an optimistic T_ref inflates every speedup p2d reports. The
quality grid's `all/full` cell trains that epoch for real on the 1,200-row mixed pool; this runs
`p2d.aer.measure_reference` (what `p2d run` uses) on the same pool and training settings with a
few seeds, and compares.

    python benchmarks/reference_check.py        # after quality_grid.py --cells all/full
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _report import DOCS, emit, table  # noqa: E402
from pools import build_mixed_pool  # noqa: E402

from p2d import P2DError  # noqa: E402
from p2d.aer import measure_reference  # noqa: E402
from p2d.data import to_examples  # noqa: E402
from p2d.io import read_json  # noqa: E402
from p2d.models import load_tokenizer  # noqa: E402
from p2d.tokens import tokenize  # noqa: E402
from p2d.trainer import TrainConfig  # noqa: E402

MODEL = "smollm2-135m"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", type=Path, default=DOCS / "results" / "quality_grid_raw.json")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=4, help="timed steps (p2d run's --reference-steps)")
    ap.add_argument("--no-publish", action="store_true")
    args = ap.parse_args()
    grid = read_json(args.grid)
    cell = grid["cells"].get("all/full/s0")
    if cell is None:
        raise P2DError(f"{args.grid} has no all/full cell: run quality_grid.py --cells all/full first")
    s = grid["settings"]
    cfg = TrainConfig(batch_size=s["batch_size"], max_length=s["max_length"], epochs=s["epochs"])
    tok = load_tokenizer(MODEL)
    data = tokenize(to_examples(build_mixed_pool()[0], "mixed-pool"), tok, cfg.max_length)
    rows = []
    for seed in args.seeds:
        t0 = time.perf_counter()
        ref = measure_reference(MODEL, data, tok.pad_token_id, cfg, args.steps, seed)
        rows.append({"seed": seed, "estimate s": round(ref["seconds"]), "positions/s": round(ref["positions_per_s"], 1),
                     "÷ measured": round(ref["seconds"] / cell["train_seconds"], 2),
                     "cost of the estimate s": round(time.perf_counter() - t0)})
        print(rows[-1], flush=True)
    ratios = [r["÷ measured"] for r in rows]
    md = "\n".join([
        f"`p2d.aer.measure_reference` ({args.steps} timed steps after one untimed step, padded positions) on the "
        f"1,200-row mixed pool, batch {cfg.batch_size}, max length {cfg.max_length}, {cfg.epochs} epoch, against the "
        f"quality grid's measured `all/full` cell: {cell['train_seconds']:.0f} s "
        f"({cell['train_tokens']:,} tokens at {cell['tokens_per_s']:.0f} tokens/s).",
        "",
        table(rows, ["seed", "estimate s", "positions/s", "÷ measured", "cost of the estimate s"]),
        "",
        f"**What this shows.** The estimate is {min(ratios):.2f}–{max(ratios):.2f}× the measured epoch, so speedups "
        f"that `p2d run` reports are that much too high. Up to commit 9990a51 the estimate counted only real tokens "
        f"and timed a fresh optimizer's first step; it came out 1.40× and 1.58× (1,390 s and 1,575 s in "
        f"`benchmarks/cost.py`). `p2d run --measure-reference` times the whole epoch instead.",
    ])
    print(md)
    emit("reference_check", "Reference estimate against a measured full-data epoch", md,
         {"rows": rows, "measured_seconds": cell["train_seconds"], "steps": args.steps},
         Path("runs") if args.no_publish else None)


if __name__ == "__main__":
    main()
