"""Mining extraction throughput on this CPU with SmolLM2: what the early stop and the quality signal cost.

Mining a large pool is one forward pass per sample, so its speed decides whether p2d mine is
practical on a laptop. This measures tokens/s on real text (the first rows of the mixed pool of
benchmarks/pools.py) for shallow heads with and without the early stop, for heads reaching the
last layer, for quality=nll, and for a plain full forward with the LM head on every position.
Each configuration gets one warm-up batch, then the best of two timed runs.

    python benchmarks/extract_speed.py
    python benchmarks/extract_speed.py --quick   # smoke test: 24 rows, max_length 64, nothing in docs/
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _report import emit, table  # noqa: E402
from pools import build_mixed_pool  # noqa: E402

from p2d.data import to_examples  # noqa: E402
from p2d.evaluate import response_nll  # noqa: E402
from p2d.features import extract_features  # noqa: E402
from p2d.geometry import AttentionGeometry  # noqa: E402
from p2d.models import load_model  # noqa: E402
from p2d.tokens import Tokenized, tokenize  # noqa: E402

MODEL = "smollm2-135m"
SHALLOW = 9  # deepest layer of the shallow head set


def configs(model, tok, geom: AttentionGeometry, batch_size: int) -> list[tuple[str, Callable[[list[Tokenized]], object]]]:
    """(name, run on a list of samples) for every measured configuration."""
    shallow = [(l, h) for l in range(SHALLOW + 1) for h in range(geom.num_heads)]
    every = [(l, h) for l in range(geom.num_layers) for h in range(geom.num_heads)]
    last = geom.num_layers - 1

    def heads(hs, **kw):
        return lambda data: extract_features(model, data, kind="heads", heads=hs, batch_size=batch_size,
                                             progress=False, **kw)

    return [
        (f"(a) {len(shallow)} heads in layers 0-{SHALLOW}, early stop", heads(shallow)),
        (f"(b) {len(shallow)} heads in layers 0-{SHALLOW}, no early stop", heads(shallow, early_stop=False)),
        (f"(c) all {len(every)} heads (layers 0-{last}): early stop saves nothing", heads(every)),
        ("(d) full forward with the LM head on every position (reference)",
         lambda data: response_nll(model, data, pad_id=tok.pad_token_id, batch_size=batch_size)),
        (f"(e) {len(shallow)} heads in layers 0-{SHALLOW}, quality=nll", heads(shallow, quality="nll")),
    ]


def best_seconds(run: Callable[[list[Tokenized]], object], data: list[Tokenized], batch_size: int,
                 repeats: int) -> float:
    """One warm-up batch, then the fastest of `repeats` full runs."""
    run(data[:batch_size])
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(data)
        times.append(time.perf_counter() - t0)
    return min(times)


def findings(rows: list[dict], threads: int) -> str:
    """Early-stop speed-up, the cost of nll, and the mining pass vs a full forward, per max_length."""
    parts = []
    for ml in sorted({r["max_length"] for r in rows}):
        by = {r["config"][:3]: r["tokens/s"] for r in rows if r["max_length"] == ml}
        parts.append(f"at max_length {ml}, the early stop makes the layers-0-{SHALLOW} pass {by['(a)'] / by['(b)']:.2f}x "
                     f"faster ({by['(a)']:.0f} vs {by['(b)']:.0f} tokens/s); quality=nll runs at "
                     f"{by['(e)'] / by['(a)']:.2f}x the early-stopped rate; all heads run at "
                     f"{by['(c)'] / by['(d)']:.2f}x the full forward with LM head ({by['(d)']:.0f} tokens/s)")
    return f"With torch.get_num_threads() = {threads}: " + "; ".join(parts) + "."


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=300, help="first rows of the mixed pool to run on")
    ap.add_argument("--max-lengths", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--data-root", help="shared/data directory (default: found by benchmarks/pools.py)")
    ap.add_argument("--quick", action="store_true", help="24 rows, max_length 64; no docs/")
    ap.add_argument("--no-publish", action="store_true", help="write to --out-dir only, not docs/")
    ap.add_argument("--out-dir", type=Path, help="where results go without publishing (default: a temp dir)")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.max_lengths = 24, [64]

    model, tok = load_model(MODEL, device="cpu")
    geom = AttentionGeometry.from_config(model.config)
    examples = to_examples(build_mixed_pool(args.data_root)[0][: args.rows], "mixed-pool")
    threads = torch.get_num_threads()
    rows = []
    for ml in args.max_lengths:
        data = tokenize(examples, tok, ml)
        tokens = sum(map(len, data))
        for name, run in configs(model, tok, geom, args.batch_size):
            seconds = best_seconds(run, data, args.batch_size, args.repeats)
            rows.append({"max_length": ml, "config": name, "rows": len(data), "tokens": tokens,
                         "seconds": round(seconds, 2), "tokens/s": round(tokens / seconds, 1),
                         "samples/s": round(len(data) / seconds, 2)})
            print(rows[-1], flush=True)
    text = findings(rows, threads)
    md = (f"SmolLM2-135M (fp32, CPU, torch.get_num_threads() = {threads}), the first {args.rows} rows of the mixed pool "
          f"(benchmarks/pools.py), batch size {args.batch_size}; tokens = non-pad tokens of the inputs; one warm-up "
          f"batch, best of {args.repeats} runs.\n\n"
          + table(rows, ["max_length", "config", "rows", "tokens", "seconds", "tokens/s", "samples/s"])
          + f"\n\n**What this shows.** {text}")
    results = {"model": MODEL, "threads": threads, "batch_size": args.batch_size, "repeats": args.repeats,
               "rows": rows, "findings": text}
    print(md)
    local = (args.out_dir or Path(tempfile.mkdtemp(prefix="p2d-bench-extract-"))) if args.quick or args.no_publish else None
    emit("extract_speed", "Mining extraction throughput (CPU)", md, results, local)


if __name__ == "__main__":
    main()
