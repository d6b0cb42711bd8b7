"""Quality grid: which data (selection) × which parameters (adaptation) train SmolLM2-135M best, on real data.

Answers with numbers whether ALPS-chosen heads train better than random or layer-uniform heads of
the same count, whether P2D-mined data beats random data of the same size, and where P2D loses.
Every cell trains with p2d's own apply_scope + train and the same epochs, AdamW, cosine schedule,
batch and max length; only the data and the trainable tensors differ. Head scopes and LoRA train
few parameters and take --lr-heads; full, alps and no-attn take --lr-full.

Selections are mined here, with p2d.mining.mine on the base model, from the labelled mixed pool of
benchmarks/pools.py (code, math, general, corrupted code): `p2d` (features of the ALPS heads in
--heads), `random` (seeded), `embedding` (middle-layer hidden state), and `all` (the whole pool).
The target is the pool's held-out CodeAlpaca rows (--domain code) or held-out GSM8K train rows
(--domain math). Adaptations: `heads` (the ALPS heads), `random-heads` and `lc-heads` (the same
count, seeded random / layer-uniform, from head_scores.npy beside --heads), `transfer-heads` (the
heads.json of --transfer-heads: ALPS heads found on another dataset, see benchmarks/heads_transfer.py),
`alps`, `full`, `no-attn`, `lora` (rank --lora-rank on q/k/v). A cell is SELECTION/ADAPTATION; seed s
sets the data order and, where they exist, the random selection and the random heads.

Base NLL, selections and cells accumulate in --results, so a run can be stopped and extended:
finished cells are skipped, an interrupted cell resumes from its trainer checkpoint.

    python benchmarks/quality_grid.py --heads RUN/localize/heads.json             # default grid
    python benchmarks/quality_grid.py --heads ... --cells all/full                 # + measured T_ref
    python benchmarks/quality_grid.py --quick                                     # smoke test, not in docs/
"""

from __future__ import annotations

import argparse
import hashlib
import math
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _report import DOCS, command, publish, table  # noqa: E402
from mining import quick_heads  # noqa: E402
from pools import LABELS, default_data_root, domain_pool, held_out_code  # noqa: E402

from p2d import P2DError  # noqa: E402
from p2d.data import to_examples  # noqa: E402
from p2d.evaluate import evaluate, humaneval_problems, humaneval_prompt, response_nll  # noqa: E402
from p2d.geometry import AttentionGeometry  # noqa: E402
from p2d.io import read_json, write_json, write_text  # noqa: E402
from p2d.masking import apply_scope  # noqa: E402
from p2d.mining import mine  # noqa: E402
from p2d.models import load_model  # noqa: E402
from p2d.pipelines.mine import MineConfig  # noqa: E402
from p2d.selection import read_heads_json, select_heads  # noqa: E402
from p2d.tokens import Example, Tokenized, tokenize  # noqa: E402
from p2d.trainer import TrainConfig, train  # noqa: E402

MODEL = "smollm2-135m"
EVAL = {"code": ("eval/humaneval.jsonl.gz", "humaneval", "humaneval_pass@1"),
        "math": ("eval/gsm8k_test.jsonl", "gsm8k", "gsm8k_em")}
# adaptation -> (apply_scope scope, head list, lr group)
ADAPTATIONS = {"heads": ("heads", "alps", "heads"), "random-heads": ("heads", "random", "heads"),
               "lc-heads": ("heads", "lc", "heads"), "alps": ("alps", "alps", "full"),
               "full": ("full", None, "full"), "no-attn": ("no-attn", None, "full"),
               "lora": ("lora", None, "heads"), "transfer-heads": ("heads", "transfer", "heads")}
# selection -> (p2d.mining selector, quality signal); "p2d" is the paper's method, "p2d-nll" p2d's default
SELECTORS = {"p2d": ("p2d", "none"), "p2d-nll": ("p2d", "nll"), "p2d-ifd": ("p2d", "ifd"), "random": ("random", "none"),
             "embedding": ("embedding-mid", "none"), "all": None}
DEFAULT_CELLS = ["p2d/heads", "p2d/random-heads", "p2d/lc-heads", "p2d/alps", "p2d/full", "p2d/no-attn",
                 "p2d/lora", "random/heads", "random/full", "embedding/heads"]
SEEDED_CELLS = ["p2d/heads", "random/heads", "p2d/random-heads"]
QUICK_POOL = dict(n_code=12, n_math=8, n_general=6, n_corrupt=4, n_target=8)
QUICK_CELLS = ["p2d/heads", "p2d/random-heads", "random/heads", "p2d/full"]
# Before any cell has run, training tokens/s is guessed as eval forward tokens/s divided by this
# (backward ≈ 2 forwards; full-model AdamW adds about one more on a CPU).
TRAIN_COST = {"heads": 3.0, "full": 4.0}
SAVE_EVERY = 100  # optimizer steps between checkpoints: resumable, without writing GBs every few steps


@dataclass(frozen=True)
class Settings:
    """What makes cells comparable; a results file only accumulates cells made with the same settings."""

    domain: str
    heads: str
    data_frac: float
    epochs: int
    batch_size: int
    max_length: int
    lr_heads: float
    lr_full: float
    lora_rank: int
    eval_limit: int
    task_limit: int
    pool: dict


@dataclass(frozen=True)
class Cell:
    selection: str
    adaptation: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.selection}/{self.adaptation}/s{self.seed}"


    @property
    def selection_key(self) -> str:
        """Only the random selection changes with the seed; p2d and embedding mine once (seed 0)."""
        return f"random-s{self.seed}" if self.selection == "random" else self.selection


def parse_cells(cells: list[str], seeds: list[int], seeded: list[str]) -> list[Cell]:
    out = []
    for c in cells:
        sel, _, adapt = c.partition("/")
        if sel not in SELECTORS or adapt not in ADAPTATIONS:
            raise P2DError(f"--cells: {c!r} is not SELECTION/ADAPTATION with selection in {', '.join(SELECTORS)} "
                           f"and adaptation in {', '.join(ADAPTATIONS)}")
        out += [Cell(sel, adapt, s) for s in (seeds if c in seeded else [0])]
    return out


def head_lists(heads_path: Path, geom: AttentionGeometry, seeds: list[int],
               transfer: Path | None = None) -> dict[str, list]:
    """The ALPS heads, the layer-uniform (lc) heads, per-seed random heads and the transferred heads, all of the
    same count."""
    sel = read_heads_json(heads_path, geom)
    scores_path = heads_path.with_name("head_scores.npy")
    if not scores_path.is_file():
        raise P2DError(f"{scores_path} not found: lc heads need every head's ALPS score")
    scores = np.load(scores_path)
    lists = {"alps": sel.heads, "lc": select_heads(scores, sel.head_frac, "lc")}
    lists |= {f"random-s{s}": select_heads(scores, sel.head_frac, "random", seed=s) for s in seeds}
    if transfer is not None:
        lists["transfer"] = read_heads_json(transfer, geom).heads
    if len({len(v) for v in lists.values()}) != 1:
        raise P2DError(f"{heads_path}: {len(sel.heads)} heads, but head_frac {sel.head_frac} gives "
                       f"{len(lists['lc'])}; regenerate it with `p2d localize --method top`")
    return lists


def alps_seconds(heads_path: Path) -> float | None:
    """Proxy + scoring seconds of the run that wrote heads.json (`p2d localize` or `p2d run`), if recorded."""
    localize = heads_path.with_name("localize.json")
    if localize.is_file():
        d = read_json(localize)
        return d["proxy_seconds"] + d["localize_seconds"]
    ledger = heads_path.parent.parent / "ledger.json"
    if ledger.is_file():
        d = read_json(ledger)
        return sum(d[k]["seconds"] for k in ("proxy", "localize") if k in d)
    return None


def extra_eval_sets(domain: str, data_root: Path, used_ids: set[str], n: int, tok) -> dict[str, list[Tokenized]]:
    """Further held-out NLL sets, so that no verdict rests on one response format (code only).

    `humaneval-fn`: the whole function (signature, docstring, body) as the response, the form
    CodeAlpaca answers take; the main HumanEval NLL scores the indented body alone. `codealpaca`:
    CodeAlpaca rows that neither the pool nor the mining target contains.
    """
    if domain != "code":
        return {}
    problems = humaneval_problems(data_root / EVAL["code"][0], n)
    fn = [Example(p["task_id"], humaneval_prompt(p), p["prompt"] + p["canonical_solution"]) for p in problems]
    sets = {"humaneval-fn": fn, "codealpaca": to_examples(held_out_code(data_root, used_ids, n), "codealpaca-held-out")}
    return {name: tokenize(ex, tok, 1024) for name, ex in sets.items()}


def eval_model(model, tok, s: Settings, data_root: Path, extra: dict[str, list[Tokenized]]) -> dict:
    """Held-out response NLL (and the task metric when --task-limit > 0), without the per-task dump; plus the
    NLL of every extra set under "extra"."""
    path, task, _ = EVAL[s.domain]
    res = evaluate(model, s.domain, eval_source=data_root / path, eval_task=task, nll_limit=s.eval_limit,
                   task_limit=s.task_limit or None, tasks=s.task_limit > 0, tokenizer=tok, template="alpaca")
    res.pop("task_results", None)
    res["eval_source"] = str(path)
    res["extra"] = {name: response_nll(model, data, tok.pad_token_id).mean for name, data in extra.items()}
    return res


def mine_selection(key: str, model, tok, pool: list[Example], target: list[Example], heads: list,
                   data_frac: float) -> dict:
    """One selection: selected ids, mining seconds (0 for the whole pool) and the miner's summary."""
    sel = key.split("-s")[0]
    if sel == "all":
        return {"ids": [e.id for e in pool], "seconds": 0.0, "summary": {}}
    seed = int(key.split("-s")[1]) if sel == "random" else 0
    max_length = MineConfig.max_length
    pool_t, target_t = tokenize(pool, tok, max_length), tokenize(target, tok, max_length)
    t0 = time.perf_counter()
    selector, quality = SELECTORS[sel]
    res = mine(model, pool_t, target_t, data_frac=data_frac, selector=selector, quality=quality, tokenizer=tok,
               heads=heads, seed=seed, batch_size=MineConfig.batch_size, progress=False)
    return {"ids": [i for i, keep in zip(res.ids, res.selected) if keep], "seconds": time.perf_counter() - t0,
            "summary": {k: v for k, v in res.summary.items() if k != "head_sets"}}


def run_cell(cell: Cell, s: Settings, examples: list[Example], heads: list | None, work: Path,
             data_root: Path, extra: dict[str, list[Tokenized]]) -> dict:
    """Train a fresh base model in the cell's scope on its selection, then evaluate it."""
    scope, _, lr_group = ADAPTATIONS[cell.adaptation]
    model, tok = load_model(MODEL)
    geom = AttentionGeometry.from_config(model.config)
    info = apply_scope(model, geom, scope, heads, lora_rank=s.lora_rank)
    cfg = TrainConfig(lr=s.lr_heads if lr_group == "heads" else s.lr_full, epochs=s.epochs,
                      batch_size=s.batch_size, max_length=s.max_length, seed=cell.seed, save_every=SAVE_EVERY)
    out = work / cell.key.replace("/", "_")
    result = train(model, tokenize(examples, tok, s.max_length), tok.pad_token_id, cfg, out)
    ev = eval_model(model, tok, s, data_root, extra)
    shutil.rmtree(out, ignore_errors=True)
    return {**asdict(cell), "cell": f"{cell.selection}/{cell.adaptation}", "selection_key": cell.selection_key,
            "lr": cfg.lr, "n_heads": len(heads or []), "trainable_params": info.trainable_params,
            "train_samples": len(examples), "steps": result.steps, "train_seconds": result.seconds,
            "train_tokens": result.tokens, "tokens_per_s": result.tokens_per_s, "final_loss": result.final_loss,
            "eval": ev}


def cell_heads(cell: Cell, lists: dict) -> list | None:
    which = ADAPTATIONS[cell.adaptation][1]
    return lists[f"random-s{cell.seed}"] if which == "random" else lists.get(which)


def estimate(todo: list[Cell], res: dict, pool_tokens: list[int], s: Settings) -> dict[str, float]:
    """Seconds each pending cell (and missing selection) should take: tokens / (measured or guessed) tokens/s."""
    base = res["base"]
    gen_s = base["gen_tokens"] / base["gen_tokens_per_s"] if base.get("gen_tokens") else 0.0
    fwd_tps = base["nll_tokens"] / (base["seconds"] - gen_s)  # forward speed of the NLL pass alone
    done = list(res["cells"].values())
    mean_tokens = sum(pool_tokens) / len(pool_tokens)
    out = {}
    for key in sorted({c.selection_key for c in todo} - set(res["selections"])):
        if not key.startswith(("random", "all")):
            out[f"mine {key}"] = sum(min(n, MineConfig.max_length) for n in pool_tokens) / fwd_tps
    for c in todo:
        sel = res["selections"].get(c.selection_key)
        n = len(pool_tokens) if c.selection == "all" else math.ceil(s.data_frac * len(pool_tokens))
        tokens = sum(pool_tokens[i] for i in sel["index"]) if sel else mean_tokens * n
        seen = [d["tokens_per_s"] for d in done if d["adaptation"] == c.adaptation]
        tps = float(np.mean(seen)) if seen else fwd_tps / TRAIN_COST[ADAPTATIONS[c.adaptation][2]]
        out[c.key] = tokens * s.epochs / tps + base["seconds"]
    return out


# ---------------------------------------------------------------------------------------------
# Report


def groups(res: dict) -> dict[str, dict]:
    """Cells merged over seeds: mean ± std NLL, and the means of everything else."""
    by: dict[str, list[dict]] = {}
    for d in res["cells"].values():
        by.setdefault(d["cell"], []).append(d)
    metric = EVAL[res["settings"]["domain"]][2]
    out = {}
    for name, ds in by.items():
        nll = np.array([d["eval"]["nll"] for d in ds])
        g = {"cell": name, "selection": ds[0]["selection"], "adaptation": ds[0]["adaptation"], "seeds": len(ds),
             "nll": float(nll.mean()), "nll_std": float(nll.std(ddof=1)) if len(ds) > 1 else 0.0,
             "trainable_params": ds[0]["trainable_params"], "n_heads": ds[0]["n_heads"],
             "train_s": float(np.mean([d["train_seconds"] for d in ds])),
             "tokens": int(np.mean([d["train_tokens"] for d in ds])),
             "tokens_per_s": float(np.mean([d["tokens_per_s"] for d in ds])),
             "selection_s": float(np.mean([res["selections"][d["selection_key"]]["seconds"] for d in ds]))}
        if metric in ds[0]["eval"]:
            g[metric] = float(np.mean([d["eval"][metric] for d in ds]))
        extra = [d["eval"].get("extra", {}) for d in ds]
        g["extra"] = {k: (float(np.mean([e[k] for e in extra])),
                          float(np.std([e[k] for e in extra], ddof=1)) if len(ds) > 1 else 0.0)
                      for k in extra[0] if all(k in e for e in extra)}
        out[name] = g
    return out


def reference(res: dict, g: dict) -> dict | None:
    """T_ref: the all/full cell's training time if it ran, else full-scope tokens/s × pool tokens × epochs."""
    if "all/full" in g:
        return {"seconds": g["all/full"]["train_s"], "method": "measured (all/full cell)"}
    full = [v["tokens_per_s"] for v in g.values() if v["adaptation"] == "full"]
    if not full:
        return None
    tokens = res["pool"]["train_tokens"] * res["settings"]["epochs"]
    return {"seconds": tokens / float(np.mean(full)),
            "method": f"{tokens:,} pool tokens / {np.mean(full):.0f} tokens/s of the full-scope cells"}


def add_aer(res: dict, g: dict, ref: dict | None) -> None:
    """Cost = mining + ALPS (proxy + scoring, when the cell uses ALPS heads) + training; AER = cost / T_ref."""
    alps_s = res["alps_seconds"] or 0.0
    for v in g.values():
        uses_alps = v["selection"].startswith("p2d") or ADAPTATIONS[v["adaptation"]][1] in ("alps", "lc", "transfer")
        v["cost_s"] = v["selection_s"] + v["train_s"] + (alps_s if uses_alps else 0.0)
        if ref:
            v["aer"] = v["cost_s"] / ref["seconds"]


def fmt_nll(v: dict | None) -> str:
    if v is None:
        return "not run"
    return f"{v['nll']:.4f} ± {v['nll_std']:.4f} ({v['seeds']} seeds)" if v["seeds"] > 1 else f"{v['nll']:.4f}"


def compare(a: dict | None, b: dict | None, what_a: str, what_b: str) -> str:
    """One sentence: a vs b in NLL, flagged when the gap is within the larger seed std."""
    if a is None or b is None:
        return f"{what_a} vs {what_b}: not run."
    diff = a["nll"] - b["nll"]
    noise = max(a["nll_std"], b["nll_std"])
    verdict = ("within seed noise" if abs(diff) <= noise else
               f"{what_a} is {'better' if diff < 0 else 'worse'}")
    return (f"{what_a} {fmt_nll(a)} vs {what_b} {fmt_nll(b)}: Δ = {diff:+.4f} nats/token ({verdict}"
            + (f"; seed std {noise:.4f}" if noise else "; one seed") + ").")


def on_metric(g: dict, name: str) -> dict:
    """The groups that have extra NLL set `name`, with it as their nll."""
    return {k: {**v, "nll": v["extra"][name][0], "nll_std": v["extra"][name][1]}
            for k, v in g.items() if name in v["extra"]}


def other_metrics(g: dict, names: list[str]) -> list[str]:
    """The headline comparisons again, on each extra held-out set."""
    ref_name = "p2d-nll/heads" if "p2d-nll/heads" in g else "p2d/heads"
    out = []
    for name in names:
        m = on_metric(g, name)
        pairs = [(ref_name, "random/heads"), (ref_name, "embedding/heads"), (ref_name, "all/full"),
                 ("p2d-nll/full", "random/full"), (ref_name, "p2d-nll/random-heads"), (ref_name, "p2d-nll/lc-heads")]
        out += [f"On `{name}`: " + " ".join(compare(m[a], m[b], a, b) for a, b in pairs if a in m and b in m)]
    return out


def findings(g: dict, base_nll: float) -> list[str]:
    """The issue's questions, answered from whichever cells have run."""
    p2d_sels = [sel for sel in ("p2d", "p2d-nll") if f"{sel}/heads" in g]
    q1 = [compare(g[f"{sel}/heads"], g[f"{sel}/{other}"], f"ALPS heads on {sel} data", f"{what} heads")
          for sel in p2d_sels for other, what in (("random-heads", "random"), ("lc-heads", "layer-uniform"))
          if f"{sel}/{other}" in g] or ["not run."]
    q2 = [compare(g[f"{sel}/{a}"], g[f"{other}/{a}"], f"{sel} data × {a}", f"{other} data × {a}")
          for sel in ("p2d", "p2d-nll") for other in ("random", "embedding") for a in ADAPTATIONS
          if f"{sel}/{a}" in g and f"{other}/{a}" in g] or ["not run."]
    q3 = [compare(g[f"{sel}/transfer-heads"], g[f"{sel}/heads"], f"heads found on another dataset ({sel} data)",
                  "heads found on this domain's training data") for sel in p2d_sels if f"{sel}/transfer-heads" in g]
    # P2D as users get it: the default mining (nll) when it has run, else the paper's (none)
    ref_name = "p2d-nll/heads" if "p2d-nll/heads" in g else "p2d/heads"
    ref = g.get(ref_name)
    q4 = [compare(ref, g.get("all/full"), f"P2D ({ref_name})", "full-data full-parameter training (all/full)")]
    losses = []
    if ref is not None:
        for v in sorted(g.values(), key=lambda v: v["nll"]):
            if v["cell"] != ref_name and v["nll"] < ref["nll"] - max(v["nll_std"], ref["nll_std"]):
                losses.append(f"`{v['cell']}` reaches {v['nll']:.4f} vs {ref['nll']:.4f} for {ref_name} "
                              f"({v['trainable_params'] / ref['trainable_params']:.1f}× the trainable parameters, "
                              f"{v['cost_s'] / ref['cost_s']:.1f}× the cost).")
        worse = [v["cell"] for v in g.values() if v["nll"] > base_nll]
        if worse:
            losses.append(f"Cells that end above the base NLL {base_nll:.4f} (training hurt): "
                          + ", ".join(f"`{c}`" for c in worse) + ".")
    return [
        "**(1) Do ALPS-chosen heads train better than random or layer-uniform heads of the same count?** "
        + " ".join(q1),
        "**(2) Does P2D selection beat random (or embedding) selection at the same size?** " + " ".join(q2),
        "**(3) Do heads found on one dataset transfer to another of the same domain?** "
        + (" ".join(q3) if q3 else "not run."),
        "**(4) P2D against full-data, full-parameter training (the NLL target).** " + " ".join(q4),
        f"**(5) Where P2D ({ref_name}) loses.** " + (" ".join(losses) if losses else
                                                    "No cell run beats it by more than the seed noise."),
    ] + (["**(6) The same comparisons on the other held-out sets.** " + " ".join(extra)]
         if (extra := other_metrics(g, sorted({k for v in g.values() for k in v["extra"]}))) else [])


def markdown(res: dict, g: dict, ref: dict | None) -> str:
    s = res["settings"]
    metric = EVAL[s["domain"]][2]
    base = res["base"]
    rows = []
    for v in sorted(g.values(), key=lambda v: (list(SELECTORS).index(v["selection"]),
                                               list(ADAPTATIONS).index(v["adaptation"]))):
        row = {"selection": v["selection"], "adaptation": v["adaptation"], "seeds": v["seeds"],
               "NLL": f"{v['nll']:.4f}" + (f" ± {v['nll_std']:.4f}" if v["seeds"] > 1 else ""),
               "Δ vs base": f"{v['nll'] - base['nll']:+.4f}", "trainable": f"{v['trainable_params']:,}",
               "train s": f"{v['train_s']:.0f}", "tokens": f"{v['tokens']:,}", "tok/s": f"{v['tokens_per_s']:.0f}",
               "cost s": f"{v['cost_s']:.0f}", "AER": f"{v['aer']:.3f}" if "aer" in v else "–"}
        if metric in v:
            row[metric] = f"{v[metric]:.3f}"
        for name, (mean, std) in v["extra"].items():
            row[f"NLL {name}"] = f"{mean:.4f}" + (f" ± {std:.4f}" if v["seeds"] > 1 else "")
        rows.append(row)
    extra_cols = [f"NLL {name}" for name in base.get("extra", {})]
    cols = ["selection", "adaptation", "seeds", "NLL", "Δ vs base", *extra_cols] + \
        ([metric] if metric in base else []) + ["trainable", "train s", "tokens", "tok/s", "cost s", "AER"]
    sel_rows = [{"selection": k, "samples": len(v["ids"]), **{lab: f"{v['labels'].get(lab, 0) / len(v['ids']):.0%}"
                                                               for lab in res["pool"]["labels"]},
                 "tokens": f"{v['tokens']:,}", "mining s": f"{v['seconds']:.0f}"}
                for k, v in sorted(res["selections"].items())]
    alps_note = (f"{res['alps_seconds']:.0f} s of proxy + ALPS scoring (from the run that wrote heads.json) are "
                 "added to cells that use ALPS heads or P2D data" if res["alps_seconds"] is not None else
                 "the proxy + ALPS scoring time was not recorded beside heads.json and is not included")
    pool = ", ".join(f"{n} {lab}" for lab, n in res["pool"]["labels"].items())
    task = (f", {metric} on the first {s['task_limit']}" if s["task_limit"] else
            " (task metric skipped: --task-limit 0)")
    lines = [
        f"SmolLM2-135M (fp32), domain `{s['domain']}`. Pool: {pool} ({res['pool']['n']} rows, "
        f"benchmarks/pools.py); target: {res['target_n']} held-out {s['domain']} rows. Each selection keeps "
        f"{s['data_frac']:.0%} of the pool. All cells: {s['epochs']} epochs, AdamW (wd 0.1), cosine schedule with "
        f"10% warmup, batch {s['batch_size']}, max length {s['max_length']}; lr {s['lr_heads']:g} for heads-type "
        f"scopes and LoRA (rank {s['lora_rank']}), {s['lr_full']:g} for full / alps / no-attn. "
        f"{res['n_heads']} heads (ALPS: `{s['heads']}`"
        + (f"; transfer-heads: `{res['transfer_heads']}`" if res.get("transfer_heads") else "")
        + "). Eval: response NLL (nats/token) on the first "
        f"{s['eval_limit']} rows of `{EVAL[s['domain']][0]}`{task}.",
        "",
        f"**Base model (no training): NLL {base['nll']:.4f}**"
        + (f", {metric} {base[metric]:.3f}" if metric in base else "") + f" ({base['nll_tokens']:,} response tokens)"
        + "".join(f"; NLL {k} {v:.4f}" for k, v in base.get("extra", {}).items()) + "."
        + (" Extra held-out sets: `humaneval-fn` scores the same HumanEval problems with the whole function "
           "(signature, docstring, body) as the response, the form CodeAlpaca answers take, where the main NLL "
           f"scores the indented body alone; `codealpaca` is {s['eval_limit']} CodeAlpaca rows in neither the pool nor the target."
           if base.get("extra") else ""),
        "",
        table(rows, cols),
        "",
        f"Cost = mining + training seconds; {alps_note}. T_ref (full-data, full-parameter training): "
        + (f"{ref['seconds']:.0f} s, {ref['method']}." if ref else "no full-scope cell has run yet, so no AER."),
        "",
        *(["The cells accumulated over these invocations (the command above re-rendered them):", "",
            *[f"- `{c}`" for c in res["commands"]], ""] if res.get("commands") else []),
        "Selections (label shares of the selected rows):",
        "",
        table(sel_rows, ["selection", "samples", *res["pool"]["labels"], "tokens", "mining s"]),
        "",
        *[line + "\n" for line in findings(g, base["nll"])],
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--heads", type=Path, help="heads.json from `p2d localize` (head_scores.npy beside it)")
    ap.add_argument("--domain", choices=sorted(EVAL), default="code")
    ap.add_argument("--data-root", type=Path, help="shared/data directory (default: found by benchmarks/pools.py)")
    ap.add_argument("--cells", nargs="+", default=DEFAULT_CELLS, help="SELECTION/ADAPTATION ...")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--seeded-cells", nargs="+", default=SEEDED_CELLS, help="cells run with every --seeds")
    ap.add_argument("--data-frac", type=float, default=0.1)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--lr-heads", type=float, default=1e-3, help="heads, random-heads, lc-heads, lora")
    ap.add_argument("--lr-full", type=float, default=5e-5, help="full, alps, no-attn")
    ap.add_argument("--lora-rank", type=int, default=128)
    ap.add_argument("--transfer-heads", type=Path, help="heads.json found on another dataset, for transfer-heads")
    ap.add_argument("--eval-limit", type=int, default=164, help="eval rows for NLL (164 = all of HumanEval)")
    ap.add_argument("--task-limit", type=int, default=0, help="problems for pass@1 / EM (0 = skip; slow on CPU)")
    ap.add_argument("--results", type=Path, help="accumulated cells (default: docs/results/<section>_raw.json)")
    ap.add_argument("--estimate-only", action="store_true", help="print the runtime estimate and stop")
    ap.add_argument("--quick", action="store_true", help="tiny pool, 1 epoch, 4 cells, seed 0; nothing in docs/")
    args = ap.parse_args()
    pool_sizes = dict(QUICK_POOL) if args.quick else {}
    if args.quick:
        args.epochs, args.max_length, args.eval_limit, args.data_frac, args.seeds = 1, 128, 4, 0.25, [0]
        args.cells = QUICK_CELLS if args.cells == DEFAULT_CELLS else args.cells
        args.results = args.results or Path(tempfile.mkdtemp(prefix="p2d-bench-quality-")) / "quality_grid_raw.json"
    # one docs section (and raw file) per domain: quality_grid (code), quality_grid_math
    section = "quality_grid" if args.domain == "code" else f"quality_grid_{args.domain}"
    args.results = args.results or DOCS / "results" / f"{section}_raw.json"
    if not (args.heads or args.quick):
        ap.error("--heads is required (or --quick)")
    data_root = args.data_root or default_data_root()
    cells = parse_cells(args.cells, args.seeds, args.seeded_cells)

    model, tok = load_model(MODEL)
    geom = AttentionGeometry.from_config(model.config)
    heads_path = args.heads or quick_heads(geom, args.results.parent)
    if any(c.adaptation == "transfer-heads" for c in cells) and not args.transfer_heads:
        ap.error("transfer-heads cells need --transfer-heads")
    lists = head_lists(heads_path, geom, sorted({c.seed for c in cells}), args.transfer_heads)
    s = Settings(args.domain, str(heads_path), args.data_frac, args.epochs, args.batch_size, args.max_length,
                 args.lr_heads, args.lr_full, args.lora_rank, args.eval_limit, args.task_limit, pool_sizes)
    # trainer checkpoints of unfinished cells: outside docs/, tied to this results file
    tag = hashlib.sha1(str(args.results.resolve()).encode()).hexdigest()[:8]
    work = Path(tempfile.gettempdir()) / f"p2d-quality-grid-{tag}"
    if not args.results.is_file():
        shutil.rmtree(work, ignore_errors=True)
    res = read_json(args.results) if args.results.is_file() else {"settings": asdict(s), "cells": {}, "selections": {}}
    if args.transfer_heads:
        known = res.setdefault("transfer_heads", str(args.transfer_heads))
        if known != str(args.transfer_heads) and any("/transfer-heads/" in k for k in res["cells"]):
            raise P2DError(f"{args.results} holds transfer-heads cells made with {known}, not {args.transfer_heads}")
        res["transfer_heads"] = str(args.transfer_heads)
    if res["settings"] != asdict(s):
        diff = sorted(k for k in asdict(s) if res["settings"].get(k) != asdict(s)[k])
        raise P2DError(f"{args.results} holds cells made with other settings ({', '.join(diff)}); "
                       "use the same options or another --results")

    pool_rows, target_rows = domain_pool(args.domain, data_root, **pool_sizes)
    pool = to_examples(pool_rows, "mixed-pool")
    target = to_examples(target_rows, f"{args.domain}-target")
    label = {r["id"]: r["label"] for r in pool_rows}
    position = {e.id: i for i, e in enumerate(pool)}
    pool_tokens = [len(t) for t in tokenize(pool, tok, args.max_length)]
    res |= {"model": MODEL, "n_heads": len(lists["alps"]), "alps_seconds": alps_seconds(heads_path),
            "target_n": len(target),
            "pool": {"n": len(pool), "labels": {k: n for k in LABELS if (n := sum(label[e.id] == k for e in pool))},
                     "train_tokens": sum(pool_tokens)}}
    extra = extra_eval_sets(args.domain, data_root, {r["id"] for r in pool_rows + target_rows}, args.eval_limit,
                            tok)
    if "base" not in res or set(res["base"].get("extra", {})) != set(extra):
        res["base"] = eval_model(model, tok, s, data_root, extra)
        write_json(args.results, res)
    print(f"base model NLL {res['base']['nll']:.4f} ({res['base']['seconds']:.0f} s to evaluate)")

    todo = [c for c in cells if c.key not in res["cells"]]
    if todo and command() not in res.setdefault("commands", []):
        res["commands"].append(command())  # cells accumulate over several invocations: say which made them
    est = estimate(todo, res, pool_tokens, s)
    print(f"{len(cells) - len(todo)} of {len(cells)} cells already in {args.results}; estimated time for the rest:")
    for k, v in est.items():
        print(f"  {k:32s} {v / 60:6.1f} min")
    print(f"  {'total':32s} {sum(est.values()) / 60:6.1f} min")
    if args.estimate_only:
        return

    for key in sorted({c.selection_key for c in todo} - set(res["selections"])):
        print(f"mining selection {key}")
        sel = mine_selection(key, model, tok, pool, target, lists["alps"], args.data_frac)
        sel["index"] = sorted(position[i] for i in sel["ids"])
        sel["labels"] = dict(Counter(label[i] for i in sel["ids"]))
        sel["tokens"] = sum(pool_tokens[i] for i in sel["index"])
        res["selections"][key] = sel
        write_json(args.results, res)
    del model

    for n, cell in enumerate(todo, 1):
        print(f"[{n}/{len(todo)}] {cell.key}")
        sel = res["selections"][cell.selection_key]
        res["cells"][cell.key] = run_cell(cell, s, [pool[i] for i in sel["index"]], cell_heads(cell, lists), work,
                                          data_root, extra)
        print(f"  NLL {res['cells'][cell.key]['eval']['nll']:.4f}, {res['cells'][cell.key]['train_seconds']:.0f} s")
        write_json(args.results, res)
    shutil.rmtree(work, ignore_errors=True)

    g = groups(res)
    ref = reference(res, g)
    add_aer(res, g, ref)
    md = markdown(res, g, ref)
    print(md)
    summary = {**res, "groups": g, "reference": ref}
    if args.quick:
        write_json(args.results.with_name("quality_grid.json"), summary)
        write_text(args.results.with_name("quality_grid.md"), md)
        print(f"\nwritten to {args.results.parent} (not published)")
    else:
        publish(section, f"Quality, {args.domain}: selection × adaptation (SmolLM2-135M, CPU)", md, summary)


if __name__ == "__main__":
    main()
