"""How close is `p2d plan` to what `p2d run` then measures, stage by stage?

Reads the finished runs of benchmarks/cost.py (their configuration, pool, proxy data and measured
stage seconds), plans each again with the current planner (calibrating this machine once, while
nothing else runs), and compares. Run it right after cost.py on the same machine.

    python benchmarks/plan_check.py --runs runs/cost/real-code runs/cost/real-code-e1 runs/cost/real-code-e3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _report import emit, table  # noqa: E402

from p2d.io import read_json  # noqa: E402
from p2d.pipelines.mine import target_source  # noqa: E402
from p2d.pipelines.plan import scan_pool  # noqa: E402
from p2d.pipelines.run import RunConfig  # noqa: E402
from p2d.plan import calibrate, make_plan  # noqa: E402

STAGES = ("proxy", "mine", "train", "reference")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, nargs="+", required=True)
    ap.add_argument("--recalibrate", action="store_true", help="measure this machine again")
    ap.add_argument("--no-publish", action="store_true")
    args = ap.parse_args()
    rates = calibrate(force=args.recalibrate)
    rows, mem_rows = [], []
    for run in args.runs:
        config = read_json(run / "run.json")["config"]
        aer = read_json(run / "aer.json")
        cfg = RunConfig.from_json(config)
        tr = cfg.train.train
        model_cfg, lengths, proxy_lengths, target = scan_pool(cfg.model, cfg.pool, cfg.fields, cfg.localize.proxy_data,
                                                              cfg.template, target_source(cfg.mine_config(None)))
        # the calibration's prediction, as before the first run (not the rates these runs just recorded)
        plan = make_plan(model_cfg, lengths, cfg.plan_config(), proxy_lengths, target, use_observed=False)
        measured = {s: aer["stages"][s]["seconds"] for s in STAGES if s != "reference"}
        measured["reference"] = aer["reference"]["seconds"]
        row = {"run": run.name, "epochs": tr.epochs}
        for s in STAGES:
            row[s] = f"{plan['stages'][s]['seconds']:.0f} / {measured[s]:.0f} = {plan['stages'][s]['seconds'] / measured[s]:.2f}"
        rows.append(row)
        mem = {"run": run.name}
        for s in STAGES[:-1]:  # the reference is estimated from a few steps, not run: no peak of its own
            got, want = aer["stages"][s]["peak_memory_bytes"], plan["stages"][s]["peak_memory_bytes"]
            mem[s] = f"{want / 2**20:,.0f} / {got / 2**20:,.0f} = {want / got:.2f}"
        mem_rows.append(mem)
        print(row, mem, flush=True)
    md = "\n".join([
        f"Predicted ÷ measured seconds per stage (`p2d plan` before the run, the cost benchmark's `p2d run` after; the "
        f"reference's measured value is its estimate, checked in the reference check). Rates: {rates['method']} "
        f"({rates['forward_flops_per_s'] / 1e9:.0f} GFLOP/s forward, {rates['train_flops_per_s'] / 1e9:.0f} GFLOP/s "
        f"training all weights, {rates['head_train_flops_per_s'] / 1e9:.0f} GFLOP/s training 10% of heads). "
        f"Target: within 0.8–1.2 at the defaults.",
        "",
        table(rows, ["run", "epochs", *STAGES]),
        "",
        "The plan assumes what it cannot know before the run: the subset's lengths are the target's, and a selected "
        "head sits in layer 0 (backward through every layer). Where the real subset is shorter or the lowest "
        "selected head higher, the train stage comes out lower than planned.",
        "",
        "Peak memory, predicted ÷ measured MiB (the plan's formula against each stage's peak RSS: the kernel's "
        "VmHWM, reset at the stage's start):",
        "",
        table(mem_rows, ["run", *STAGES[:-1]]),
    ])
    print(md)
    emit("plan_check", "`p2d plan` against measured stage seconds and peak memory", md,
         {"rows": rows, "memory": mem_rows, "rates": rates},
         Path("runs") if args.no_publish else None)


if __name__ == "__main__":
    main()
