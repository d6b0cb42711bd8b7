"""Do ALPS heads transfer? The heads found on one dataset against those found on another.

ALPS ranks heads by how far a proxy fine-tune moves them. If the ranking reflects the domain, heads
found on one code dataset should match those found on another code dataset about as well as two
proxy runs on the same data do, and clearly better than heads found on math or general data. Each
proxy here is p2d's own (64 samples, 16 steps, q/k/v), on a slice of real data or of p2d's embedded
seed sets; every pair of head rankings is compared by the overlap of their top ⌈r·n⌉ heads and the
Spearman correlation of all scores. Whether the transferred heads also *train* as well is measured
by the quality grid's `transfer-heads` adaptation (benchmarks/quality_grid.py --transfer-heads).

    python benchmarks/heads_transfer.py            # 8 proxy runs, ~45 s each on 2 CPU cores
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).parent))
from _report import emit, table  # noqa: E402
from pools import default_data_root  # noqa: E402

from p2d.data import load_records, to_examples  # noqa: E402
from p2d.io import read_json, write_json  # noqa: E402
from p2d.pipelines.localize import LocalizeConfig, score_and_select  # noqa: E402
from p2d.proxy import ProxyConfig, run_proxy  # noqa: E402
from p2d.selection import select_heads  # noqa: E402

MODEL = "smollm2-135m"
# name -> (domain, data source (relative to the data root unless p2d:), first row, proxy seed)
PROXIES = {
    "code-alpaca-a": ("code", "code/code_alpaca_2k.json", 0, 0),
    "code-alpaca-a-seed1": ("code", "code/code_alpaca_2k.json", 0, 1),
    "code-alpaca-b": ("code", "code/code_alpaca_2k.json", 64, 0),
    "code-stdlib": ("code", "p2d:seed/code", 0, 0),
    "math-gsm8k-a": ("math", "math/gsm8k_train.jsonl", 0, 0),
    "math-gsm8k-b": ("math", "math/gsm8k_train.jsonl", 64, 0),
    "math-generated": ("math", "p2d:seed/math", 0, 0),
    "general-alpaca": ("general", "general/llamafactory_alpaca_en_demo.json", 0, 0),
}


def localize_one(name: str, out: Path, data_root: Path, proxy: ProxyConfig, head_frac: float) -> dict:
    """Proxy fine-tune + ALPS scoring into out/name (skipped when its localize.json exists)."""
    domain, source, start, seed = PROXIES[name]
    run_dir = out / name
    info_path = run_dir / "localize.json"  # the name benchmarks/quality_grid.py reads ALPS seconds from
    if info_path.is_file():
        return read_json(info_path)
    path = source if source.startswith("p2d:") else str(data_root / source)
    examples = to_examples(load_records(path), path, domain=domain)[start: start + proxy.samples]
    t0 = time.perf_counter()
    task = run_proxy(MODEL, examples, run_dir / "proxy", replace(proxy, seed=seed), progress=False)
    proxy_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    score_and_select(LocalizeConfig(model=MODEL, task_model=str(task), head_frac=head_frac), task, run_dir)
    info = {"name": name, "domain": domain, "source": source, "rows": f"{start}..{start + len(examples) - 1}",
            "proxy_seed": seed, "proxy_seconds": proxy_s, "localize_seconds": time.perf_counter() - t0}
    write_json(info_path, info)
    return info


def relation(a: str, b: str) -> str:
    (da, sa, ra, _), (db, sb, rb, _) = PROXIES[a], PROXIES[b]
    if (sa, ra) == (sb, rb):
        return "same rows, other proxy seed"
    if da != db:
        return "other domain"
    return "same dataset, other rows" if sa == sb else "same domain, other dataset"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/heads-transfer"))
    ap.add_argument("--data-root", type=Path)
    ap.add_argument("--head-frac", type=float, default=0.1)
    ap.add_argument("--proxy-samples", type=int, default=ProxyConfig.samples)
    ap.add_argument("--proxy-steps", type=int, default=ProxyConfig.steps)
    ap.add_argument("--no-publish", action="store_true")
    args = ap.parse_args()
    data_root = args.data_root or default_data_root()
    proxy = ProxyConfig(samples=args.proxy_samples, steps=args.proxy_steps)

    runs = {}
    for name in PROXIES:
        print(f"localize {name}")
        runs[name] = localize_one(name, args.out, data_root, proxy, args.head_frac)
    scores = {n: np.load(args.out / n / "head_scores.npy") for n in PROXIES}
    k = math.ceil(args.head_frac * next(iter(scores.values())).size)
    n = next(iter(scores.values())).size
    top = {name: set(select_heads(s, args.head_frac)) for name, s in scores.items()}
    pairs = []
    for a, b in itertools.combinations(PROXIES, 2):
        pairs.append({"a": a, "b": b, "relation": relation(a, b), "overlap": len(top[a] & top[b]),
                      "spearman": float(spearmanr(scores[a].ravel(), scores[b].ravel()).statistic)})
    order = ["same rows, other proxy seed", "same dataset, other rows", "same domain, other dataset", "other domain"]
    summary = []
    for rel in order:
        ps = [p for p in pairs if p["relation"] == rel]
        summary.append({"relation": rel, "pairs": len(ps),
                        f"top-{k} overlap (mean)": float(np.mean([p["overlap"] for p in ps])),
                        "range": f"{min(p['overlap'] for p in ps)}–{max(p['overlap'] for p in ps)}",
                        "spearman (mean)": float(np.mean([p["spearman"] for p in ps]))})
    chance = k * k / n
    by = {s["relation"]: s for s in summary}
    ov = f"top-{k} overlap (mean)"
    lines = [
        f"`smollm2-135m`, one proxy per row (p2d's default: {proxy.samples} samples, {proxy.steps} steps, "
        f"q/k/v, lr {proxy.lr:g}), ALPS W1 in float64, top {k} of {n} heads. A random pair of {k}-head sets "
        f"shares {chance:.1f} heads on average.",
        "",
        table([{"proxy": r["name"], "domain": r["domain"], "data": f"`{r['source']}` rows {r['rows']}",
                "proxy seed": r["proxy_seed"]} for r in runs.values()], ["proxy", "domain", "data", "proxy seed"]),
        "",
        table(summary, ["relation", "pairs", ov, "range", "spearman (mean)"]),
        "",
        "Every pair:",
        "",
        table([{**p, "overlap": f"{p['overlap']}/{k}", "spearman": f"{p['spearman']:.3f}"} for p in pairs],
              ["a", "b", "relation", "overlap", "spearman"]),
        "",
        f"**What this shows.** Two proxies on the same rows with another data order share "
        f"{by[order[0]][ov]:.1f} of {k} heads; other rows of the same dataset {by[order[1]][ov]:.1f}; another "
        f"dataset of the same domain {by[order[2]][ov]:.1f}; another domain {by[order[3]][ov]:.1f} (chance "
        f"{chance:.1f}). "
        + ("Heads found on another domain overlap as much as heads found on the same domain: the top heads "
           "reflect which heads a short q/k/v fine-tune moves most in this model, whatever the data, more than "
           "the domain. Heads therefore transfer between datasets of a domain, but for the same reason they "
           "would transfer between domains."
           if by[order[3]][ov] >= by[order[2]][ov] - 1 else
           "Heads found on the same domain overlap more than heads found on another domain: the ranking carries "
           "a domain signal."),
    ]
    md = "\n".join(lines)
    print(md)
    result = {"proxies": runs, "pairs": pairs, "summary": summary, "k": k, "n_heads": n, "chance_overlap": chance,
              "top": {name: sorted(map(list, t)) for name, t in top.items()}}
    emit("heads_transfer", "Heads transfer: ALPS heads found on one dataset against another", md, result,
         args.out if args.no_publish else None)


if __name__ == "__main__":
    main()
