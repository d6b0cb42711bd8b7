"""Selection benchmark: does p2d's default subset train a better model than random, RDS+ and IFD subsets?

A labelled pool from ../shared/data with two sources per domain and corrupted rows:
CodeAlpaca and stdlib functions (code), GSM8K train and p2d's generated word problems (math),
the Alpaca sample and Self-Instruct seeds (general), and code and math rows whose answers were
swapped with another row's (corrupt). The CodeAlpaca and GSM8K rows the proxy run trains on (the
first 64 of each file, see `p2d localize`) are kept out of everything here.

Per domain the target is 64 further CodeAlpaca (code) or GSM8K train (math) rows, and each trained
model is scored by response NLL on held-out sets: one from the target's source (unseen CodeAlpaca
rows; GSM8K test) and others from sources the target was not drawn from (HumanEval, as the body
and as the whole function; p2d's generated word problems).

Selections are made with p2d.mining.mine, each as `p2d mine --selector S` makes it at its
defaults: `p2d` (`--diversity none`: the top rows by head affinity and IFD rank, the default
until session 5), `p2d-div` (`--diversity facility`: the same scores, then facility location over
the top 2x; read off the p2d run), `p2d-divq` (`--diversity facility-quality`, **the default**:
the same without the shortlist's worst third by IFD), `p2d-divq-w16` (the default, mined with
`--mining-window 16`: each sample's prompt and first 16 response tokens, ~0.6 of the tokens),
`p2d-divq-bf16` (the default, its pool pass in bfloat16: `--mining-dtype bfloat16`), `p2d-divq-bf16-w32` (both,
with a 32-token window), `p2d-paper` (the same ALPS-head affinity, no
quality signal: read off the p2d run, which computes exactly it), `rds`, `ifd`, and `random` (3
seeds). `random-tok` draws random rows until it holds as many tokens as the default subset (the
equal-token comparison).
Every model reads the Alpaca prompt of the ALPS paper (`--template alpaca`; SmolLM2's default `auto`
is its ChatML template). Each subset is trained as `p2d train` trains it by default (heads scope, its lr and epochs), with
seeds 0-2 (training seeds; for the random draws also the draw); `/full` cells train all weights as a check that the data, not the
scope, carries the result. Results accumulate in --results, so the run can be stopped and resumed.

    python benchmarks/selection.py --heads-code runs/sel-code/heads.json --heads-math runs/sel-math/heads.json
    python benchmarks/selection.py --quick        # smoke test on a tiny pool, nothing in docs/
"""

from __future__ import annotations

import argparse
import copy
import math
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _report import DOCS, command, emit, table  # noqa: E402
from pools import _row, _sources, default_data_root  # noqa: E402

from p2d import P2DError  # noqa: E402
from p2d.data import to_examples  # noqa: E402
from p2d.default_pool import build_pool, build_seeds  # noqa: E402
from p2d.evaluate import gsm8k_examples, gsm8k_rows, humaneval_examples, humaneval_problems, response_nll  # noqa: E402
from p2d.geometry import AttentionGeometry  # noqa: E402
from p2d.io import read_json, write_json  # noqa: E402
from p2d.masking import apply_scope  # noqa: E402
from p2d.mining import combine, diversify, mine, select, worst_third  # noqa: E402
from p2d.models import load_model  # noqa: E402
from p2d.pipelines.mine import MineConfig  # noqa: E402
from p2d.pipelines.train import DEFAULT_EPOCHS, DEFAULT_LR  # noqa: E402
from p2d.selection import read_heads_json  # noqa: E402
from p2d.tokens import Example, tokenize  # noqa: E402
from p2d.trainer import TrainConfig, train  # noqa: E402

MODEL = "smollm2-135m"
PROXY_ROWS = 64  # `p2d localize` trains its proxy on the first 64 rows of the card's source
POOL = dict(codealpaca=250, stdlib=100, gsm8k=250, generated=100, general=200, corrupt_code=50, corrupt_math=50)
QUICK_POOL = dict(codealpaca=10, stdlib=4, gsm8k=10, generated=4, general=8, corrupt_code=2, corrupt_math=2)
IN_DOMAIN = {"code": ("codealpaca", "stdlib"), "math": ("gsm8k", "generated")}
# the default mined with another precision or window: name -> (model dtype or None for fp32, response tokens read)
VARIANTS = {"p2d-divq-w16": (None, 16),  # issue #10's profile kept precision at 8-16 response tokens
            "p2d-divq-bf16": (torch.bfloat16, None), "p2d-divq-bf16-w32": (torch.bfloat16, 32)}
SELECTIONS = ("p2d", "p2d-div", "p2d-divq", *VARIANTS, "p2d-paper", "rds", "ifd", "random", "random-tok")
MINED = tuple(s for s in SELECTIONS if not s.startswith("random"))
DEFAULT = "p2d-divq"  # what `p2d mine` selects at its defaults (--diversity facility-quality)
DEFAULT_CELLS = ["p2d/heads", "random/heads", "rds/heads", "p2d-div/heads", "p2d-divq/heads", "p2d-paper/heads",
                 "random-tok/heads", "p2d-divq/full",
                 "random/full", "ifd/heads"]
# run order: the core comparison first (every domain, seed by seed), then the checks
TIER = {"p2d/heads": 0, "random/heads": 0, "rds/heads": 0, "p2d-div/heads": 0, "p2d-divq/heads": 0,
        "p2d-paper/heads": 1, "random-tok/heads": 1,
        "p2d-divq/full": 2, "random/full": 2, "ifd/heads": 3}
TRAIN = dict(batch_size=4, max_length=256, save_every=1000)
EVAL_MAX_LENGTH = 512


def build(root: Path, sizes: dict, n_target: int, seed: int = 0) -> tuple[list[dict], dict[str, list[dict]], dict]:
    """(pool rows, targets by domain, held-out rows by set name); every row has a `label`, seeded."""
    rng = np.random.default_rng(seed)
    src = _sources(root)
    code = [r for r in src["code"] if int(r["id"].split("-")[1]) >= PROXY_ROWS]
    gsm = [r for r in src["math"] if int(r["id"].split("-")[1]) >= PROXY_ROWS]
    code = [code[i] for i in rng.permutation(len(code))]
    gsm = [gsm[i] for i in rng.permutation(len(gsm))]
    embedded = build_pool()
    stdlib = [_row(f"stdlib-{r['id']}", r["instruction"], r["input"], r["output"], "stdlib") for r in embedded if r["domain"] == "code"]
    generated = [_row(f"generated-{r['id']}", r["instruction"], r["input"], r["output"], "generated")
                 for r in embedded if r["domain"] == "math"]
    general = [src["general"][i] for i in rng.choice(len(src["general"]), sizes["general"], replace=False)]

    def take(rows: list[dict], n: int) -> list[dict]:
        out, rows[:] = rows[:n], rows[n:]
        return out

    def corrupt(rows: list[dict], label: str) -> list[dict]:
        """Each row gets the next one's answer (a cyclic shift: no row keeps its own)."""
        return [_row(f"corrupt-{r['id']}", r["instruction"], r["input"], rows[(j + 1) % len(rows)]["output"], label)
                for j, r in enumerate(rows)]

    targets = {"code": take(code, n_target), "math": take(gsm, n_target)}
    held = {"codealpaca": take(code, n_target)}
    pool = (take(code, sizes["codealpaca"]) + take(gsm, sizes["gsm8k"])
            + [stdlib[i] for i in rng.choice(len(stdlib), sizes["stdlib"], replace=False)]
            + [generated[i] for i in rng.choice(len(generated), sizes["generated"], replace=False)]
            + [dict(r, label="general") for r in general]
            + corrupt(take(code, sizes["corrupt_code"]), "corrupt")
            + corrupt(take(gsm, sizes["corrupt_math"]), "corrupt"))
    for r in pool:
        if r["label"] == "code":
            r["label"] = "codealpaca"
        elif r["label"] == "math":
            r["label"] = "gsm8k"
    return [pool[i] for i in rng.permutation(len(pool))], targets, held


def eval_sets(root: Path, held: dict, n: int, tok) -> dict[str, dict]:
    """Held-out sets per domain: name -> tokenized examples; `source` says whether the target's source made it."""
    problems = humaneval_problems(root / "eval/humaneval.jsonl.gz", n)
    from p2d.evaluate import humaneval_prompt

    sets = {
        "code": {"codealpaca": (to_examples(held["codealpaca"], "codealpaca-held-out"), "target's source"),
                 "humaneval-body": (humaneval_examples(problems), "other source"),
                 "humaneval-fn": ([Example(p["task_id"], humaneval_prompt(p), p["prompt"] + p["canonical_solution"])
                                   for p in problems], "other source")},
        "math": {"gsm8k-test": (gsm8k_examples(gsm8k_rows(root / "eval/gsm8k_test.jsonl", n)), "target's source"),
                 "generated": (to_examples(build_seeds("math", n), "p2d:seed/math"), "other source")},
    }
    return {d: {name: {"data": tokenize(ex, tok, EVAL_MAX_LENGTH), "source": s} for name, (ex, s) in v.items()}
            for d, v in sets.items()}


def evaluate_all(model, sets: dict, pad_id: int, domains: list[str] | None = None) -> dict[str, float]:
    """Response NLL on the held-out sets of `domains` (default: every domain)."""
    return {name: response_nll(model, v["data"], pad_id).mean for d, s in sets.items() if domains is None or d in domains
            for name, v in s.items()}


def mine_selections(domain: str, model, tok, pool: list[Example], target: list[Example], heads_path: Path,
                    frac: float, store: Path, todo: set[str]) -> dict[str, dict]:
    """Every selection of one domain with p2d.mining.mine at `p2d mine`'s defaults: name -> {ids, seconds}."""
    cfg = MineConfig(heads=str(heads_path), domain=domain)
    heads = read_heads_json(heads_path).heads
    task_model = load_model(cfg.task_model_path())[0] if cfg.needs_task_model() else None
    pool_t, target_t = tokenize(pool, tok, cfg.max_length), tokenize(target, tok, cfg.max_length)
    kw = dict(data_frac=frac, tokenizer=tok, batch_size=cfg.batch_size, progress=False)
    out = {}
    if "p2d" in todo:
        t0 = time.perf_counter()
        res = mine(model, pool_t, target_t, selector="p2d", heads=heads, quality=cfg.quality, task_model=task_model,
                   diversity="none", **kw)
        out["p2d"] = {"ids": _ids(res.ids, res.selected), "seconds": time.perf_counter() - t0,
                      "summary": res.summary, "quality": cfg.quality}
    if "p2d-paper" in todo:  # mine(selector="p2d-paper"): the same head features and prototypes, affinity alone
        _, sel = select(res.ids, combine(res.affinity, None, 0.0), frac)
        out["p2d-paper"] = {"ids": _ids(res.ids, sel), "seconds": res.summary["timings"]["extract_s"]}
    if "p2d-div" in todo:  # mine(diversity="facility"): the same scores, then facility location over the top 2x
        t0 = time.perf_counter()
        _, sel = select(res.ids, diversify(res.ids, res.score, res.features, math.ceil(frac * len(pool))), frac)
        out["p2d-div"] = {"ids": _ids(res.ids, sel), "seconds": out["p2d"]["seconds"] + time.perf_counter() - t0}
    if "p2d-divq" in todo:  # mine(diversity="facility-quality"): the same, the shortlist's worst third by IFD left out
        t0 = time.perf_counter()
        excluded = worst_third(res.quality, cfg.quality)
        _, sel = select(res.ids, diversify(res.ids, res.score, res.features, math.ceil(frac * len(pool)), excluded),
                        frac)
        out["p2d-divq"] = {"ids": _ids(res.ids, sel), "seconds": out["p2d"]["seconds"] + time.perf_counter() - t0}
    for name in [n for n in VARIANTS if n in todo]:  # `p2d mine --mining-dtype D --mining-window W`, else defaults
        dtype, window = VARIANTS[name]
        t0 = time.perf_counter()
        m, tm = (model, task_model) if dtype is None else (
            copy.deepcopy(model).to(dtype), task_model and copy.deepcopy(task_model).to(dtype))
        r = mine(m, tokenize(pool, tok, cfg.max_length, window=window) if window else pool_t,
                 tokenize(target, tok, cfg.max_length, window=window) if window else target_t, selector="p2d",
                 heads=heads, quality=cfg.quality, task_model=tm, diversity=cfg.diversity, **kw)
        out[name] = {"ids": _ids(r.ids, r.selected), "seconds": time.perf_counter() - t0}
    for name in [n for n in ("rds", "ifd") if n in todo]:  # rds/ifd pool features are the same for every domain
        t0 = time.perf_counter()
        r = mine(model, pool_t, target_t, selector=name, store_dir=store / name, **kw)
        out[name] = {"ids": _ids(r.ids, r.selected), "seconds": time.perf_counter() - t0}
    return out


def _ids(ids: list[str], selected: np.ndarray) -> list[str]:
    return [i for i, keep in zip(ids, selected) if keep]


def random_ids(pool_ids: list[str], count: int, seed: int, tokens: list[int] | None = None,
               budget: int | None = None) -> list[str]:
    """A seeded random subset: `count` rows, or (with a token budget) rows until the budget is reached."""
    order = np.random.default_rng(1000 + seed).permutation(len(pool_ids))
    if budget is None:
        return [pool_ids[i] for i in order[:count]]
    out, total = [], 0
    for i in order:
        if total >= budget:
            break
        out.append(pool_ids[i])
        total += tokens[i]
    return out


def run_cell(examples: list[Example], heads: list, scope: str, seed: int, epochs: int, work: Path,
             sets: dict, domain: str) -> dict:
    model, tok = load_model(MODEL)
    info = apply_scope(model, AttentionGeometry.from_config(model.config), scope, heads)
    cfg = TrainConfig(lr=DEFAULT_LR[scope], epochs=epochs, seed=seed, **TRAIN)
    result = train(model, tokenize(examples, tok, cfg.max_length), tok.pad_token_id, cfg, work, progress=False)
    shutil.rmtree(work, ignore_errors=True)
    return {"nll": evaluate_all(model, sets, tok.pad_token_id, [domain]), "steps": result.steps, "seconds": result.seconds,
            "tokens": result.tokens, "final_loss": result.final_loss, "trainable": info.trainable_params, "lr": cfg.lr}


# ---------------------------------------------------------------------------------------------
# Report


def summarize(res: dict) -> tuple[str, dict]:
    lines, verdicts = [], {}
    for domain in res["domains"]:
        cells = {k: v for k, v in res["cells"].items() if k.startswith(domain + "/")}
        groups: dict[str, list[dict]] = {}
        for key, v in cells.items():
            groups.setdefault(key.rsplit("/", 1)[0].split("/", 1)[1], []).append(v)
        sets = res["eval_sets"][domain]
        base = res["base"]
        rows = []
        for name in sorted(groups, key=lambda g: (g.endswith("/full"), SELECTIONS.index(g.split("/")[0]))):
            vs = groups[name]
            row = {"cell": name, "seeds": len(vs), "tokens": f"{int(np.mean([v['tokens'] for v in vs])) // max(1, res['epochs']):,}"}
            for s in sets:
                x = np.array([v["nll"][s] for v in vs])
                row[s] = f"{x.mean():.4f}" + (f" ± {x.std(ddof=1):.4f}" if len(x) > 1 else "")
            rows.append(row)
        comp = res["composition"][domain]
        order = sorted(comp, key=lambda k: (SELECTIONS.index(k.rsplit("-s", 1)[0] if k.startswith("random") else k), k))
        comp_rows = [{"selection": k, **{lab: f"{n / sum(comp[k].values()):.0%}" for lab, n in comp[k].items()},
                      "in-domain clean": f"{sum(comp[k].get(l, 0) for l in IN_DOMAIN[domain]) / sum(comp[k].values()):.0%}",
                      "corrupted rows": comp[k].get("corrupt", 0)} for k in order]
        labels = sorted({lab for c in comp.values() for lab in c} - {"corrupt"})
        verdict = _verdicts(groups, sets)
        verdicts[domain] = verdict
        lines += [f"### {domain}", "",
                  "Base model (no training): " + ", ".join(f"{s} {base[s]:.4f}" for s in sets) + ".", "",
                  table(rows, ["cell", "seeds", "tokens", *sets]), "",
                  "Held-out sets: " + "; ".join(f"`{s}` ({sets[s]})" for s in sets) + ".", "",
                  "Composition of the selected rows:", "",
                  table(comp_rows, ["selection", *labels, "in-domain clean", "corrupted rows"]), "",
                  *[f"- {v}" for v in verdict], ""]
    return "\n".join(lines), verdicts


def _verdicts(groups: dict, sets: dict) -> list[str]:
    """Plain sentences: each p2d variant against each random seed and the other selectors, per held-out set."""
    out = []
    for name in ("p2d/heads", "p2d-div/heads", "p2d-divq/heads", "p2d-divq-w16/heads", "p2d-divq-bf16/heads"):
        if name in groups:
            out += _verdicts_of(name, groups, sets)
    return out or ["p2d/heads not run yet."]


def _verdicts_of(name: str, groups: dict, sets: dict) -> list[str]:
    out = []
    label = name.split("/")[0]
    for s in sets:
        mine = np.array([v["nll"][s] for v in groups[name]])
        parts = []
        if "random/heads" in groups:
            rand = np.array([v["nll"][s] for v in groups["random/heads"]])
            wins = int((mine.mean() < rand).sum())
            parts.append(f"below {wins} of {len(rand)} random subsets ({label} {mine.mean():.4f}, random "
                         f"{rand.mean():.4f} ± {rand.std(ddof=1) if len(rand) > 1 else 0:.4f})")
        for other in ("p2d/heads", "p2d-divq/heads", "rds/heads", "p2d-paper/heads", "ifd/heads", "random-tok/heads"):
            if other in groups and other != name:
                o = np.array([v["nll"][s] for v in groups[other]])
                noise = max(mine.std(ddof=1) if len(mine) > 1 else 0.0, o.std(ddof=1) if len(o) > 1 else 0.0)
                word = "tie" if abs(mine.mean() - o.mean()) <= noise else ("better" if mine.mean() < o.mean() else "worse")
                parts.append(f"vs {other.split('/')[0]} {o.mean():.4f}: {word} ({len(mine)} vs {len(o)} seeds; "
                             "tie = within the larger seed std)")
        if name == f"{DEFAULT}/heads" and f"{DEFAULT}/full" in groups and "random/full" in groups:
            a, b = groups[f"{DEFAULT}/full"][0]["nll"][s], np.mean([v["nll"][s] for v in groups["random/full"]])
            parts.append(f"full scope: {DEFAULT} {a:.4f} vs random {b:.4f} ({'better' if a < b else 'worse'})")
        out.append(f"`{s}`: {label} " + "; ".join(parts) + ".")
    return out


# ---------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--heads-code", type=Path, help="heads.json of `p2d localize --domain code` (its task model is used)")
    ap.add_argument("--heads-math", type=Path, help="heads.json of `p2d localize --domain math`")
    ap.add_argument("--domains", nargs="+", default=["code", "math"], choices=["code", "math"])
    ap.add_argument("--cells", nargs="+", default=DEFAULT_CELLS, help="SELECTION/SCOPE ...")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--data-frac", type=float, default=0.12)
    ap.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    ap.add_argument("--eval-n", type=int, default=64)
    ap.add_argument("--data-root", type=Path)
    ap.add_argument("--results", type=Path, help="accumulated results (default: docs/results/selection_raw.json)")
    ap.add_argument("--quick", action="store_true", help="tiny pool, 1 epoch, seed 0; nothing in docs/")
    args = ap.parse_args()
    root = args.data_root or default_data_root()
    sizes, local = POOL, None
    if args.quick:
        sizes, args.epochs, args.eval_n, args.seeds, args.data_frac = QUICK_POOL, 1, 4, [0], 0.2
        local = Path(tempfile.mkdtemp(prefix="p2d-bench-selection-"))
        args.results = local / "selection_raw.json"
    args.results = args.results or DOCS / "results" / "selection_raw.json"
    heads_paths = {"code": args.heads_code, "math": args.heads_math}
    for d in args.domains:
        if heads_paths[d] is None or not heads_paths[d].is_file():
            ap.error(f"--heads-{d}: a heads.json from `p2d localize --domain {d}` is needed")
    settings = {"pool": sizes, "data_frac": args.data_frac, "epochs": args.epochs, "eval_n": args.eval_n,
                "train": TRAIN, "lr": DEFAULT_LR, "heads": {d: str(heads_paths[d]) for d in args.domains}}
    res = read_json(args.results) if args.results.is_file() else {"settings": settings, "selections": {}, "cells": {}}
    # a run of some domains must match the stored settings, and the stored heads of those domains
    if {**res["settings"], "heads": {d: res["settings"]["heads"].get(d) for d in args.domains}} != settings:
        raise P2DError(f"{args.results} was made with other settings; use another --results")
    settings["heads"] = res["settings"]["heads"] | settings["heads"]
    res["settings"] = settings
    res["domains"], res["epochs"] = sorted(set(res.get("domains", [])) | set(args.domains)), args.epochs

    pool_rows, targets, held = build(root, sizes, args.eval_n)
    label = {r["id"]: r["label"] for r in pool_rows}
    pool = to_examples(pool_rows, "selection-pool")
    by_id = {e.id: e for e in pool}
    model, tok = load_model(MODEL)
    sets = eval_sets(root, held, args.eval_n, tok)
    res["eval_sets"] = {d: {n: v["source"] for n, v in s.items()} for d, s in sets.items()}
    res["pool_labels"] = dict(Counter(label.values()))
    if "base" not in res:
        res["base"] = evaluate_all(model, sets, tok.pad_token_id)
        write_json(args.results, res)
    pool_tokens = [len(t) for t in tokenize(pool, tok, TRAIN["max_length"])]
    count = math.ceil(args.data_frac * len(pool))
    store = Path(tempfile.gettempdir()) / f"p2d-selection-store-{'quick' if args.quick else 'full'}"
    for d in args.domains:
        todo = {k for k in MINED if f"{d}/{k}" not in res["selections"]}
        if todo:
            print(f"mining {d}: {', '.join(sorted(todo))}", flush=True)
            mined = mine_selections(d, model, tok, pool, to_examples(targets[d], f"{d}-target"), heads_paths[d],
                                    args.data_frac, store, todo | ({"p2d"} if todo & {"p2d-paper", "p2d-div", "p2d-divq"} else set()))
            old = res["selections"].get(f"{d}/p2d")
            if old and "p2d" in mined and old["ids"] != mined["p2d"]["ids"]:
                raise P2DError(f"{d}: p2d's selection changed since {args.results} was made; use another --results")
            res["selections"] |= {f"{d}/{k}": v for k, v in mined.items() if k in todo}
            write_json(args.results, res)
        ids = [e.id for e in pool]
        p2d_tokens = sum(pool_tokens[ids.index(i)] for i in res["selections"][f"{d}/{DEFAULT}"]["ids"])
        for s in args.seeds:
            res["selections"][f"{d}/random-s{s}"] = {"ids": random_ids(ids, count, s), "seconds": 0.0}
            res["selections"][f"{d}/random-tok-s{s}"] = {"ids": random_ids(ids, count, s, pool_tokens, p2d_tokens),
                                                         "seconds": 0.0}
    res["composition"] = {d: {k.split("/", 1)[1]: dict(Counter(label[i] for i in v["ids"]))
                              for k, v in res["selections"].items() if k.startswith(d + "/")} for d in res["domains"]}
    write_json(args.results, res)
    del model

    todo = []
    for d in args.domains:
        for cell in args.cells:
            sel, scope = cell.split("/")
            seeds = args.seeds if scope == "heads" else [0]  # full-scope cells are a one-seed check
            todo += [(d, sel, scope, s) for s in seeds if f"{d}/{sel}/{scope}/s{s}" not in res["cells"]]
    todo.sort(key=lambda c: (TIER.get(f"{c[1]}/{c[2]}", 4), c[3], args.domains.index(c[0]), SELECTIONS.index(c[1])))
    if todo and command() not in res.setdefault("commands", []):
        res["commands"].append(command())
    for n, (d, sel, scope, s) in enumerate(todo, 1):
        key = f"{d}/{sel}/{scope}/s{s}"
        sel_key = f"{d}/{sel}-s{s}" if sel in ("random", "random-tok") else f"{d}/{sel}"
        print(f"[{n}/{len(todo)}] {key}", flush=True)
        heads = read_heads_json(heads_paths[d]).heads
        cell = run_cell([by_id[i] for i in res["selections"][sel_key]["ids"]], heads, scope, s, args.epochs,
                        Path(tempfile.gettempdir()) / "p2d-selection-cell", sets, d)
        res["cells"][key] = cell
        print("  " + ", ".join(f"{k} {v:.4f}" for k, v in cell["nll"].items()) + f" ({cell['seconds']:.0f} s)",
              flush=True)
        write_json(args.results, res)

    md, verdicts = summarize(res)
    intro = (f"SmolLM2-135M (fp32). Pool: {len(pool)} rows ("
             + ", ".join(f"{n} {k}" for k, n in sorted(res['pool_labels'].items())) + "), each selection keeps "
             f"{args.data_frac:.0%} ({count} rows). Training: `p2d train` defaults, heads scope with the domain's "
             f"ALPS heads (lr {DEFAULT_LR['heads']:g}; full scope lr {DEFAULT_LR['full']:g}), {args.epochs} epochs, "
             f"batch {TRAIN['batch_size']}, max length {TRAIN['max_length']}. NLL: nats per response token on "
             f"{args.eval_n} rows per held-out set; ± is the std over training seeds (p2d) or selection seeds (random).")
    made = "\n".join(["The cells were made by these invocations (the command above rendered them):", "",
                       *[f"- `{c}`" for c in res.get("commands", [])]])
    not_run = sorted({c for c in DEFAULT_CELLS for d in res["domains"]
                      if not any(k.startswith(f"{d}/{c}/") for k in res["cells"])})
    gaps = f"Not run (CPU time): {', '.join(f'`{c}`' for c in not_run)}." if not_run else ""
    emit("selection", "Selection: p2d against random, RDS+ and IFD subsets (SmolLM2-135M, CPU)",
         "\n\n".join(x for x in (intro, md, gaps, made) if x), {**res, "verdicts": verdicts}, local)


if __name__ == "__main__":
    main()
