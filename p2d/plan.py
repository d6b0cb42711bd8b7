"""`p2d plan`: each stage's FLOPs, seconds and peak memory, predicted from a config and a pool scan.

Nothing is loaded but the model's config (any size: an 8B or 70B config.json plans in seconds) and
the pool's token lengths. FLOPs come from p2d.flops and are exact for what p2d runs; seconds divide
them by a throughput: measured once on this machine (a random-init model of SmolLM2-135M's shape,
a few forward passes and full training steps, cached in $P2D_CACHE/calibration.json unless other
processes held the CPUs meanwhile), or a named
GPU's dense bf16 peak times an MFU the output states. After a `p2d run`, each stage's achieved rate
(its FLOPs over its seconds, overheads included) is kept per machine, model shape and stage variant
(`observe`), and later plans of that model here divide by the median of those instead: a short
calibration's level drifts with the shared machine, a stage's own history less so. What is not known before the run is assumed
and said: the subset's lengths are the target's (mining picks rows like the target; the pool's
when no target is given), and a selected head sits in layer 0 (ALPS often picks one there), so
heads training back-propagates through every layer.
"""

from __future__ import annotations

import math
import platform
import time
from dataclasses import asdict, dataclass

import numpy as np

from p2d import P2DError
from p2d.config import check_choices, option
from p2d.flops import Shape, Trainable, forward, train_step, trainable_for
from p2d.masking import HEAD_ALIASES, PIPELINE_SCOPES, scope_help
from p2d.models import COMPUTE_DTYPES
from p2d.tokens import PackedTokens, kept_span, length_batches

PEAK_BF16_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0, "l40s": 362.0}
# SmolLM2-135M's shape: the calibration model (random weights, nothing downloaded)
CALIBRATION_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, vocab_size=49152)
STAGES = ("proxy", "localize", "mine", "train", "reference")
CALIBRATION_VERSION = 4  # part of the cache key: a changed measurement is taken again
CALIBRATION_ROUNDS = 3
# a calibration during which other processes kept more than this share of the CPUs busy is not cached:
# it measured the machine's leftovers, and a cached rate would mis-plan every later run
CONTENDED_SHARE = 0.25
OBSERVED_RUNS = 5  # a stage's planned rate: the median of its last runs of this model on this machine
OBSERVED_STAGES = ("proxy", "mine", "train", "reference")
SPARSE_SCOPES = ("heads", *HEAD_ALIASES)  # trained at the head-sparse rate: per FLOP cheaper than full training


@dataclass
class PlanConfig:
    data_frac: float = option(0.1, "Fraction of the pool kept.")
    head_frac: float = option(0.1, "Fraction of heads trained.")
    scope: str = option("heads", scope_help(PIPELINE_SCOPES), choices=PIPELINE_SCOPES)
    kv_scope: str = "shared"
    epochs: int = option(2, "Epochs, for p2d's training and for the reference alike.")
    train_batch_size: int = 4
    train_max_length: int = option(256, "Training tokens per sample.", flag="--max-length")
    mine_max_length: int = 128
    mine_window: int | None = None  # response tokens mining reads (p2d mine --mining-window)
    mine_batch_size: int = 16
    # bf16 mining runs at the calibrated bf16 rate
    mine_dtype: str = option("auto", "Precision mining will compute in (as `p2d mine --mining-dtype`).",
                             choices=COMPUTE_DTYPES, flag="--mining-dtype")
    mine_max_tokens: int = 8192
    shortlist: int = 3  # p2d.mining.SHORTLIST: the response-only pass over shortlist x subset rows
    target_rows: int = 64
    proxy_samples: int = 64
    proxy_steps: int = 16
    proxy_batch_size: int = 4
    proxy_max_length: int = 256
    hardware: str = option("calibrate", "calibrate: measure this machine once (cached); or a GPU's bf16 peak times "
                                        "--mfu.", choices=("calibrate", *PEAK_BF16_TFLOPS))
    mfu: float = option(0.4, "Model FLOP utilisation assumed with a named GPU.")
    seed: int = 0

    def validate(self) -> None:
        """Options that make no plan, named as `p2d plan` spells them."""
        if not (0 < self.data_frac <= 1 and 0 < self.head_frac <= 1):
            raise P2DError(f"--data-frac and --head-frac must be in (0, 1], got {self.data_frac} and {self.head_frac}")
        if self.epochs <= 0 or self.train_max_length <= 0:
            raise P2DError(f"--epochs and --max-length must be positive, got {self.epochs} and {self.train_max_length}")
        if not 0 < self.mfu <= 1:
            raise P2DError(f"--mfu must be in (0, 1], got {self.mfu}")
        check_choices(self)


@dataclass
class Lengths:
    """Prompt and response token counts of every pool row."""

    prompt: np.ndarray
    response: np.ndarray
    method: str = "tokenized"

    @property
    def total(self) -> np.ndarray:
        return self.prompt + self.response


def _batches(lengths: np.ndarray, batch_size: int, max_tokens: int | None = None) -> list[tuple[int, int]]:
    """(rows, width) of the length-grouped micro-batches p2d forms."""
    return [(len(b), int(max(lengths[i] for i in b))) for b in length_batches(lengths.tolist(), batch_size, max_tokens)]


def _capped(lengths: Lengths, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """(total, labelled positions) per row after truncation to `cap` tokens, by the tokenizer's own rule."""
    spans = [kept_span(int(p), int(p + r), cap) for p, r in zip(lengths.prompt, lengths.response)]
    start = np.array([s for s, _ in spans], dtype=np.int64).reshape(-1)
    end = np.array([e for _, e in spans], dtype=np.int64).reshape(-1)
    return end - start, end - np.maximum(start, lengths.prompt)


def _train_flops(shape: Shape, lengths: Lengths, rows: np.ndarray, cap: int, batch_size: int, trainable: Trainable,
                 steps: int | None = None, epochs: int = 1) -> tuple[int, int]:
    """(FLOPs, largest micro-batch tokens) of training on `rows`: an epoch of length-grouped steps, or `steps` of them."""
    total, labelled = _capped(Lengths(lengths.prompt[rows], lengths.response[rows]), cap)
    groups = length_batches(total.tolist(), batch_size)
    flops = [train_step(shape, [(len(g), int(total[g].max()))], int(labelled[g].sum()), trainable)
             for g in groups]
    run = epochs * sum(flops) if steps is None else sum(flops[i % len(flops)] for i in range(steps))
    return run, max(len(g) * int(total[g].max()) for g in groups)


def _forward_flops(shape: Shape, total: np.ndarray, labelled: np.ndarray, cfg: PlanConfig) -> int:
    groups = length_batches(total.tolist(), cfg.mine_batch_size, cfg.mine_max_tokens)
    return sum(forward(shape, [(len(g), int(total[g].max()))], int(labelled[g].sum()))
               for g in groups)


def assumed_heads(shape: Shape, head_frac: float) -> list[tuple[int, int]]:
    """ceil(r·n) heads, one in layer 0 (the costly case: backward through every layer), the rest spread."""
    n_heads = math.ceil(head_frac * shape.layers * shape.heads)
    if shape.layers == 1:
        return [(0, h) for h in range(n_heads)]
    return [(0, 0)] + [(1 + i % (shape.layers - 1), i // (shape.layers - 1) % shape.heads) for i in range(n_heads - 1)]


def stage_flops(shape: Shape, lengths: Lengths, cfg: PlanConfig, subset: np.ndarray | None = None,
                heads: list[tuple[int, int]] | None = None, proxy: Lengths | None = None,
                target: Lengths | None = None) -> dict[str, dict]:
    """FLOPs (and the largest micro-batch, for memory) of every stage of `p2d run`.

    Before a run, the subset and heads are assumed (see the module docstring); after it, pass the
    real ones and the count is exact for what ran. `target`: the mining target's lengths, when known.
    """
    n = len(lengths.prompt)
    rng = np.random.default_rng(cfg.seed)
    count = math.ceil(cfg.data_frac * n)
    heads = heads if heads is not None else assumed_heads(shape, cfg.head_frac)
    proxy = proxy or lengths  # the proxy's own data when known, else rows like the pool's
    proxy, proxy_tokens = _train_flops(shape, proxy, np.arange(min(cfg.proxy_samples, len(proxy.prompt))),
                                       cfg.proxy_max_length, cfg.proxy_batch_size, trainable_for("qkv", shape),
                                       steps=cfg.proxy_steps)
    # ALPS: W_o^h = Q_hᵀ·K_g·V_gᵀ per head, for the base and the task model
    localize = 2 * shape.layers * shape.heads * 2 * (2 * shape.hidden * shape.head_dim * shape.hidden)
    def read(ln: Lengths) -> tuple[np.ndarray, np.ndarray]:
        window = ln if cfg.mine_window is None else Lengths(ln.prompt, np.minimum(ln.response, cfg.mine_window))
        return _capped(window, cfg.mine_max_length)

    total, labelled = read(lengths)
    picked = rng.choice(n, size=min(cfg.target_rows, n), replace=False)  # drawn always: the later draws stay put
    target = target or Lengths(lengths.prompt[picked], lengths.response[picked])
    listed = rng.choice(n, size=min(cfg.shortlist * count, n), replace=False)
    # IFD's response-only pass: a start token and the labelled tokens mining read
    mine = (_forward_flops(shape, total, labelled, cfg) + _forward_flops(shape, *read(target), cfg)
            + _forward_flops(shape, labelled[listed] + 1, labelled[listed], cfg))
    if subset is None:  # count rows like the target's (the rows mining ranks first resemble it)
        like = rng.choice(len(target.prompt), size=count, replace=True)
        trained, subset = Lengths(target.prompt[like], target.response[like]), np.arange(count)
    else:
        trained = lengths
    train, train_tokens = _train_flops(shape, trained, subset, cfg.train_max_length, cfg.train_batch_size,
                                       trainable_for(cfg.scope, shape, heads, kv_scope=cfg.kv_scope),
                                       epochs=cfg.epochs)
    reference, ref_tokens = _train_flops(shape, lengths, np.arange(n), cfg.train_max_length, cfg.train_batch_size,
                                         trainable_for("full", shape), epochs=cfg.epochs)
    return {"proxy": {"flops": proxy, "kind": "train", "trainable": "qkv", "batch_tokens": proxy_tokens},
            "localize": {"flops": localize, "kind": "forward", "batch_tokens": 0},
            "mine": {"flops": mine, "kind": "forward", "batch_tokens": cfg.mine_max_tokens},
            "train": {"flops": train, "kind": "train", "trainable": cfg.scope, "batch_tokens": train_tokens,
                      "heads": len(heads)},
            "reference": {"flops": reference, "kind": "train", "trainable": "full", "batch_tokens": ref_tokens}}


def peak_memory(shape: Shape, stage: dict, cfg: PlanConfig, bytes_per: int, trainable_params: int) -> int:
    """Approximate peak bytes: weights, AdamW state and gradients of what trains, activations of one micro-batch.

    Activations per token and layer: ~16·hidden + 3·intermediate values kept for backward (none when
    only forward runs, where one layer's working set counts), plus the LM head's logits chunk.
    """
    weights = shape.params() * bytes_per
    per_token = (16 * shape.hidden + 3 * shape.intermediate) * bytes_per
    logits = 2048 * shape.vocab * 4
    if stage["kind"] == "forward":
        return weights + stage["batch_tokens"] * per_token + logits
    optimizer = trainable_params * (4 + 8 + (4 if bytes_per == 2 else 0))
    return weights + optimizer + stage["batch_tokens"] * per_token * shape.layers + logits


def trainable_params(shape: Shape, trainable: Trainable) -> int:
    n = sum(math.prod(shape.linear(name)) for layer in trainable.weights.values() for name in layer)
    for spec in trainable.extra.values():
        for name, (kind, rank) in spec.items():
            n_in, n_out = shape.linear(name)
            n += {"rows": rank * n_in, "cols": n_out * rank, "lora": rank * (n_in + n_out)}[kind]
    return n + shape.vocab * shape.hidden * (trainable.embeddings + trainable.lm_head)


def machine() -> str:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else (platform.processor() or platform.machine())
    cpu = _cpu_model()
    return f"{device if torch.cuda.is_available() else cpu}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def calibrate(force: bool = False) -> dict:
    """Achieved FLOP/s of forward passes (fp32, and bf16 where the hardware has it) and of training
    steps (all weights, and 10% of heads) on this machine, cached per machine.

    The four kinds are timed in interleaved rounds and each rate is a median over rounds, so a
    drift of the shared machine's speed during calibration moves every rate alike.
    """
    import copy

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from p2d.geometry import AttentionGeometry
    from p2d.io import read_json, write_json
    from p2d.loss import forward_token_nll
    from p2d.masking import apply_scope
    from p2d.models import cache_dir, default_device, native_bf16
    from p2d.tokens import IGNORE, Tokenized
    from p2d.trainer import TrainConfig, time_steps

    key = f"{machine()}; calibration {CALIBRATION_VERSION}"
    path = cache_dir() / "calibration.json"
    cached = read_json(path) if path.is_file() else {}
    if key in cached and not force:
        return cached[key]
    torch.manual_seed(0)
    config = LlamaConfig(**CALIBRATION_SHAPE, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).to(default_device()).eval()
    shape = Shape.from_config(config)
    gen = torch.Generator().manual_seed(0)

    def batch(rows: int, width: int, prompt: int):
        ids = torch.randint(3, config.vocab_size, (rows, width), generator=gen)
        labels = ids.clone()
        labels[:, :prompt] = IGNORE
        return ids, labels

    def sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    # the shapes p2d runs: mining batches of up to 8192 tokens over 128-token windows, training 4 x 256
    ids, labels = batch(32, 128, 64)
    enc = {"input_ids": ids.to(model.device), "attention_mask": torch.ones_like(ids).to(model.device),
           "labels": labels.to(model.device)}
    fwd_flops = forward(shape, [(32, 128)], int((labels[:, 1:] != IGNORE).sum()))
    forwards = {"forward": model} | ({"bf16_forward": copy.deepcopy(model).to(torch.bfloat16)}
                                     if native_bf16() else {})
    rows, width, prompt = 4, 256, 96
    ids, labels = batch(rows, width, prompt)
    data = [Tokenized(str(i), ids[i].tolist(), labels[i].tolist()) for i in range(rows)]
    n_labels = int((labels[:, 1:] != IGNORE).sum())
    heads = assumed_heads(shape, 0.1)  # the heads scope as the plan assumes it (10% of heads, one in layer 0)
    full_model, heads_model = (copy.deepcopy(model).train().requires_grad_(True) for _ in range(2))
    apply_scope(heads_model, AttentionGeometry.from_config(config), "heads", heads)
    trainers = {"train": (full_model, train_step(shape, [(rows, width)], n_labels, trainable_for("full", shape))),
                "head_train": (heads_model, train_step(shape, [(rows, width)], n_labels,
                                                       trainable_for("heads", shape, heads)))}
    times: dict[str, list[float]] = {}
    with torch.inference_mode():  # warm-up: the first pass of each kind allocates
        for m in forwards.values():
            forward_token_nll(m, enc)
    start = cpu_seconds(), time.perf_counter()
    for _ in range(CALIBRATION_ROUNDS):
        for name, m in forwards.items():
            with torch.inference_mode():
                t0 = time.perf_counter()
                forward_token_nll(m, enc)
                sync()
                times.setdefault(name, []).append(time.perf_counter() - t0)
        for name, (m, _) in trainers.items():  # each call's first step sets up the optimizer: not counted
            times.setdefault(name, []).extend(
                time_steps(m, data, 0, TrainConfig(batch_size=rows, lr=1e-5), [[list(range(rows))]] * 3)[1:])
    flops = {name: fwd_flops for name in forwards} | {name: step for name, (_, step) in trainers.items()}
    result = {f"{name}_flops_per_s": flops[name] / float(np.median(t)) for name, t in times.items()}
    others = others_share(start, (cpu_seconds(), time.perf_counter()))
    result["method"] = (f"measured on {key}: SmolLM2-135M-shaped model, forward 32x128 (fp32"
                        + (" and bf16" if "bf16_forward" in forwards else "") + "), training steps 4x256 "
                        f"(all weights, and 10% of heads), {CALIBRATION_ROUNDS} interleaved rounds, medians")
    result["others_cpu_share"] = round(others, 3)
    if others > CONTENDED_SHARE:
        result["method"] += (f"; other processes kept {others:.0%} of the CPUs busy meanwhile, so these rates are "
                             "low: not cached, measured again by the next plan")
    else:
        write_json(path, cached | {key: result})
    return result


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds all of the machine's CPUs have been busy, hypervisor steal included; CPU seconds of this process)."""
    import psutil

    t, own = psutil.cpu_times(), psutil.Process().cpu_times()
    busy = t.user + t.nice + t.system + sum(getattr(t, f, 0.0) for f in ("irq", "softirq", "steal"))
    return busy, own.user + own.system


def others_share(start: tuple[tuple[float, float], float], end: tuple[tuple[float, float], float]) -> float:
    """The share of the machine's CPU capacity that other processes used between two (cpu_seconds(), wall) readings."""
    import psutil

    ((busy0, own0), wall0), ((busy1, own1), wall1) = start, end
    return max(0.0, (busy1 - busy0) - (own1 - own0)) / max((wall1 - wall0) * (psutil.cpu_count() or 1), 1e-9)


def rates(cfg: PlanConfig) -> dict:
    if cfg.hardware == "calibrate":
        return calibrate()
    check_choices(cfg)
    rate = PEAK_BF16_TFLOPS[cfg.hardware] * 1e12 * cfg.mfu
    return {"forward_flops_per_s": rate, "bf16_forward_flops_per_s": rate, "train_flops_per_s": rate,
            "head_train_flops_per_s": rate,
            "method": f"{cfg.hardware} dense bf16 peak {PEAK_BF16_TFLOPS[cfg.hardware]:g} TFLOP/s × assumed MFU {cfg.mfu}"}


def make_plan(config, lengths: Lengths, cfg: PlanConfig, proxy: Lengths | None = None,
              target: Lengths | None = None, use_observed: bool = True) -> dict:
    """The plan's JSON: per stage FLOPs, seconds, peak memory; the totals and the predicted AER.

    `use_observed`: the rates of earlier runs of this model here where there are some (see `observe`),
    else the calibration's alone."""
    shape = Shape.from_config(config)
    flops = stage_flops(shape, lengths, cfg, proxy=proxy, target=target)
    r = rates(cfg)
    gpu = cfg.hardware != "calibrate"
    bytes_per = 2 if gpu else 4
    native = "bf16_forward_flops_per_s" in r  # a named GPU, or a CPU whose calibration measured native bf16
    bf16_mine = cfg.mine_dtype == "bfloat16" or (cfg.mine_dtype == "auto" and native)  # as compute_dtype decides
    mine_note = (" (emulated on this CPU: far slower than planned at its fp32 rate)" if bf16_mine and not native else
                 " (planned at the GPU's bf16 rate: its fp32 rate is not modelled)" if gpu and not bf16_mine else "")
    history = observed(shape, cfg, bf16_mine) if use_observed and not gpu else {}
    stages = {}
    for name, st in flops.items():
        rate = r["forward_flops_per_s"] if st["kind"] != "train" else \
            r["head_train_flops_per_s"] if st["trainable"] in SPARSE_SCOPES else r["train_flops_per_s"]
        stage_bytes = bytes_per
        if name == "mine":
            rate = r["bf16_forward_flops_per_s"] if gpu or (native and bf16_mine) else rate
            stage_bytes = 2 if bf16_mine else 4
        if history.get(name):
            rate = float(np.median(history[name]))
        t = trainable_for(st.get("trainable", "full"), shape, assumed_heads(shape, cfg.head_frac), kv_scope=cfg.kv_scope) \
            if st["kind"] == "train" else Trainable()
        stages[name] = {"flops": st["flops"], "seconds": st["flops"] / rate,
                        "peak_memory_bytes": peak_memory(shape, st, cfg, stage_bytes, trainable_params(shape, t))}
    p2d_flops = sum(stages[s]["flops"] for s in STAGES if s != "reference")
    p2d_seconds = sum(stages[s]["seconds"] for s in STAGES if s != "reference")
    ref = stages["reference"]
    return {"stages": stages, "p2d_flops": p2d_flops, "p2d_seconds": p2d_seconds,
            "aer_flops": p2d_flops / ref["flops"], "aer_seconds": p2d_seconds / ref["seconds"],
            "speedup": ref["seconds"] / p2d_seconds, "rates": r, "pool_rows": int(len(lengths.prompt)),
            "pool_tokens": int(lengths.total.sum()), "lengths": lengths.method, "config": asdict(cfg),
            "model": {"layers": shape.layers, "hidden": shape.hidden, "heads": shape.heads,
                      "kv_heads": shape.kv_heads, "params": shape.params()},
            "assumptions": ["the subset's lengths are the target's (a seeded resample to the subset's size)"
                            if target is not None else
                            "the subset's lengths are the pool's (no target given: a seeded random sample of its size)",
                            "one selected head sits in layer 0, so heads training back-propagates through every layer",
                            f"epochs: {cfg.epochs} on both sides (p2d's training and the reference)",
                            f"mining computes in {'bf16' if bf16_mine else 'fp32'}{mine_note}",
                            *([f"seconds of {', '.join(n for n in history if history[n])} at the rates observed in "
                               f"earlier runs of this model here (median of the last {OBSERVED_RUNS}); the others at "
                               "the calibration's"] if any(history.values()) else []),
                            "peak memory is approximate (p2d/plan.py: peak_memory)"]}


def _observation_keys(shape: Shape, cfg: PlanConfig, bf16_mine: bool) -> dict[str, str]:
    """What a stage's observed rate is a rate of: this machine, the model's shape, and what changes the
    stage's rate (mining's precision, training's scope)."""
    model = f"{machine()} | {shape.layers}x{shape.hidden}x{shape.heads}/{shape.kv_heads}x{shape.vocab}"
    variant = {"proxy": "qkv", "mine": "bf16" if bf16_mine else "fp32", "train": f"{cfg.scope}/{cfg.kv_scope}",
               "reference": "full"}
    return {stage: f"{model} | {stage} {variant[stage]}" for stage in OBSERVED_STAGES}


def _observed_path():
    from p2d.models import cache_dir

    return cache_dir() / "observed_rates.json"


def _seen() -> dict[str, list]:
    """The kept observations: key -> [[what ran, rate], ...]."""
    from p2d.io import read_json

    path = _observed_path()
    return read_json(path) if path.is_file() else {}


def observed(shape: Shape, cfg: PlanConfig, bf16_mine: bool) -> dict[str, list[float]]:
    """Each stage's rates (FLOP/s) observed in earlier runs of this model on this machine."""
    seen = _seen()
    return {stage: [rate for _, rate in seen.get(key, []) if rate > 0]
            for stage, key in _observation_keys(shape, cfg, bf16_mine).items()}


def observe(shape: Shape, cfg: PlanConfig, bf16_mine: bool, runs: dict[str, tuple[str, float, float]]) -> None:
    """Keep each stage's achieved rate: `runs` maps a stage to (what it was: its run directory and cache
    fingerprint, FLOPs, seconds). One already kept is not counted again (a reused stage is the same
    observation); a stage that computed nothing (a given task model: no proxy) is no rate."""
    from p2d.io import write_json

    seen = _seen()
    for stage, key in _observation_keys(shape, cfg, bf16_mine).items():
        what, flops, seconds = runs.get(stage, ("", 0, 0))
        if flops > 0 and seconds > 0:
            kept = [entry for entry in seen.get(key, []) if entry[0] != what]
            seen[key] = (kept + [[what, flops / seconds]])[-OBSERVED_RUNS:]
    write_json(_observed_path(), seen)


def scan(tokens: PackedTokens) -> Lengths:
    """Context/labelled token counts of each sample as trained (tokenized uncut, see `p2d.data.load_tokens`)."""
    total = np.diff(tokens.offsets)
    labelled = np.add.reduceat(tokens.trained.astype(np.int64), tokens.offsets[:-1]) if len(tokens) else total
    return Lengths(total - labelled, labelled)


def scan_bytes(examples: list) -> Lengths:
    """Token counts guessed as bytes / 4, for a model given as a bare config.json (no tokenizer)."""
    p = np.array([len(e.prompt.encode()) // 4 + 1 for e in examples])
    r = np.array([len(e.response.encode()) // 4 + 1 for e in examples])
    return Lengths(p, r, "bytes / 4 (no tokenizer)")


def plan_table(plan: dict):
    from rich.table import Table

    table = Table(title=f"p2d plan: {plan['pool_rows']:,} rows, {plan['pool_tokens']:,} tokens")
    for col in ("stage", "TFLOPs", "seconds", "peak memory GiB"):
        table.add_column(col, justify="right" if col != "stage" else "left")
    for name, s in plan["stages"].items():
        table.add_row(name, f"{s['flops'] / 1e12:.3f}", f"{s['seconds']:.1f}", f"{s['peak_memory_bytes'] / 2**30:.2f}")
    table.caption = (f"predicted AER {plan['aer_seconds']:.3f} (speedup {plan['speedup']:.1f}x); "
                     f"rates: {plan['rates']['method']}")
    return table

