"""Training speed and memory per scope on SmolLM2-135M (fp32, CPU figures), and what delta tensors buy.

Each variant runs in its own process, so peak RSS (getrusage) is that variant's alone and DeepSpeed's
process-global state never leaks between runs. Steps go through the trainer's own step (p2d.trainer's
backend object), so the numbers are those of `p2d train`: batch 4 × 256 tokens of real code text,
1 warm-up step, then the median of 5.

The `hook` variant is the alternative p2d rejects: all q/k/v weights trainable, gradient hooks
zeroing the rows of unselected heads, AdamW with weight decay 0.1. It costs the full q/k/v optimizer
state, and weight decay still moves the rows whose gradient is zero; the benchmark measures both.
Targets (reported, not asserted): heads-scope step ≤ 0.7× the full-scope step, optimizer state ≤ 15% of full.

    python benchmarks/train_speed.py [--heads RUN/localize/heads.json]
    python benchmarks/train_speed.py --quick   # tiny random Llama, 2 timed steps, nothing in docs/
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _report import emit, table  # noqa: E402
from pools import default_data_root  # noqa: E402

from p2d.data import load_records  # noqa: E402
from p2d.geometry import AttentionGeometry, projection  # noqa: E402
from p2d.io import write_json  # noqa: E402
from p2d.masking import apply_scope  # noqa: E402
from p2d.selection import read_heads_json, select_heads  # noqa: E402
from p2d.tokens import IGNORE, Tokenized, collate  # noqa: E402
from p2d.trainer import TrainConfig, _Run, deepspeed_config  # noqa: E402

MODEL = "smollm2-135m"
BATCH, SEQ, LR = 4, 256, 1e-3
# variant -> (apply_scope scope, ZeRO stage or None)
VARIANTS = {"heads": ("heads", None), "alps": ("alps", None), "full": ("full", None), "lora": ("lora", None),
            "hook": ("qkv", None), "heads+zero2": ("heads", 2), "heads+zero3": ("heads", 3),
            "full+zero2": ("full", 2), "full+zero3": ("full", 3)}
QKV = ("q_proj", "k_proj", "v_proj")


def load(quick: bool):
    """(model, tokenizer or None): SmolLM2 in fp32, or a tiny random Llama for the smoke test."""
    if quick:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                            num_attention_heads=8, num_key_value_heads=2, head_dim=8,
                                            vocab_size=256)), None
    from p2d.models import load_model

    return load_model(MODEL, dtype=torch.float32, device="cpu")


def batch(tok, vocab: int, seq: int) -> dict[str, torch.Tensor]:
    """BATCH windows of `seq` tokens of CodeAlpaca answers (random tokens without a tokenizer); all labelled."""
    if tok is None:
        ids = torch.randint(0, vocab, (BATCH * seq,), generator=torch.Generator().manual_seed(0)).tolist()
    else:
        rows = load_records(str(default_data_root() / "code/code_alpaca_2k.json"))
        ids = tok("\n\n".join(r["output"] for r in rows[:200]))["input_ids"][: BATCH * seq]
    return collate([Tokenized(str(i), ids[i * seq:(i + 1) * seq], ids[i * seq:(i + 1) * seq]) for i in range(BATCH)], 0)


def heads_for(geom: AttentionGeometry, heads_path: str | None) -> list[tuple[int, int]]:
    """The heads of heads.json, or a seeded random 10% (spread over the layers like a real selection)."""
    if heads_path:
        return read_heads_json(heads_path, geom).heads
    return select_heads(np.zeros((geom.num_layers, geom.num_heads)), 0.1, "random", seed=0)


def hook_masks(model, geom: AttentionGeometry, heads: list[tuple[int, int]]) -> dict[tuple[int, str], torch.Tensor]:
    """Register hooks that zero the gradient of every q/k/v row outside the selected heads; returns the row masks."""
    masks = {}
    for layer in range(geom.num_layers):
        hs = [h for l, h in heads if l == layer]
        rows = {"q_proj": [geom.q_rows(h) for h in hs],
                "k_proj": [geom.kv_rows(g) for g in {geom.kv_group(h) for h in hs}]}
        rows["v_proj"] = rows["k_proj"]
        for name in QKV:
            w = projection(model, layer, name).weight
            keep = torch.zeros(w.shape[0], 1, dtype=w.dtype)
            for r in rows[name]:
                keep[r] = 1
            w.register_hook(lambda grad, keep=keep: grad * keep)
            masks[layer, name] = keep[:, 0].bool()
    return masks


def worker(variant: str, quick: bool, heads_path: str | None, steps: int) -> dict:
    """Time `steps` optimizer steps (after one warm-up) of one variant; sizes and frozen-weight drift."""
    scope, stage = VARIANTS[variant]
    model, tok = load(quick)
    geom = AttentionGeometry.from_config(model.config)
    heads = heads_for(geom, heads_path)
    data = batch(tok, model.config.vocab_size, 32 if quick else SEQ)
    drift = variant in ("heads", "hook")
    if drift:  # kept on disk, so that the copy does not count in this variant's peak RSS
        snapshot = Path(tempfile.mkdtemp()) / "qkv.pt"
        torch.save({f"{l}.{n}": projection(model, l, n).weight.detach() for l in range(geom.num_layers) for n in QKV},
                   snapshot)
    info = apply_scope(model, geom, scope, heads)
    masks = hook_masks(model, geom, heads) if variant == "hook" else None
    cfg = TrainConfig(lr=LR, batch_size=BATCH, dtype=torch.float32, max_steps=steps + 1)
    if stage is not None:
        cfg.deepspeed = deepspeed_config(stage, cfg)
    run = _Run(model, cfg, steps + 1)
    n_tokens = float((data["labels"][:, 1:] != IGNORE).sum())
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        run.step([data], n_tokens)
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times[1:])
    out = {"variant": variant, "scope": scope, "zero": stage, "n_heads": len(heads), "sec_per_step": sec,
           "step_times": times, "tokens_per_s": data["attention_mask"].sum().item() / sec,
           "trainable_params": info.trainable_params, "total_params": info.total_params,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if stage is None:
        out["optimizer_state_bytes"] = sum(t.numel() * t.element_size() for st in run.optimizer.state.values()
                                           for k, t in st.items() if k in ("exp_avg", "exp_avg_sq"))
    if drift:  # base q/k/v weights: max |Δ| outside the selected heads' rows (and inside them)
        before = {(int(k.split(".")[0]), k.split(".")[1]): w for k, w in torch.load(snapshot).items()}
        shutil.rmtree(snapshot.parent)
        after = {(l, n): base_weight(projection(model, l, n)) for l, n in before}
        sel = masks or {k: torch.zeros(len(w), dtype=torch.bool) for k, w in before.items()}
        def max_change(rows: bool) -> float:
            return torch.cat([(after[k] - before[k])[sel[k] == rows].flatten() for k in before]).abs().max().item()

        out["frozen_max_abs_delta"] = max_change(False)
        if masks:
            out["selected_max_abs_delta"] = max_change(True)
    return out


def base_weight(module) -> torch.Tensor:
    """The frozen weight of a projection, plain or wrapped in a HeadDeltaLinear."""
    return getattr(module, "base", module).weight.detach()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(variant: str, args: argparse.Namespace, out_dir: Path) -> dict:
    """Run one variant in a fresh process (single-rank gloo DeepSpeed for the ZeRO variants)."""
    path = out_dir / f"{variant}.json"
    cmd = [sys.executable, __file__, "--worker", variant, "--worker-out", str(path), "--steps", str(args.steps)]
    cmd += ["--quick"] if args.quick else []
    cmd += ["--heads", args.heads] if args.heads else []
    env = dict(os.environ)
    if VARIANTS[variant][1] is not None:
        env |= {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"variant {variant} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(path.read_text())


def markdown(r: dict[str, dict], meta: dict) -> str:
    full = r["full"]
    mb = 1 / 2**20
    rows = [{"variant": k, "sec/step": v["sec_per_step"], "tokens/s": f"{v['tokens_per_s']:.0f}",
             "trainable": f"{v['trainable_params']:,}",
             "× full step": f"{v['sec_per_step'] / full['sec_per_step']:.2f}",
             "AdamW state MB": f"{v['optimizer_state_bytes'] * mb:.1f}",
             "state / full": f"{v['optimizer_state_bytes'] / full['optimizer_state_bytes']:.1%}",
             "peak RSS MB": f"{v['peak_rss_mb']:.0f}"}
            for k, v in r.items() if v["zero"] is None]
    h = r["heads"]
    step_ratio = h["sec_per_step"] / full["sec_per_step"]
    state_ratio = h["optimizer_state_bytes"] / full["optimizer_state_bytes"]
    hook = r["hook"]
    zero = [{"scope": v["scope"], "ZeRO": v["zero"], "sec/step": v["sec_per_step"],
             "× single-process": f"{v['sec_per_step'] / r[v['scope']]['sec_per_step']:.2f}",
             "peak RSS MB": f"{v['peak_rss_mb']:.0f}"} for v in r.values() if v["zero"] is not None]
    return "\n".join([
        f"{meta['model']}, fp32, batch {BATCH} × {meta['seq']} tokens ({meta['data']}), AdamW lr {LR:g} wd 0.1; "
        f"{meta['n_heads']} heads ({meta['heads']}). Seconds per optimizer step: median of {meta['steps']} after "
        "1 warm-up, each variant in its own process (peak RSS is that process's).",
        "",
        table(rows, ["variant", "sec/step", "tokens/s", "trainable", "× full step", "AdamW state MB", "state / full",
                     "peak RSS MB"]),
        "",
        f"Targets: heads step = {step_ratio:.2f}× full (target ≤ 0.7: {'met' if step_ratio <= 0.7 else 'not met'}); "
        f"heads optimizer state = {state_ratio:.1%} of full "
        f"(target ≤ 15%: {'met' if state_ratio <= 0.15 else 'not met'}).",
        "",
        f"**Delta tensors vs gradient-hook masking.** The hook variant trains the same heads with all q/k/v "
        f"weights as parameters: {hook['trainable_params']:,} trainable, "
        f"{hook['optimizer_state_bytes'] * mb:.1f} MB of AdamW state "
        f"({hook['optimizer_state_bytes'] / h['optimizer_state_bytes']:.1f}× the delta version's "
        f"{h['optimizer_state_bytes'] * mb:.1f} MB), {hook['sec_per_step']:.3f} s/step vs {h['sec_per_step']:.3f}. "
        f"After {meta['steps'] + 1} steps, weight decay has moved the rows whose gradient the hooks zeroed by up to "
        f"{hook['frozen_max_abs_delta']:.2e} (selected rows: {hook['selected_max_abs_delta']:.2e}); with delta "
        f"tensors the largest change of any frozen weight is {h['frozen_max_abs_delta']:.1e}.",
        "",
        "DeepSpeed, one process (gloo), p2d's torch AdamW as a client optimizer:",
        "",
        table(zero, ["scope", "ZeRO", "sec/step", "× single-process", "peak RSS MB"]) if zero else "(not run)",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--heads", help="heads.json for the heads scopes (default: a seeded random 10%% of heads)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--steps", type=int, default=5, help="timed steps after the warm-up")
    ap.add_argument("--quick", action="store_true", help="tiny random Llama, 2 timed steps; nothing in docs/")
    ap.add_argument("--no-publish", action="store_true", help="write to --out-dir only, not docs/")
    ap.add_argument("--out-dir", type=Path, help="where results go without publishing (default: a temp dir)")
    ap.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        write_json(args.worker_out, worker(args.worker, args.quick, args.heads, args.steps))
        return
    if args.quick:
        args.steps = 2
    if not {"heads", "full", "hook"} <= set(args.variants):
        ap.error("--variants must include heads, full and hook (the report compares against them)")
    out_dir = args.out_dir or Path(tempfile.mkdtemp(prefix="p2d-bench-train-speed-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for v in args.variants:
        t0 = time.perf_counter()
        results[v] = spawn(v, args, out_dir)
        print(f"{v:12s} {results[v]['sec_per_step']:.3f} s/step  ({time.perf_counter() - t0:.0f} s)", flush=True)
    meta = {"model": "tiny random Llama" if args.quick else MODEL, "seq": 32 if args.quick else SEQ,
            "data": "random tokens" if args.quick else "CodeAlpaca answers", "steps": args.steps,
            "n_heads": results["heads"]["n_heads"], "heads": args.heads or "seeded random 10%",
            "threads": torch.get_num_threads()}
    md = markdown(results, meta)
    print(md)
    emit("train_speed", "Training speed and memory (CPU)", md, {**meta, "variants": results},
         out_dir if args.quick or args.no_publish else None)


if __name__ == "__main__":
    main()
