"""A labelled mixed pool built from real public data, for benchmarks that need to know what was mined.

The pool mixes code (CodeAlpaca-2k), math (GSM8K train), general instructions (an Alpaca sample
and the Self-Instruct seeds) and corrupted code rows (a code instruction with another code row's
answer), so a selector's top rows can be checked against the truth: clean code is what a code
target should pull in, corrupted rows are what a quality signal should push out. The target is a
set of further CodeAlpaca rows that appear nowhere in the pool. Data files: see shared/data/SOURCES.md.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from p2d import P2DError
from p2d.data import load_records

LABELS = ("code", "math", "general", "corrupt")


def default_data_root() -> Path:
    """The first existing of $P2D_DATA_DIR, ./shared/data, ../shared/data (cwd, then the repo root)."""
    repo = Path(__file__).resolve().parents[1]
    candidates = [Path(p) for p in [os.environ.get("P2D_DATA_DIR")] if p]
    candidates += [base / rel for base in (Path.cwd(), repo) for rel in ("shared/data", "../shared/data")]
    for path in candidates:
        if path.is_dir():
            return path
    raise P2DError(f"no data directory found (tried {', '.join(map(str, candidates))}); set P2D_DATA_DIR")


def _row(id_: str, instruction: str, input_: str, output: str, label: str) -> dict:
    return {"id": id_, "instruction": instruction, "input": input_ or "", "output": output, "label": label}


def _usable(rows: list[dict]) -> list[dict]:
    """Rows p2d.data.to_examples keeps (non-empty instruction and output), so pool and examples align."""
    return [r for r in rows if r["instruction"].strip() and r["output"].strip()]


def _sources(root: Path) -> dict[str, list[dict]]:
    code = [_row(f"code-{i}", r["instruction"], r.get("input", ""), r["output"], "code")
            for i, r in enumerate(load_records(str(root / "code/code_alpaca_2k.json")))]
    math = [_row(f"math-{i}", r["question"], "", r["answer"], "math")
            for i, r in enumerate(load_records(str(root / "math/gsm8k_train.jsonl")))]
    general = [_row(f"general-alpaca-{i}", r["instruction"], r.get("input", ""), r["output"], "general")
               for i, r in enumerate(load_records(str(root / "general/llamafactory_alpaca_en_demo.json")))]
    general += [_row(f"general-seed-{r['id']}", r["instruction"], r["instances"][0].get("input", ""),
                     r["instances"][0]["output"], "general")
                for r in load_records(str(root / "general/self_instruct_seed_tasks.jsonl"))]
    return {"code": _usable(code), "math": _usable(math), "general": _usable(general)}


def _take(rows: list[dict], n: int, what: str) -> None:
    if n > len(rows):
        raise P2DError(f"the mixed pool needs {n} {what} rows but only {len(rows)} are available")


def build_mixed_pool(data_root: str | os.PathLike | None = None, n_code: int = 400, n_math: int = 400,
                     n_general: int = 300, n_corrupt: int = 100, n_target: int = 64,
                     seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(pool_rows, target_rows), each row {"id", "instruction", "input", "output", "label"}; seeded.

    The code rows are drawn without overlap in the order target, clean code, corrupted: the
    target therefore does not change with the pool's size. Corrupted rows are code rows with
    pairwise different outputs, each given the next one's output (a cyclic shift, so no row keeps
    its own answer). The pool is shuffled so that no label sits in one block.
    """
    if n_corrupt == 1:
        raise P2DError("corruption swaps outputs between rows: n_corrupt must be 0 or at least 2")
    src = _sources(Path(data_root) if data_root is not None else default_data_root())
    rng = np.random.default_rng(seed)
    code = [src["code"][i] for i in rng.permutation(len(src["code"]))]
    _take(code, n_target + n_code + n_corrupt, "CodeAlpaca (target + code + corrupt)")
    _take(src["math"], n_math, "GSM8K")
    _take(src["general"], n_general, "general")
    target, clean, rest = code[:n_target], code[n_target: n_target + n_code], code[n_target + n_code:]

    donors: list[dict] = []
    seen: set[str] = set()
    for r in rest:
        if len(donors) == n_corrupt:
            break
        if r["output"] not in seen:
            seen.add(r["output"])
            donors.append(r)
    _take(donors, n_corrupt, "CodeAlpaca rows with distinct outputs for corruption")
    corrupt = [_row(f"corrupt-{r['id']}", r["instruction"], r["input"], donors[(j + 1) % len(donors)]["output"],
                    "corrupt") for j, r in enumerate(donors)]

    math = [src["math"][i] for i in rng.choice(len(src["math"]), n_math, replace=False)]
    general = [src["general"][i] for i in rng.choice(len(src["general"]), n_general, replace=False)]
    pool = clean + math + general + corrupt
    return [pool[i] for i in rng.permutation(len(pool))], target


def domain_pool(domain: str, data_root: str | os.PathLike | None = None,
                **sizes: int) -> tuple[list[dict], list[dict]]:
    """(pool rows, target rows) for a `code` or `math` target: the mixed pool, and target rows not in it.

    The code target is build_mixed_pool's held-out CodeAlpaca rows; the math target is as many
    further GSM8K train rows (pools name GSM8K train row i "math-i"), seeded.
    """
    root = Path(data_root) if data_root is not None else default_data_root()
    pool, code_target = build_mixed_pool(root, **sizes)
    if domain == "code":
        return pool, code_target
    if domain != "math":
        raise P2DError(f"no held-out target for domain {domain!r}: use code or math")
    in_pool = {r["id"] for r in pool}
    rows = load_records(str(root / "math/gsm8k_train.jsonl"))
    free = [i for i in range(len(rows)) if f"math-{i}" not in in_pool]
    pick = np.random.default_rng(0).choice(free, len(code_target), replace=False)
    return pool, [_row(f"math-{i}", rows[i]["question"], "", rows[i]["answer"], "math") for i in sorted(pick)]


def held_out_code(data_root: str | os.PathLike | None, used_ids: set[str], n: int = 64, seed: int = 1) -> list[dict]:
    """`n` CodeAlpaca rows that are neither in the pool (clean or as a corrupted row) nor in the target, seeded.

    An in-domain held-out set: the target-like distribution, without rows the miner saw.
    """
    code = _sources(Path(data_root) if data_root is not None else default_data_root())["code"]
    used = {i.removeprefix("corrupt-") for i in used_ids}
    free = [r for r in code if r["id"] not in used]
    _take(free, n, "held-out CodeAlpaca")
    return [free[i] for i in sorted(np.random.default_rng(seed).choice(len(free), n, replace=False))]
