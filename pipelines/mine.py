"""`p2d mine`: score a data pool by what the chosen heads do on it, keep the top data-frac, export it."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from p2d import P2DError
from p2d.cards import DOMAINS
from p2d.config import check_choices, option
from p2d.data import FIELDS_HELP
from p2d.features import FEATURE_DTYPES, POOLINGS
from p2d.geometry import AttentionGeometry
from p2d.io import write_json
from p2d.mining import DIVERSITIES, HEAD_SETS, INDEXES, QUALITIES, SELECTORS
from p2d.models import COMPUTE_DTYPES, DEFAULT_MODEL, MODEL_HELP, load_config, resolve_model
from p2d.tokens import TEMPLATE_HELP, TEMPLATES

console = Console(stderr=True)
DEFAULT_POOL = "p2d:default"


@dataclass
class MineConfig:
    heads: str | None = option(None, "heads.json from `p2d localize` (the ALPS heads that mine).")
    data: str | list[str] = option(DEFAULT_POOL, "The pool: a data file, a datasets dir, a hub id, or p2d:default.")
    model: str = option(DEFAULT_MODEL, MODEL_HELP)
    target: str | None = option(None, "Target samples that define the domain (default: the card's seed set).")
    domain: str | None = option(None, "Domain whose data card's seed set is the target.", choices=DOMAINS)
    data_frac: float = option(0.1, "Fraction f of the pool kept: top ceil(f*N).")
    mining_heads: str = option("alps", "Heads whose outputs mine: ALPS (heads.json), random, or those that best "
                                       "separate target from pool.", choices=HEAD_SETS)
    mining_max_layer: int | None = option(None, "Random/discriminative heads only from layers 0..N: extraction stops "
                                                "after layer N.")
    head_report: bool = option(False, "Also measure how well each head set (alps, random, discriminative) separates "
                                      "target from pool: one extra all-heads pass over the target and 256 pool rows "
                                      "(always for random/discriminative).")
    quality: str = option("ifd-rank", "Quality signal folded into p2d's rank: ifd-rank (IFD within an affinity "
                                      "shortlist), nll (base response loss), ifd (drop IFD >= 1), reducible (base minus "
                                      "proxy task-model loss on the shortlist; needs the task model), or none "
                                      "(docs/BENCHMARKS.md#selection).", choices=QUALITIES)
    quality_weight: float | None = option(None, "Weight of the quality rank against affinity (default: 0.5 for nll, "
                                                "1.0 for ifd-rank and reducible).")
    task_model: str | None = option(None, "Proxy task model for --quality reducible (default: the task_model "
                                          "recorded in heads.json).")
    selector: str = option("p2d", "p2d (head affinity + quality), or a baseline: p2d-paper (head affinity alone), rds "
                                  "(RDS+), ifd (Superfiltering), random, embedding-mid/-last.", choices=SELECTORS)
    # auto = facility-quality for p2d: better than the plain top (none) on 4 of 5 held-out sets
    # (docs/BENCHMARKS.md#selection). Baseline selectors get none.
    diversity: str = option("auto", "auto: facility-quality for the p2d and embedding selectors with ifd-rank or "
                                    "reducible quality, none otherwise (baselines select as published). facility: pick "
                                    "the subset that best covers (facility location over the selector's features) the "
                                    "top 2x candidates by score, instead of their top 1x; facility-quality: the same, "
                                    "never taking a candidate in the shortlist's worst third by the quality signal.",
                            choices=DIVERSITIES)
    pooling: str = option("mean", "How head features are pooled over a sample (rds always uses weighted).",
                          choices=POOLINGS)
    dedup: float | None = option(None, "Drop samples whose cosine to a kept one is >= this.")
    index: str = option("auto", "FAISS index for --dedup: flat (exact), ivf (approximate), auto (ivf above 200k rows).",
                        choices=INDEXES)
    feature_dtype: str = option("float32", "How the feature store keeps features: float16 halves its disk and memory "
                                           "(large pools).", choices=FEATURE_DTYPES)
    mining_dtype: str = option("auto", "Precision of the pool pass: bfloat16 is ~2x faster where the hardware has it "
                                       "(GPUs, CPUs with AVX512-BF16 or AMX); auto takes it there and float32 elsewhere.",
                               choices=COMPUTE_DTYPES)
    max_length: int = option(128, "Tokens read per sample when mining (the prompt and the start of the response).")
    window: int | None = option(None, "Read each sample's prompt and only its first N response tokens (default: as "
                                      "many as the max length allows).", flag="--mining-window")
    template: str = option("auto", TEMPLATE_HELP, choices=TEMPLATES)
    batch_size: int = option(16, "Samples per forward pass when mining.")
    parquet: bool = option(False, "Also write selected.parquet.")
    fields: str | None = option(None, FIELDS_HELP)
    seed: int = option(0, "Seed of every random choice (k-means, random heads and subsets).")

    def __post_init__(self) -> None:
        from p2d.data import pool_spec

        self.data = pool_spec(self.data)  # one source as a string, several as a list

    def validate(self) -> None:
        from p2d.tokens import check_template

        self.validate_options()
        check_template(self.template, self.model)
        if self.selector == "p2d" and self.mining_heads == "alps" and not self.heads:
            raise P2DError("--mining-heads alps needs --heads heads.json (from `p2d localize`)")
        if self.heads and not Path(self.heads).is_file():
            raise P2DError(f"--heads: file not found: {self.heads}")
        if self.needs_task_model() and not self.task_model_path():
            raise P2DError("--quality reducible needs the proxy task model: pass --task-model, or --heads with a "
                           "heads.json whose task_model exists (or choose another --quality)")
        if not (self.target or self.domain) and self.selector != "ifd":
            raise P2DError("mining needs a target: pass --target FILE or --domain (its data card's seed set)")

    def validate_options(self) -> None:
        """The checks that need no input file (also what `p2d run` checks before its first stage)."""
        from p2d.mining import SHORTLISTED, n_selected

        check_choices(self)
        n_selected(self.data_frac, 1)
        if self.max_length <= 0 or self.batch_size <= 0:
            raise P2DError("--max-length and --batch-size must be positive")
        if self.window is not None and self.window <= 0:
            raise P2DError(f"--mining-window must be positive, got {self.window}")
        if self.quality_weight is not None and not math.isfinite(self.quality_weight):
            raise P2DError(f"--quality-weight must be a finite number, got {self.quality_weight}")
        if self.diversity == "facility-quality" and self.quality not in SHORTLISTED:
            raise P2DError(f"--diversity facility-quality needs --quality {' or '.join(SHORTLISTED)}, "
                           f"got {self.quality!r}")
        if self.dedup is not None and not 0 < self.dedup <= 1:
            raise P2DError(f"--dedup is a cosine threshold in (0, 1], got {self.dedup}")
        if self.mining_max_layer is not None and self.mining_max_layer < 0:
            raise P2DError(f"--mining-max-layer must be 0 or more, got {self.mining_max_layer}")

    def needs_task_model(self) -> bool:
        return self.quality == "reducible" and self.selector in ("p2d", "embedding-mid", "embedding-last")

    def task_model_path(self) -> str | None:
        """--task-model, else the task model heads.json was scored against, if it still exists here."""
        if self.task_model:
            return self.task_model
        if self.heads and Path(self.heads).is_file():
            from p2d.io import read_json

            task = read_json(self.heads).get("task_model")
            if task and Path(task).exists():
                return str(task)
        return None


BARRIER_TIMEOUT_H = 24  # ranks wait at a barrier while rank 0 alone runs a stage (p2d run's proxy: minutes to hours)


def process_group() -> tuple[int, int, object]:
    """(rank, world, barrier) under torchrun (WORLD_SIZE > 1), else (0, 1, None).

    gloo carries CPU tensors (mining passes only barriers), NCCL CUDA ones (DeepSpeed's training
    reuses this group).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, None
    import datetime

    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo",
                                timeout=datetime.timedelta(hours=BARRIER_TIMEOUT_H))
    return dist.get_rank(), world, dist.barrier


def target_source(cfg: MineConfig) -> str:
    from p2d.cards import load_card

    return cfg.target or load_card(cfg.domain).seed


def mine_pool(cfg: MineConfig, out_dir: str | Path, progress: bool = True) -> dict:
    """Run the mine command; returns the summary written to out_dir/mine.json."""
    from p2d.data import load_examples, load_tokens, select_examples, source_names, sources_of
    from p2d.exports import export_subset
    from p2d.mining import mine
    from p2d.models import compute_dtype, load_model
    from p2d.selection import read_heads_json
    from p2d.tokens import resolve_template, tokenize

    cfg.validate()
    out_dir = Path(out_dir)
    rank, world, barrier = process_group()
    progress = progress and rank == 0
    geom = AttentionGeometry.from_config(load_config(cfg.model))
    heads = read_heads_json(cfg.heads, geom).heads if cfg.heads else None  # wrong model: fails before any work
    start = time.perf_counter()
    dtype = compute_dtype(cfg.mining_dtype)
    model, tok = load_model(cfg.model, dtype)
    template = resolve_template(cfg.template, tok)
    pool = load_tokens(cfg.data, tok, cfg.max_length, template, cfg.fields, cfg.window)  # packed: a million rows fit
    tsource = target_source(cfg) if (cfg.target or cfg.domain) else None
    target = load_examples(tsource, domain=cfg.domain, template=template) if tsource else []
    task_model = load_model(cfg.task_model_path(), dtype)[0] if cfg.needs_task_model() else None
    load_s = time.perf_counter() - start
    if rank == 0:
        console.print(f"[bold]mine[/] {len(pool)} pool samples from {cfg.data}, target {len(target)} from {tsource}, "
                      f"selector {cfg.selector}" + (f", heads {cfg.mining_heads}" if cfg.selector == "p2d" else ""))
    result = mine(model, pool, tokenize(target, tok, cfg.max_length, template, cfg.window),
                  data_frac=cfg.data_frac, selector=cfg.selector, heads=heads, head_set=cfg.mining_heads,
                  n_heads=None if heads else max(1, round(0.1 * geom.total_heads)), pooling=cfg.pooling,
                  quality=cfg.quality, quality_weight=cfg.quality_weight, tokenizer=tok, task_model=task_model,
                  max_layer=cfg.mining_max_layer, head_report=cfg.head_report, diversity=cfg.diversity,
                  dedup_threshold=cfg.dedup, index=cfg.index, seed=cfg.seed, batch_size=cfg.batch_size,
                  store_dir=out_dir / "store", model_id=resolve_model(cfg.model), progress=progress,
                  ranks=(rank, world, barrier), feature_dtype=cfg.feature_dtype)
    if rank != 0:  # every rank made the same selection; rank 0 writes it
        return result.summary
    start = time.perf_counter()
    kept = select_examples(cfg.data, [i for i, keep in zip(result.ids, result.selected) if keep], cfg.fields, template)
    paths = export_subset(out_dir, kept, result, source=", ".join(sources_of(cfg.data)), parquet=cfg.parquet,
                          fields=cfg.fields,
                          axolotl=axolotl_settings(model, heads, resolve_model(cfg.model)),
                          sources=source_names(cfg.data))
    summary = {"model": cfg.model, "pool": cfg.data, "target": tsource, "heads_file": cfg.heads, "template": template,
               "window": cfg.window, "mining_dtype": str(dtype).removeprefix("torch."),
               "task_model": cfg.task_model_path() if cfg.needs_task_model() else None,
               "mining_heads": cfg.mining_heads if cfg.selector == "p2d" else None, **result.summary,
               "outputs": {k: str(v) for k, v in paths.items()}}
    summary["timings"] = {"load_s": round(load_s, 3), **summary.get("timings", {}),
                          "export_s": round(time.perf_counter() - start, 3)}
    # mine.json names its outputs relative to its own directory, so the directory can be moved
    write_json(out_dir / "mine.json", summary | {"outputs": {k: str(v.relative_to(out_dir)) for k, v in paths.items()}})
    console.print(mine_table(summary))
    return summary


def axolotl_settings(model, heads: list[tuple[int, int]] | None, base_model: str) -> dict:
    """axolotl.yaml's top-level keys: `p2d train`'s defaults, and with heads the same rows unfrozen."""
    from p2d.exports import axolotl_unfrozen
    from p2d.pipelines.train import default_loop, default_lr

    t = default_loop(lr=default_lr("heads" if heads else "full"))
    out = {"base_model": base_model, "sequence_len": t.max_length, "micro_batch_size": t.batch_size,
           "gradient_accumulation_steps": t.grad_accum, "num_epochs": t.epochs,
           "learning_rate": t.lr, "optimizer": "adamw_torch",
           "lr_scheduler": "cosine", "warmup_ratio": t.warmup_ratio, "max_grad_norm": t.max_grad_norm,
           "weight_decay": 0.0 if heads else t.weight_decay, "train_on_inputs": False, "output_dir": "./axolotl-out"}
    if heads:
        out["unfrozen_parameters"] = axolotl_unfrozen(model, heads)
    return out


def mine_table(summary: dict) -> Table:
    table = Table(title=f"mined {summary['counts']['selected']} of {summary['counts']['pool']} samples "
                        f"({summary['selector']})")
    table.add_column("what")
    table.add_column("value", justify="right")
    for name, info in (summary.get("head_sets") or {}).items():
        if isinstance(info, dict):
            table.add_row(f"separation AUROC, {name} heads", str(info["separation_auroc"] or "not measured"))
    if summary.get("separation_auroc") is not None:
        table.add_row("separation AUROC, features used", f"{summary['separation_auroc']}")
    if summary.get("feature_dim"):
        table.add_row("feature dim", str(summary["feature_dim"]))
    for k, v in summary["timings"].items():
        table.add_row(k.replace("_s", " (s)"), f"{v:.1f}")
    return table
