"""Mining benchmark: every selector and head set on a labelled mixed pool, for a code target, with SmolLM2.

The pool's labels (benchmarks/pools.py) say what a selector should pick (clean code) and what a
quality signal should reject (code instructions with swapped answers), so precision and the
share of corrupted rows can be measured instead of guessed.

Forward passes dominate the cost on a CPU, so the model runs only three times over the data:
all 270 heads with the response NLL (any head set's features are a column slice of that matrix,
since each head's block is L2-normalised on its own), the response-only loss for IFD, and the
hidden states of the middle and last layer for the embedding baselines. Every selector is then
scored with p2d.mining's own prototypes / affinity / combine / select, so the numbers describe the
library's method. The cost of a standalone `p2d mine` of each configuration is estimated from the
measured pass rates (see `standalone_s`).

    python benchmarks/mining.py --heads runs/localize-code/heads.json
    python benchmarks/mining.py --quick   # smoke test: tiny pool, max_length 64, nothing in docs/
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _report import emit, table  # noqa: E402
from pools import build_mixed_pool  # noqa: E402

from p2d import P2DError  # noqa: E402
from p2d.data import to_examples  # noqa: E402
from p2d.features import extract_features, nll_pass, response_only  # noqa: E402
from p2d.geometry import AttentionGeometry  # noqa: E402
from p2d.io import save_npy  # noqa: E402
from p2d.mining import (_pool_sample, affinity, combine, head_separations, head_set_separation, mine,  # noqa: E402
                        prototypes, random_heads, select, separation)
from p2d.models import load_model  # noqa: E402
from p2d.selection import global_order, read_heads_json, select_heads, write_heads_json  # noqa: E402
from p2d.tokens import Tokenized, tokenize  # noqa: E402

MODEL = "smollm2-135m"
QUALITIES = ("none", "nll", "ifd")
WEIGHTS = (0.25, 0.5, 1.0)
SEEDS = (0, 1, 2)
QUICK_POOL = dict(n_code=12, n_math=8, n_general=6, n_corrupt=4, n_target=8)

Heads = list[tuple[int, int]]


@dataclass
class Pass:
    """One shared forward pass: what it covered and what it cost."""

    name: str
    rows: int
    tokens: int
    seconds: float

    @property
    def s_per_token(self) -> float:
        return self.seconds / self.tokens

    def as_dict(self) -> dict:
        return {"pass": self.name, "rows": self.rows, "tokens": self.tokens, "seconds": round(self.seconds, 2),
                "tokens/s": round(self.tokens / self.seconds, 1)}


@dataclass
class Features:
    """Everything the selectors need, from the three shared passes."""

    pool_heads: np.ndarray  # [N, L*H*head_dim], (layer, head) order
    target_heads: np.ndarray
    pool_hidden: np.ndarray  # [N, 2*hidden]: middle layer, then last layer
    target_hidden: np.ndarray
    nll: np.ndarray  # [N] pool response NLL
    ifd: np.ndarray  # [N] pool IFD
    passes: dict[str, Pass]


def all_heads(geom: AttentionGeometry) -> Heads:
    return [(l, h) for l in range(geom.num_layers) for h in range(geom.num_heads)]


def head_columns(heads: Heads, geom: AttentionGeometry) -> np.ndarray:
    """Columns of the all-heads matrix that hold `heads` (sorted, as extract_features orders them)."""
    d = geom.head_dim
    return np.concatenate([np.arange((l * geom.num_heads + h) * d, (l * geom.num_heads + h + 1) * d)
                           for l, h in sorted(heads)])


def mid_last(geom: AttentionGeometry) -> tuple[int, int]:
    """The embedding baselines' layers, as p2d.mining.mine picks them."""
    return geom.num_layers // 2, geom.num_layers - 1


def extract(model, tok, pool: list[Tokenized], target: list[Tokenized], batch_size: int) -> Features:
    """The three shared passes (the only forward passes of the benchmark)."""
    geom = AttentionGeometry.from_config(model.config)
    n = len(pool)
    kw = dict(batch_size=batch_size, progress=sys.stderr.isatty())
    # One warm-up batch, so one-time start-up costs do not land in the first pass's rate.
    extract_features(model, target[:batch_size], kind="heads", heads=all_heads(geom), quality="nll",
                     batch_size=batch_size, progress=False)
    heads = extract_features(model, pool + target, kind="heads", heads=all_heads(geom), quality="nll", **kw)
    # IFD's denominator alone: the conditioned loss is the NLL above, so only the response-only pass is new.
    start_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    t0 = time.perf_counter()
    with torch.inference_mode():
        alone, alone_tokens = nll_pass(model, [response_only(t, start_id) for t in pool], batch_size, 8192)
    alone_s = time.perf_counter() - t0
    hidden = extract_features(model, pool + target, kind="hidden", layers=mid_last(geom), **kw)
    nll = heads.quality[:n]
    passes = {"heads": Pass("all heads + response NLL (pool + target)", n + len(target), heads.tokens, heads.seconds),
              "alone": Pass("response-only loss for IFD (pool)", n, alone_tokens, alone_s),
              "hidden": Pass(f"hidden states of layers {mid_last(geom)} (pool + target)", n + len(target),
                             hidden.tokens, hidden.seconds)}
    return Features(heads.features[:n], heads.features[n:], hidden.features[:n], hidden.features[n:],
                    nll, nll / alone.numpy(), passes)


def verify(model, tok, pool: list[Tokenized], feats: Features, heads: Heads, batch_size: int) -> dict:
    """Check the slicing shortcuts against direct extractions (quick mode): a head subset with IFD,
    and the middle layer's hidden state. Raises if they disagree."""
    geom = AttentionGeometry.from_config(model.config)
    direct = extract_features(model, pool, kind="heads", heads=heads, quality="ifd", tokenizer=tok,
                              batch_size=batch_size, progress=False)
    mid = extract_features(model, pool, kind="hidden", layers=[mid_last(geom)[0]], batch_size=batch_size,
                           progress=False)
    diffs = {"head_subset_features": float(np.abs(direct.features - feats.pool_heads[:, head_columns(heads, geom)]).max()),
             "ifd_relative": float(np.nanmax(np.abs(direct.quality / feats.ifd - 1))),
             "hidden_mid_features": float(np.abs(mid.features - feats.pool_hidden[:, :geom.hidden_size]).max())}
    bad = {k: v for k, v in diffs.items() if not v < 1e-4}
    if bad:
        raise AssertionError(f"slices differ from direct extraction: {bad}")
    return diffs


def metrics(labels: np.ndarray, rank: np.ndarray, selected: np.ndarray) -> dict:
    """Code precision in the top 10% and in the top K (K = clean code rows), corrupted share and recall."""
    code, corrupt = labels == "code", labels == "corrupt"
    return {"p_at_10": float(code[selected].mean()), "p_at_share": float(code[rank <= code.sum()].mean()),
            "corrupt_share": float(corrupt[selected].mean()),
            "corrupt_recall": float(corrupt[selected].sum() / max(corrupt.sum(), 1))}


def score(ids: list[str], labels: np.ndarray, pool: np.ndarray, target: np.ndarray, quality: np.ndarray | None,
          weight: float, data_frac: float, seed: int, kind: str = "nll") -> dict:
    """p2d's scoring on precomputed features: prototypes -> affinity -> combine -> select."""
    t0 = time.perf_counter()
    aff = affinity(pool, prototypes(target, seed))
    rank, selected = select(ids, combine(aff, quality, weight, kind), data_frac)
    return {**metrics(labels, rank, selected), "scoring_s": time.perf_counter() - t0}


def mean_of(runs: list[dict]) -> dict:
    """Mean of each metric over seeds; the runs themselves are kept for the JSON."""
    out = {k: float(np.mean([r[k] for r in runs])) for k in runs[0] if isinstance(runs[0][k], float)}
    if len(runs) > 1:
        out["p_at_10_sd"] = float(np.std([r["p_at_10"] for r in runs]))
        out["runs"] = runs
    return out


class Costs:
    """Estimated cost of a standalone `p2d mine`, from the shared passes' per-token rates.

    A quality-free pass stops after the deepest needed layer, so it costs the full-depth
    hidden-state rate scaled by depth; nll needs the full pass with the LM head on response
    positions (the all-heads pass's rate); ifd adds the response-only pass. A p2d run also does
    `_choose_heads`' all-heads pass over the target and a pool sample, and extracts the target.
    """

    def __init__(self, feats: Features, pool: list[Tokenized], target: list[Tokenized], sample: np.ndarray,
                 geom: AttentionGeometry):
        self.p, self.geom = feats.passes, geom
        self.pool_tokens = sum(map(len, pool))
        self.target_tokens = sum(map(len, target))
        self.sample_tokens = sum(len(pool[i]) for i in sample)

    def _depth(self, layer: int) -> float:
        return self.p["hidden"].s_per_token * (layer + 1) / self.geom.num_layers

    def p2d(self, heads: Heads, quality: str) -> float:
        deepest = max(l for l, _ in heads)
        cost = self._depth(self.geom.num_layers - 1) * (self.target_tokens + self.sample_tokens)
        cost += self._depth(deepest) * self.target_tokens
        if quality == "none":
            return cost + self._depth(deepest) * self.pool_tokens
        cost += self.p["heads"].s_per_token * self.pool_tokens
        return cost + (self.p["alone"].seconds if quality == "ifd" else 0.0)

    def embedding(self, layer: int) -> float:
        return self._depth(layer) * (self.pool_tokens + self.target_tokens)


def head_sets(geom: AttentionGeometry, alps: Heads, alps_scores: np.ndarray, feats: Features,
              sample: np.ndarray) -> dict[str, list[Heads]]:
    """alps, random (3 seeds), discriminative (as p2d.mining._choose_heads picks them; also limited to
    the first third of the layers, which lets extraction stop early) and the lowest-ALPS heads, all of
    the ALPS count."""
    count = len(alps)
    per_head = np.nan_to_num(head_separations(feats.target_heads, feats.pool_heads[sample], geom), nan=0.5)
    best = np.argsort(-per_head.ravel(), kind="stable")[:count]
    shallow_layers = geom.num_layers // 3  # early stop after layer shallow_layers - 1: a third of the forward
    shallow = np.argsort(-per_head[:shallow_layers].ravel(), kind="stable")[:count]
    lowest = global_order(-alps_scores)[:count]
    as_heads = lambda flat: sorted((int(i) // geom.num_heads, int(i) % geom.num_heads) for i in flat)  # noqa: E731
    return {"alps": [sorted(alps)], "random": [random_heads(geom, count, s) for s in SEEDS],
            "discriminative": [as_heads(best)], f"discriminative, layers < {shallow_layers}": [as_heads(shallow)],
            "lowest-alps": [as_heads(lowest)]}


def evaluate(model, pool_t: list[Tokenized], target_t: list[Tokenized], labels: np.ndarray, feats: Features,
             sets: dict[str, list[Heads]], sample: np.ndarray, args) -> tuple[list[dict], list[dict]]:
    """(main rows, quality-weight sensitivity rows for the best head set)."""
    geom = AttentionGeometry.from_config(model.config)
    ids = [t.id for t in pool_t]
    costs = Costs(feats, pool_t, target_t, sample, geom)
    qualities = {"none": None, "nll": feats.nll, "ifd": feats.ifd}
    rows = []
    for name, variants in sets.items():
        cols = [head_columns(h, geom) for h in variants]
        seps = [head_set_separation(h, feats.target_heads, feats.pool_heads[sample], geom) for h in variants]
        for q in QUALITIES:
            runs = [score(ids, labels, feats.pool_heads[:, c], feats.target_heads[:, c], qualities[q], 0.5,
                          args.data_frac, args.seed, q) for c in cols]
            for r, h in zip(runs, variants):
                r["standalone_s"] = costs.p2d(h, q) + r["scoring_s"]
            label = f"{name} ({len(variants)} seeds, mean)" if len(variants) > 1 else name
            rows.append({"selector": "p2d", "head set": label, "quality": q, "dim": int(len(cols[0])),
                         "separation": float(np.mean(seps)), **mean_of(runs)})

    d = geom.hidden_size
    for j, (name, layer) in enumerate(zip(("embedding-mid", "embedding-last"), mid_last(geom))):
        block = slice(j * d, (j + 1) * d)
        r = score(ids, labels, feats.pool_hidden[:, block], feats.target_hidden[:, block], None, 0.5,
                  args.data_frac, args.seed)
        r["standalone_s"] = costs.embedding(layer) + r["scoring_s"]
        sep = separation(feats.target_hidden[:, block], feats.pool_hidden[sample, block])
        rows.append({"selector": name, "head set": f"layer {layer}", "quality": "none", "dim": d,
                     "separation": sep, **r})

    runs = []
    for s in SEEDS:
        t0 = time.perf_counter()
        res = mine(model, pool_t, target_t, data_frac=args.data_frac, selector="random", seed=s, progress=False)
        seconds = time.perf_counter() - t0
        runs.append({**metrics(labels, res.rank, res.selected), "scoring_s": seconds, "standalone_s": seconds})
    rows.append({"selector": "random", "head set": f"- ({len(SEEDS)} seeds, mean)", "quality": "none", "dim": 0,
                 "separation": None, **mean_of(runs)})

    best = max(sets, key=lambda name: _set_quality(rows, name))
    cols = [head_columns(h, geom) for h in sets[best]]
    sensitivity = []
    for q in ("nll",):  # ifd is a filter (IFD >= 1 dropped) and has no weight
        for w in WEIGHTS:
            runs = [score(ids, labels, feats.pool_heads[:, c], feats.target_heads[:, c], qualities[q], w,
                          args.data_frac, args.seed) for c in cols]
            sensitivity.append({"head set": best, "quality": q, "quality_weight": w, **mean_of(runs)})
    return rows, sensitivity


def _set_quality(rows: list[dict], name: str) -> tuple[float, float]:
    """A head set's mean (precision at 10%, precision at the code share) over its quality settings."""
    mine_rows = [r for r in rows if r["head set"].split(" (")[0] == name]
    return (float(np.mean([r["p_at_10"] for r in mine_rows])), float(np.mean([r["p_at_share"] for r in mine_rows])))


def describe(row: dict) -> str:
    if row["selector"] != "p2d":
        return f"{row['selector']} ({row['head set']})" if row["selector"] != "random" else "random selection"
    return f"p2d, {row['head set']} heads, quality {row['quality']}"


def findings(rows: list[dict], sensitivity: list[dict]) -> str:
    """The 'what this shows' paragraph, computed from the numbers."""
    best_p = max(rows, key=lambda r: (r["p_at_10"], r["p_at_share"], -r["corrupt_share"]))
    best_k = max(rows, key=lambda r: (r["p_at_share"], r["p_at_10"], -r["corrupt_share"]))
    ranked = [r for r in rows if r["selector"] != "random"]
    least = min(ranked, key=lambda r: (r["corrupt_share"], -r["p_at_10"]))
    by = {(r["head set"].split(" (")[0], r["quality"]): r for r in rows if r["selector"] == "p2d"}
    alps = [by[("alps", q)] for q in QUALITIES]
    rec = max(alps, key=lambda r: (r["p_at_10"] - r["corrupt_share"], r["p_at_share"], -r["standalone_s"]))
    none = by[("alps", "none")]
    sets = ", ".join(f"{s} {by[(s, 'none')]['p_at_10']:.2f}" for s in ("alps", "random", "discriminative", "lowest-alps"))
    rnd = next(r for r in rows if r["selector"] == "random")
    best_w = max(sensitivity, key=lambda r: (r["p_at_10"] - r["corrupt_share"], r["p_at_share"]))
    return (
        f"Best code precision at 10%: {describe(best_p)} ({best_p['p_at_10']:.2f}; random selection "
        f"{rnd['p_at_10']:.2f}). Best precision at the code share: {describe(best_k)} ({best_k['p_at_share']:.2f}). "
        f"Fewest corrupted rows in the top 10%: {describe(least)} ({least['corrupt_share']:.3f} of the selection, "
        f"{least['corrupt_recall']:.2f} of all corrupted rows), against {none['corrupt_share']:.3f} for ALPS heads "
        f"without a quality signal. Head sets at quality none, precision at 10%: {sets}. "
        f"Recommended default for ALPS heads (highest precision minus corrupted share): quality {rec['quality']} "
        f"(precision {rec['p_at_10']:.2f}, corrupted {rec['corrupt_share']:.3f}, standalone cost est. "
        f"{rec['standalone_s']:.0f} s vs {none['standalone_s']:.0f} s for quality none); the best quality weight "
        f"for {best_w['head set']} heads is {best_w['quality_weight']} with {best_w['quality']}.")


def markdown(meta: dict, passes: dict[str, Pass], rows: list[dict], sensitivity: list[dict], text: str) -> str:
    shown = [{**r, "P@10%": r["p_at_10"], "P@code share": r["p_at_share"], "corrupt share": r["corrupt_share"],
              "corrupt recall": r["corrupt_recall"], "scoring s": r["scoring_s"], "standalone est. s": r["standalone_s"],
              "sep. AUROC": "-" if r["separation"] is None else r["separation"]} for r in rows]
    sens = [{**r, "P@10%": r["p_at_10"], "P@code share": r["p_at_share"], "corrupt share": r["corrupt_share"],
             "corrupt recall": r["corrupt_recall"]} for r in sensitivity]
    return "\n\n".join([
        f"Pool: {meta['pool']} ({meta['n_pool']} rows); target: {meta['n_target']} further CodeAlpaca rows. "
        f"Model {meta['model']}, max_length {meta['max_length']}, data_frac {meta['data_frac']}, "
        f"{meta['n_heads']} heads per head set (ALPS heads from `{meta['heads']}`), quality weight 0.5 unless stated. "
        "P@10% = share of clean code rows in the selected top 10%; P@code share = the same in the top K, K = number "
        "of clean code rows; corrupted rows (a code instruction with another row's answer) do not count as code. "
        "sep. AUROC: cross-validated target-vs-pool separation of the features (as `p2d mine` reports it).",
        "Shared forward passes (every selector below reuses them):\n\n"
        + table([p.as_dict() for p in passes.values()], ["pass", "rows", "tokens", "seconds", "tokens/s"]),
        table(shown, ["selector", "head set", "quality", "dim", "sep. AUROC", "P@10%", "P@code share",
                      "corrupt share", "corrupt recall", "scoring s", "standalone est. s"]),
        "\"scoring s\": prototypes + affinity + combine + select on the precomputed features. \"standalone est. s\": "
        "what `p2d mine` of that configuration would spend, from the passes' measured per-token rates (a "
        "quality-free pass stops after the deepest head's layer; nll/ifd need the full pass; p2d also runs its "
        "all-heads pass over the target and a 256-row pool sample for the head-set report).",
        "Quality-weight sensitivity (best head set):\n\n"
        + table(sens, ["head set", "quality", "quality_weight", "P@10%", "P@code share", "corrupt share",
                       "corrupt recall"]),
        f"**What this shows.** {text}",
    ])


def quick_heads(geom: AttentionGeometry, out_dir: Path) -> Path:
    """A heads.json from seeded random scores (with its head_scores.npy), for the smoke test."""
    scores = np.random.default_rng(0).random((geom.num_layers, geom.num_heads))
    path = out_dir / "heads.json"
    write_heads_json(path, scores, select_heads(scores, 0.1), geom, model=MODEL, task_model="random scores",
                     metric="random", tau=0.0, head_frac=0.1, method="top")
    save_npy(out_dir / "head_scores.npy", scores)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--heads", help="heads.json from `p2d localize --domain code` (head_scores.npy beside it)")
    ap.add_argument("--data-root", help="shared/data directory (default: found by benchmarks/pools.py)")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--data-frac", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny pool, max_length 64, random heads.json; no docs/")
    ap.add_argument("--no-publish", action="store_true", help="write to --out-dir only, not docs/")
    ap.add_argument("--out-dir", type=Path, help="where results go without publishing (default: a temp dir)")
    args = ap.parse_args()
    if args.quick:
        args.max_length = 64
    if not (args.heads or args.quick):
        ap.error("--heads is required (or --quick)")
    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="p2d-bench-mining-"))

    model, tok = load_model(MODEL)
    geom = AttentionGeometry.from_config(model.config)
    heads_path = Path(args.heads) if args.heads else quick_heads(geom, out_dir)
    alps = read_heads_json(heads_path, geom).heads
    scores_path = heads_path.with_name("head_scores.npy")
    if not scores_path.is_file():
        raise P2DError(f"{scores_path} not found: the lowest-ALPS head set needs every head's score")
    alps_scores = np.load(scores_path)

    pool_rows, target_rows = build_mixed_pool(args.data_root, seed=args.seed, **(QUICK_POOL if args.quick else {}))
    pool_t = tokenize(to_examples(pool_rows, "mixed-pool"), tok, args.max_length)
    target_t = tokenize(to_examples(target_rows, "code-target"), tok, args.max_length)
    if [t.id for t in pool_t] != [r["id"] for r in pool_rows]:
        raise AssertionError("tokenized pool does not line up with the pool rows")
    labels = np.array([r["label"] for r in pool_rows])

    feats = extract(model, tok, pool_t, target_t, args.batch_size)
    sample = _pool_sample(len(pool_t), args.seed)
    sets = head_sets(geom, alps, alps_scores, feats, sample)
    rows, sensitivity = evaluate(model, pool_t, target_t, labels, feats, sets, sample, args)
    text = findings(rows, sensitivity)
    counts = {k: int((labels == k).sum()) for k in ("code", "math", "general", "corrupt")}
    meta = {"model": MODEL, "pool": ", ".join(f"{v} {k}" for k, v in counts.items()), "n_pool": len(pool_t),
            "n_target": len(target_t), "max_length": args.max_length, "data_frac": args.data_frac,
            "n_heads": len(alps), "heads": str(heads_path), "seed": args.seed, "batch_size": args.batch_size,
            "threads": torch.get_num_threads()}
    results = {**meta, "passes": {k: p.as_dict() for k, p in feats.passes.items()},
               "head_sets": {k: [[list(h) for h in hs] for hs in v] for k, v in sets.items()},
               "rows": rows, "quality_weight_sensitivity": sensitivity, "findings": text}
    if args.quick:
        results["verification_max_diff"] = verify(model, tok, pool_t, feats, alps, args.batch_size)
    md = markdown(meta, feats.passes, rows, sensitivity, text)
    print(md)
    emit("mining", "Mining: selectors and head sets on a mixed pool (code target)", md, results,
         out_dir if args.quick or args.no_publish else None)


if __name__ == "__main__":
    main()
