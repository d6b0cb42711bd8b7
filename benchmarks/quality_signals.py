"""Which quality signal keeps corrupted rows out of p2d's subset: per-row signals on the selection pool.

On the pool of benchmarks/selection.py (code target, SmolLM2-135M, 128-token mining window) this
computes, once per row: ALPS-head affinity to the target prototypes, the base model's response
loss, the proxy task model's, and both models' response-only loss (for IFD). Each rule then ranks
the pool and keeps 10% + (120 rows); the table gives the share of clean in-domain rows, the
corrupted rows kept and the mean response length. Shortlisted rules rank by the signal only inside
the top 3 x 120 rows by affinity, as `p2d mine` does (p2d.mining.SHORTLIST).

    python benchmarks/quality_signals.py --heads runs/sel-code/heads.json       # ~10 min on 2 cores
    python benchmarks/quality_signals.py --heads ... --cache signals.npz         # reuse computed signals
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.stats import rankdata

sys.path.insert(0, str(Path(__file__).parent))
from _report import emit, table  # noqa: E402
from selection import IN_DOMAIN, POOL, build  # noqa: E402
from pools import default_data_root  # noqa: E402

from p2d.data import to_examples  # noqa: E402
from p2d.features import extract_features, nll_pass, response_only, start_token  # noqa: E402
from p2d.io import read_json  # noqa: E402
from p2d.mining import SHORTLIST, affinity, prototypes  # noqa: E402
from p2d.models import load_model  # noqa: E402
from p2d.selection import read_heads_json  # noqa: E402
from p2d.tokens import IGNORE, tokenize  # noqa: E402

KEEP = 120
MAX_LENGTH = 128


def signals(domain: str, heads_path: Path) -> dict[str, np.ndarray]:
    pool_rows, targets, _ = build(default_data_root(), POOL, 64)
    pool, target = to_examples(pool_rows, "pool"), to_examples(targets[domain], "target")
    model, tok = load_model("smollm2-135m")
    task = load_model(read_json(heads_path)["task_model"])[0]
    pt, tt = tokenize(pool, tok, MAX_LENGTH), tokenize(target, tok, MAX_LENGTH)
    heads = read_heads_json(heads_path).heads
    res = extract_features(model, pt, heads=heads, quality="nll", progress=False)
    aff = affinity(res.features, prototypes(extract_features(model, tt, heads=heads, progress=False).features))
    alone = [response_only(t, start_token(tok)) for t in pt]
    with torch.inference_mode():
        out = {"task": nll_pass(task, pt, 16, 8192)[0].numpy(), "alone_b": nll_pass(model, alone, 16, 8192)[0].numpy(),
               "alone_t": nll_pass(task, alone, 16, 8192)[0].numpy()}
    return {"aff": aff, "base": res.quality, **out, "labels": np.array([r["label"] for r in pool_rows]),
            "ntok": np.array([sum(x != IGNORE for x in t.labels) for t in pt])}


def pct(x: np.ndarray) -> np.ndarray:
    return (rankdata(x) - 1) / (len(x) - 1)


def rules(z: dict) -> dict[str, np.ndarray]:
    """Ranking scores, higher first: affinity alone, whole-pool folds, and shortlisted folds (as p2d.mining)."""
    aff, base, task = z["aff"], z["base"], z["task"]
    listed = np.argsort(-aff, kind="stable")[: SHORTLIST * KEEP]

    def within(sig: np.ndarray, w: float, sign: float) -> np.ndarray:
        s = pct(aff) - 2.0
        s[listed] = pct(aff[listed]) + sign * w * pct(sig[listed])
        return s

    out = {"affinity alone (p2d-paper)": pct(aff), "nll, whole pool, w 0.5 (the old default)": pct(aff) - 0.5 * pct(base)}
    for w in (1.0, 2.0):
        out[f"reducible (base - task loss), shortlist, w {w:g}"] = within(base - task, w, 1.0)
        out[f"relative reduction, shortlist, w {w:g}"] = within((base - task) / base, w, 1.0)
        out[f"task-model loss, shortlist, w {w:g}"] = within(task, w, -1.0)
        out[f"task-model IFD, shortlist, w {w:g}"] = within(task / z["alone_t"], w, -1.0)
        out[f"base IFD, shortlist, w {w:g} (ifd-rank)"] = within(base / z["alone_b"], w, -1.0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--heads", type=Path, required=True, help="heads.json of `p2d localize --domain code`")
    ap.add_argument("--domain", default="code", choices=sorted(IN_DOMAIN))
    ap.add_argument("--cache", type=Path, help="an .npz of computed signals: read if it exists, else written")
    ap.add_argument("--no-publish", action="store_true")
    args = ap.parse_args()
    if args.cache and args.cache.is_file():
        z = dict(np.load(args.cache, allow_pickle=True))
    else:
        z = signals(args.domain, args.heads)
        if args.cache:
            np.savez(args.cache, **z)
    lab = z["labels"]
    per_label = [{"rows": str(k), "n": int((lab == k).sum()), "affinity": f"{z['aff'][lab == k].mean():.3f}",
                  "base loss": f"{z['base'][lab == k].mean():.2f}", "task loss": f"{z['task'][lab == k].mean():.2f}",
                  "base IFD": f"{np.mean(z['base'][lab == k] / z['alone_b'][lab == k]):.2f}",
                  "response tokens": f"{z['ntok'][lab == k].mean():.0f}"} for k in np.unique(lab)]
    rows = []
    for name, score in rules(z).items():
        top = np.argsort(-score, kind="stable")[:KEEP]
        clean = sum(int((lab[top] == k).sum()) for k in IN_DOMAIN[args.domain])
        rows.append({"rule": name, "clean in-domain": f"{clean / KEEP:.0%}", "corrupt kept": int((lab[top] == "corrupt").sum()),
                     "response tokens": f"{z['ntok'][top].mean():.0f}"})
    md = "\n".join([
        f"SmolLM2-135M, pool of benchmarks/selection.py ({len(lab)} rows, 100 corrupted), {args.domain} target, "
        f"ALPS heads and proxy task model of `{args.heads}`, {MAX_LENGTH}-token window; each rule keeps {KEEP} rows.", "",
        table(per_label, ["rows", "n", "affinity", "base loss", "task loss", "base IFD", "response tokens"]), "",
        table(rows, ["rule", "clean in-domain", "corrupt kept", "response tokens"]), "",
        "- Swapped answers have the highest losses under both models, so the absolute loss drop (reducible "
        "loss) is largest on them and pulls them in; relative measures do not.",
        "- IFD ranked inside the affinity shortlist keeps 2 corrupted rows of 120 and is p2d's default quality "
        "signal (`ifd-rank`); the base model's IFD is as good as the task model's and needs no second model.",
    ])
    emit("quality_signals", f"Quality signals against corrupted rows ({args.domain} target)", md,
         {"rows": rows, "per_label": per_label}, Path("/tmp") if args.no_publish else None)


if __name__ == "__main__":
    main()
