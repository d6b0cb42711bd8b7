"""End-to-end cost of `p2d run`: wall-clock per stage, AER and speedup, on the embedded and the real pools.

Each configuration is one `p2d run` at its defaults (proxy 64 samples / 16 steps, ALPS top 10% of
heads, ifd-rank mining of 10% of the pool with facility-quality diversity, heads-scope training for 2
epochs, SmolLM2's ChatML template); the reference is p2d's
own full-data, full-parameter estimate for as many epochs (12 timed steps of its real plan). Configurations:
`default` is the README's main job on the embedded 3,600-row pool; `real-code` and `real-math` mine
the 1,200-row mixed pool of benchmarks/pools.py (real CodeAlpaca, GSM8K, Alpaca, Self-Instruct and
swapped-answer code rows) for held-out CodeAlpaca or GSM8K targets, with the proxy on the same
real dataset. `fast-code` is `real-code` with the cheapest mining p2d offers (discriminative heads
from layers 0-9, early stop, no quality signal). `real-code-fp32` is `real-code` mining in fp32 (the default
`--mining-dtype auto` mines in bf16 where the hardware has it); `real-code-w32` is `real-code` with
`--mining-window 32`. `real-code-e1` / `-e3` train real-code's subset for 1 or 3
epochs against a reference of as many epochs, reusing its earlier stages. Run directories are reused, so a
finished configuration costs nothing to report again; pass --fresh to time it anew.

    python benchmarks/cost.py --configs real-code real-code-e1 real-code-e3 --eval-limit 0
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _report import emit, table  # noqa: E402
from pools import default_data_root, domain_pool  # noqa: E402

from p2d.data import load_records  # noqa: E402
from p2d.io import write_jsonl  # noqa: E402
from p2d.pipelines.run import RunConfig, run_pipeline  # noqa: E402
from p2d.pipelines.train import DEFAULT_EPOCHS  # noqa: E402

PROXY_DATA = {"code": "code/code_alpaca_2k.json", "math": "math/gsm8k_train.jsonl"}
CONFIGS = {
    "default": dict(domain="code"),
    "real-code": dict(domain="code", real=True),
    "real-math": dict(domain="math", real=True),
    "fast-code": dict(domain="code", real=True, mining_heads="discriminative", mining_max_layer=9, quality="none"),
    # real-code with its pool pass in fp32: on a CPU with native bf16, what `--mining-dtype auto` saves
    "real-code-fp32": dict(domain="code", real=True, mining_dtype="float32"),
    # real-code reading each sample's prompt and only its first 32 response tokens when mining
    "real-code-w32": dict(domain="code", real=True, mining_window=32),
    # the same run trained for 1 or 3 epochs (the reference counts as many): proxy, localize and mine are
    # reused from real-code's directory with the cost they had there
    "real-code-e1": dict(domain="code", real=True, epochs=1, base="real-code"),
    "real-code-e3": dict(domain="code", real=True, epochs=3, base="real-code"),
}
STAGES = ("proxy", "localize", "mine", "train")


def run_config(name: str, out: Path, data_root: Path, fresh: bool, eval_limit: int) -> dict:
    opts = dict(CONFIGS[name])
    real = opts.pop("real", False)
    epochs, base = opts.pop("epochs", DEFAULT_EPOCHS), opts.pop("base", None)
    run_dir = out / name
    if fresh:
        shutil.rmtree(run_dir, ignore_errors=True)
    if base and not run_dir.exists():
        if not (out / base).is_dir():
            raise SystemExit(f"{name} reuses {base}'s stages: run --configs {base} first")
        shutil.copytree(out / base, run_dir)
    labels = {}
    if real:
        pool, target = domain_pool(opts["domain"], data_root)
        labels = {r["id"]: r["label"] for r in pool}
        data = out / "data" / opts["domain"]
        write_jsonl(data / "pool.jsonl", pool)
        write_jsonl(data / "target.jsonl", target)
        opts |= dict(pool=str(data / "pool.jsonl"), target=str(data / "target.jsonl"),
                     proxy_data=str(data_root / PROXY_DATA[opts["domain"]]))
    cfg = RunConfig.from_options(**opts, epochs=epochs, evaluate=eval_limit > 0, eval_limit=eval_limit)
    t0 = time.perf_counter()
    report = run_pipeline(cfg, run_dir, progress=False)
    wall = time.perf_counter() - t0
    selected = [r["id"] for r in load_records(report["subset"]["path"])] if labels else []
    return {"name": name, "options": {k: v for k, v in opts.items() if k != "domain"}, "domain": opts["domain"],
            "wall_seconds_this_call": wall, "report": report,
            "selected_labels": dict(Counter(labels[i] for i in selected)) if labels else None}


def markdown(results: list[dict]) -> str:
    rows, sel_rows, plan_rows = [], [], []
    for r in results:
        rep = r["report"]
        total = rep["total_seconds"]
        ref = rep["reference"]
        row = {"config": r["name"], "domain": r["domain"], "pool": f"{rep['subset']['pool']:,}",
               "epochs": ref.get("epochs", "")}
        row |= {s: f"{rep['stages'][s]['seconds']:.0f} ({rep['stages'][s]['seconds'] / total:.0%})" for s in STAGES}
        interval = f" ({ref['interval'][0]:.0f}–{ref['interval'][1]:.0f})" if "interval" in ref else ""
        row |= {"P2D total s": f"{total:.0f}", "reference s": f"{ref['seconds']:.0f}{interval}",
                "AER": f"{rep['aer']:.3f}", "speedup": f"{rep['speedup']:.1f}×",
                "speedup by FLOPs": f"{1 / rep['aer_flops']:.1f}×" if "aer_flops" in rep else ""}
        rows.append(row)
        if "planned_seconds" in rep["stages"]["mine"]:
            plan_rows.append({"config": r["name"], **{s: f"{rep['stages'][s]['planned_seconds'] / rep['stages'][s]['seconds']:.2f}"
                                                      for s in STAGES if rep["stages"][s]["seconds"] > 0},
                              "reference": f"{ref['planned_seconds'] / ref['seconds']:.2f}"})
        if r["selected_labels"]:
            n = sum(r["selected_labels"].values())
            sel_rows.append({"config": r["name"], "selected": n,
                             **{k: f"{v / n:.0%}" for k, v in sorted(r["selected_labels"].items())}})
    evals = []
    for r in results:
        ev = r["report"].get("eval")
        if ev:
            metric = next(k for k in ev["base"] if k.endswith(("pass@1", "_em")))
            evals.append({"config": r["name"], "metric": metric, "problems": ev["base"].get("task_samples", ""),
                          "base": f"{ev['base'][metric]:.3f}", "trained": f"{ev['trained'][metric]:.3f}",
                          "base NLL": f"{ev['base']['nll']:.4f}", "trained NLL": f"{ev['trained']['nll']:.4f}"})
    labels = sorted({k for r in sel_rows for k in r} - {"config", "selected"})
    lines = [
        "Stage seconds (share of P2D's total). The reference is full-data, full-parameter training for the same "
        "epochs, estimated by `p2d run` from 12 timed steps of its real plan (90% interval in brackets; its accuracy "
        "against measured epochs is in the reference check); AER = P2D total / reference. Speedup by FLOPs: the "
        "same ratio in matmul FLOPs of what ran (p2d.flops).",
        "",
        table(rows, ["config", "domain", "pool", "epochs", *STAGES, "P2D total s", "reference s", "AER", "speedup",
                     "speedup by FLOPs"]),
        "",
    ]
    if plan_rows:
        lines += ["`p2d plan`'s prediction ÷ the measured seconds, per stage (the plan `p2d run` printed first; "
                  "target: within 0.8–1.2):", "", table(plan_rows, ["config", *STAGES, "reference"]), ""]
    if sel_rows:
        lines += ["What the real-pool runs selected (label shares; `corrupt` = code rows with another row's answer):",
                  "", table(sel_rows, ["config", "selected", *labels]), ""]
    if evals:
        lines += ["`p2d run --eval` (base model vs the trained one; task metric on the first problems of the "
                  "domain's eval set, response NLL on the whole eval set):", "",
                  table(evals, ["config", "metric", "problems", "base", "trained", "base NLL", "trained NLL"]), ""]
    dominant = []
    for r in results:
        stages, total = r["report"]["stages"], r["report"]["total_seconds"]
        top = max(STAGES, key=lambda s: stages[s]["seconds"])
        dominant.append(f"{r['name']}: {top} ({stages[top]['seconds'] / total:.0%})")
    lines.append("**What dominates.** " + "; ".join(dominant) + ".")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=["real-code", "real-math"])
    ap.add_argument("--out", type=Path, default=Path("runs/cost"))
    ap.add_argument("--data-root", type=Path)
    ap.add_argument("--eval-limit", type=int, default=20, help="task problems for `p2d run --eval` (0: no eval)")
    ap.add_argument("--fresh", action="store_true", help="delete each configuration's run directory first")
    ap.add_argument("--no-publish", action="store_true")
    args = ap.parse_args()
    data_root = args.data_root or default_data_root()
    results = []
    for name in args.configs:
        print(f"p2d run: {name}")
        results.append(run_config(name, args.out, data_root, args.fresh, args.eval_limit))
    md = markdown(results)
    print(md)
    emit("cost", "Cost: `p2d run` stage by stage", md, {"runs": results}, args.out if args.no_publish else None)


if __name__ == "__main__":
    main()
