"""GPU figures in one prepared script: ALPS scoring, mining against the bf16 roofline, head-sparse training.

Built for one short session on a lent GPU machine, so everything it needs is made here: random-init
models of real shapes (Llama-3.2-1B, Llama-3.1-8B q/k/v; no downloads) and random token batches. It
needs torch and transformers only (plus deepspeed for the ZeRO rows, which say "not run" without it).
Every timing has a warm-up and CUDA synchronisation. What it measures, against the targets:

- `alps`: p2d.alps.score_heads over every head of an 8B-shaped pair (float64; weights already in
  memory). Target: < 5 s on one H100/H200.
- `mining`: p2d.features.extract_features tokens/s on a 1B-shaped model in bf16, with the early stop
  (heads in the first third of the layers) and without (heads reaching the last layer), as a
  fraction of the GPU's dense bf16 peak. Target: >= 50% of the roofline.
- `training`: one optimizer step (p2d's own trainer step, bf16 autocast, fp32 trainable weights) in
  heads and full scope on the 1B shape; AdamW state bytes; frozen weights bit-identical after the
  steps. Targets: heads step <= 0.5x full, optimizer state <= 15% of full.
- `deepspeed`: the heads-scope step under ZeRO-2 and ZeRO-3 on one GPU.

    python benchmarks/gpu_suite.py                         # on the GPU machine: publishes docs/ and the JSON
    python benchmarks/gpu_suite.py --device cpu --tiny     # the same code on tiny shapes, nothing in docs/
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _report import emit, table  # noqa: E402
from alps_speed import MemoryReader, perturbed, random_weights  # noqa: E402

from p2d.alps import score_heads  # noqa: E402
from p2d.features import extract_features  # noqa: E402
from p2d.geometry import AttentionGeometry  # noqa: E402
from p2d.masking import apply_scope  # noqa: E402
from p2d.selection import select_heads  # noqa: E402
from p2d.tokens import IGNORE, Tokenized, collate  # noqa: E402
from p2d.trainer import TrainConfig, _Run, deepspeed_config  # noqa: E402

# Llama shapes (hidden, intermediate, layers, heads, kv heads, head_dim, vocab); tiny ones for the CPU check
SHAPES = {"Llama-3.2-1B": (2048, 8192, 16, 32, 8, 64, 128256), "Llama-3.1-8B": (4096, 14336, 32, 32, 8, 128, 128256)}
TINY = {"Llama-3.2-1B": (64, 128, 6, 8, 2, 8, 512), "Llama-3.1-8B": (64, 128, 4, 8, 2, 8, 512)}
# dense bf16 peak FLOP/s (no sparsity), by a substring of torch.cuda.get_device_name
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}
TARGETS = {"alps_s": 5.0, "mining_roofline": 0.5, "heads_step_ratio": 0.5, "optimizer_state_ratio": 0.15}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> list[float]:
    """Seconds of `repeats` calls of fn after one untimed warm-up, each bracketed by a device sync."""
    fn()
    out = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def llama(shape: tuple, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    h, inter, layers, heads, kv, hd, vocab = shape
    cfg = LlamaConfig(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, head_dim=hd, vocab_size=vocab, max_position_embeddings=8192,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model.eval()


def forward_flops_per_token(geom: AttentionGeometry, shape: tuple, layers: int, seq: int) -> float:
    """Matmul FLOPs per token of `layers` decoder layers (2 per MAC), causal attention at length `seq`."""
    h, inter, _, heads, kv, hd, _ = shape
    proj = h * heads * hd * 2 + h * kv * hd * 2 + 3 * h * inter  # q, o; k, v; gate, up, down
    attn = 2 * heads * hd * seq / 2  # QK^T and PV, half the positions on average under the causal mask
    return 2.0 * layers * (proj + attn)


def random_batch(n: int, seq: int, vocab: int, seed: int = 0) -> list[Tokenized]:
    """n samples of `seq` random tokens; the second half is the labelled response."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, vocab, (seq,), generator=g).tolist()
        out.append(Tokenized(f"s{i}", ids, [IGNORE] * (seq // 2) + ids[seq // 2:]))
    return out


def bench_alps(shape_name: str, shapes: dict, device: torch.device, repeats: int) -> dict:
    h, _, layers, heads, kv, hd, _ = shapes[shape_name]
    geom = AttentionGeometry("llama", layers, heads, kv, hd, h)
    base = random_weights(geom)
    task = perturbed(base)
    times = timed(lambda: score_heads(MemoryReader(geom, base), MemoryReader(geom, task), device=device),
                  device, repeats)
    return {"model": shape_name, "heads": geom.total_heads, "seconds": statistics.median(times), "times": times}


def bench_mining(model, shape: tuple, device: torch.device, n: int, seq: int, peak: float | None) -> list[dict]:
    geom = AttentionGeometry.from_config(model.config)
    data = random_batch(n, seq, model.config.vocab_size)
    shallow = max(1, geom.num_layers // 3)
    sets = {"early stop (layers < 1/3)": [(l, h) for l in range(shallow) for h in range(0, geom.num_heads, 3)],
            "full depth": [(geom.num_layers - 1, 0), (0, 1)]}
    rows = []
    for name, heads in sets.items():
        depth = max(l for l, _ in heads) + 1
        times = timed(lambda: extract_features(model, data, heads=heads, batch_size=n, max_tokens=n * seq,
                                               progress=False), device, 2)
        sec = min(times)
        tok_s = n * seq / sec
        flops = forward_flops_per_token(geom, shape, depth, seq) * tok_s
        rows.append({"heads": name, "layers run": depth, "tokens_per_s": tok_s, "tflops": flops / 1e12,
                     "roofline": flops / peak if peak else None})
    return rows


def bench_training(shape: tuple, device: torch.device, dtype: torch.dtype, batch: int, seq: int, steps: int,
                   stage: int | None = None, scopes: tuple[str, ...] = ("heads", "full")) -> dict:
    """Per scope: median step seconds, AdamW state bytes, and (heads) whether every frozen weight kept its bits."""
    out = {}
    for scope in scopes:
        model = llama(shape, device, dtype)
        geom = AttentionGeometry.from_config(model.config)
        heads = select_heads(torch.zeros(geom.num_layers, geom.num_heads).numpy(), 0.1, "random", seed=0)
        frozen = {n: p.detach().clone() for n, p in model.named_parameters()} if scope == "heads" else None
        info = apply_scope(model, geom, scope, heads)
        cfg = TrainConfig(lr=1e-3, batch_size=batch, dtype=dtype, max_steps=steps + 1)
        if stage is not None:
            cfg.deepspeed = deepspeed_config(stage, cfg)
        run = _Run(model, cfg, steps + 1)
        data = collate(random_batch(batch, seq, model.config.vocab_size), 0)
        n_tokens = float((data["labels"][:, 1:] != IGNORE).sum())
        times = timed(lambda: run.step([data], n_tokens), device, steps)
        row = {"scope": scope, "zero": stage, "trainable_params": info.trainable_params,
               "total_params": info.total_params, "step_s": statistics.median(times), "times": times}
        if stage is None:
            row["optimizer_state_bytes"] = sum(t.numel() * t.element_size() for st in run.optimizer.state.values()
                                               for k, t in st.items() if k in ("exp_avg", "exp_avg_sq"))
        if device.type == "cuda":
            row["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.reset_peak_memory_stats(device)
        if frozen is not None:
            now = {n.replace(".base.", "."): p for n, p in model.named_parameters() if not n.endswith(".delta")}
            changed = [n for n, p in now.items() if n in frozen and not torch.equal(p.detach().to(frozen[n].device,
                                                                                                   frozen[n].dtype),
                                                                                    frozen[n])]
            row["frozen_checked"] = sum(n in frozen for n in now)
            row["frozen_bit_identical"] = not changed
            row["frozen_changed"] = changed[:5]
        out[scope] = row
        del model, run
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def bench_deepspeed(shape: tuple, device: torch.device, dtype: torch.dtype, batch: int, seq: int, steps: int) -> dict:
    try:
        import deepspeed  # noqa: F401
    except Exception as e:  # a bare GPU image has no deepspeed: the rows say so instead of failing the suite
        return {"zero2": {"status": f"not run: deepspeed unavailable ({type(e).__name__})"},
                "zero3": {"status": f"not run: deepspeed unavailable ({type(e).__name__})"}}
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "29512"}.items():
        os.environ.setdefault(k, v)
    out = {}
    for stage in (2, 3):
        try:
            out[f"zero{stage}"] = bench_training(shape, device, dtype, batch, seq, steps, stage, ("heads",))["heads"]
        except Exception as e:  # reported, so that one failing stage does not cost the whole GPU session
            out[f"zero{stage}"] = {"status": f"failed: {type(e).__name__}: {e}"[:300]}
    return out


def verdict(value: float | None, target: float, below: bool) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "not measured"
    met = value <= target if below else value >= target
    return f"{'met' if met else 'missed'} ({value:.3g} vs {'<=' if below else '>='} {target:g})"


def markdown(r: dict) -> str:
    a, t = r["alps"], r["training"]
    lines = [f"Device: {r['device_name']}, torch {r['torch']} (CUDA {r['cuda']}), dtype {r['dtype']}"
             + (" — **tiny shapes, not a GPU figure**" if r["tiny"] else "") + ".", "",
             "| measurement | value | target |", "|---|---|---|",
             f"| ALPS, all {a['heads']} heads of {a['model']} | {a['seconds']:.2f} s | "
             f"{verdict(a['seconds'], TARGETS['alps_s'], True)} |"]
    for m in r["mining"]:
        lines.append(f"| mining, {m['heads']} ({m['layers run']} layers) | {m['tokens_per_s']:,.0f} tokens/s, "
                     f"{m['tflops']:.1f} TFLOP/s | roofline {verdict(m['roofline'], TARGETS['mining_roofline'], False)} |")
    lines += [f"| heads step / full step | {r['heads_step_ratio']:.2f} ({t['heads']['step_s'] * 1e3:.0f} vs "
              f"{t['full']['step_s'] * 1e3:.0f} ms) | {verdict(r['heads_step_ratio'], TARGETS['heads_step_ratio'], True)} |",
              f"| optimizer state, heads / full | {r['optimizer_state_ratio']:.3f} | "
              f"{verdict(r['optimizer_state_ratio'], TARGETS['optimizer_state_ratio'], True)} |",
              f"| frozen weights after {len(t['heads']['times']) + 1} steps | "
              f"{'bit-identical' if t['heads']['frozen_bit_identical'] else 'CHANGED'} "
              f"({t['heads']['frozen_checked']} tensors) | bit-identical |"]
    for name, d in r["deepspeed"].items():
        lines.append(f"| heads step, {name} | " + (f"{d['step_s'] * 1e3:.0f} ms" if "step_s" in d else d["status"])
                     + " | reported |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (the CPU check); nothing in docs/")
    ap.add_argument("--out-dir", type=Path, help="where results go when not published (default: a temp dir)")
    args = ap.parse_args()
    device = torch.device(args.device)
    shapes = TINY if args.tiny else SHAPES
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None) if device.type == "cuda" else None
    batch, seq, steps = (2, 32, 2) if args.tiny else (8, 1024, 5)
    t0 = time.perf_counter()
    r = {"device_name": name, "torch": torch.__version__, "cuda": torch.version.cuda, "dtype": str(dtype),
         "tiny": args.tiny, "peak_bf16_flops": peak, "targets": TARGETS}
    print("alps ...", flush=True)
    r["alps"] = bench_alps("Llama-3.1-8B", shapes, device, 3)
    print("mining ...", flush=True)
    model = llama(shapes["Llama-3.2-1B"], device, dtype)
    r["mining"] = bench_mining(model, shapes["Llama-3.2-1B"], device, 4 * batch, seq, peak)
    del model
    print("training ...", flush=True)
    r["training"] = bench_training(shapes["Llama-3.2-1B"], device, dtype, batch, seq, steps)
    print("deepspeed ...", flush=True)
    r["deepspeed"] = bench_deepspeed(shapes["Llama-3.2-1B"], device, dtype, batch, seq, steps)
    t = r["training"]
    r["heads_step_ratio"] = t["heads"]["step_s"] / t["full"]["step_s"]
    r["optimizer_state_ratio"] = t["heads"]["optimizer_state_bytes"] / t["full"]["optimizer_state_bytes"]
    r["seconds"] = time.perf_counter() - t0
    publish = device.type == "cuda" and not args.tiny
    local = None if publish else (args.out_dir or Path(tempfile.mkdtemp(prefix="p2d-gpu-suite-")))
    if local:
        local.mkdir(parents=True, exist_ok=True)
    emit("gpu_suite", "GPU suite: ALPS, mining roofline, head-sparse training", markdown(r), r, local)


if __name__ == "__main__":
    main()
