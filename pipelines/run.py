"""`p2d run`: proxy → localize → mine → train → report, each stage cached in the run directory.

Running the same command again reuses every finished stage; a run killed during mining or
training resumes from its feature-store shards or trainer checkpoint; `from_stage` redoes a stage
and everything after it. Changing a stage's options re-runs that stage and the ones after it.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from rich.console import Console

from p2d import P2DError
from p2d.aer import Ledger, aer_report, aer_table, write_aer
from p2d.flops import Shape
from p2d.io import read_json, write_json, write_text
from p2d.models import DEFAULT_MODEL
from p2d.pipelines.localize import LocalizeConfig, make_task_model, proxy_source, score_and_select
from p2d.pipelines.mine import DEFAULT_POOL, MineConfig, mine_pool
from p2d.pipelines.plan import scan_pool
from p2d.pipelines.reference import ReferenceRunConfig, reference_cost
from p2d.pipelines.stages import Stage, fingerprint
from p2d.pipelines.train import DEFAULT_EPOCHS, DEFAULT_LR, TrainRunConfig, train_model
from p2d.plan import PlanConfig, make_plan, plan_table, stage_flops
from p2d.proxy import ProxyConfig
from p2d.reference import ReferenceConfig
from p2d.selection import read_heads_json
from p2d.trainer import TrainConfig

console = Console(stderr=True)
STAGE_ORDER = ("proxy", "localize", "mine", "train", "reference")


@dataclass
class RunConfig:
    domain: str = "code"
    model: str = DEFAULT_MODEL
    task_model: str | None = None
    pool: str | list[str] = DEFAULT_POOL  # several sources are mined as one pool
    fields: str | None = None  # the pool's field map (mining, training and the reference read it the same way)
    target: str | None = None
    proxy_data: str | None = None
    data_frac: float = 0.1
    head_frac: float = 0.1
    metric: str = "w1"
    head_method: str = "top"
    mining_heads: str = "alps"
    mining_max_layer: int | None = None
    head_report: bool = False
    quality: str = MineConfig.quality
    selector: str = "p2d"
    diversity: str = MineConfig.diversity
    quality_weight: float | None = None
    pooling: str = MineConfig.pooling
    dedup: float | None = None
    scope: str = "heads"
    kv_scope: str = "shared"
    train_o: bool = False
    lora_rank: int = TrainRunConfig.lora_rank
    mine_max_length: int = MineConfig.max_length
    mining_window: int | None = None
    template: str = "auto"  # p2d.tokens.TEMPLATES, for every stage: proxy, mining, training and reference
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=DEFAULT_LR["heads"], epochs=DEFAULT_EPOCHS,
                                                                   max_length=256))
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    measure_reference: bool = False
    evaluate: bool = False
    eval_limit: int | None = 20
    seed: int = 0

    def __post_init__(self) -> None:
        from p2d.data import pool_spec, sources_of

        self.pool = pool_spec(sources_of(self.pool))

    def localize_config(self) -> LocalizeConfig:
        return LocalizeConfig(model=self.model, task_model=self.task_model, domain=self.domain,
                              proxy_data=self.proxy_data, proxy=replace(self.proxy, template=self.template),
                              head_frac=self.head_frac,
                              metric=self.metric, method=self.head_method, seed=self.seed)

    def mine_config(self, heads: str, task_model: str | None = None) -> MineConfig:
        return MineConfig(heads=heads, data=self.pool, model=self.model, target=self.target, domain=self.domain,
                          task_model=task_model,
                          data_frac=self.data_frac, mining_heads=self.mining_heads,
                          mining_max_layer=self.mining_max_layer, head_report=self.head_report, quality=self.quality,
                          diversity=self.diversity, quality_weight=self.quality_weight, pooling=self.pooling,
                          dedup=self.dedup, fields=self.fields,
                          selector=self.selector, max_length=self.mine_max_length, window=self.mining_window,
                          template=self.template,
                          seed=self.seed)

    def plan_config(self) -> PlanConfig:
        return PlanConfig(data_frac=self.data_frac, head_frac=self.head_frac, scope=self.scope, kv_scope=self.kv_scope,
                          epochs=self.train.epochs if self.train.max_steps is None else 1,
                          train_batch_size=self.train.batch_size * self.train.grad_accum,
                          train_max_length=self.train.max_length, mine_max_length=self.mine_max_length,
                          mine_window=self.mining_window,
                          proxy_samples=self.proxy.samples, proxy_steps=0 if self.task_model else self.proxy.steps,
                          proxy_batch_size=self.proxy.batch_size, proxy_max_length=self.proxy.max_length,
                          seed=self.seed)

    def validate(self) -> None:
        """Every option checked before the first stage starts, so a typo never costs a proxy run."""
        from p2d.cards import load_card
        from p2d.pipelines.train import check_train_options
        from p2d.tokens import check_template

        load_card(self.domain)
        self.localize_config().validate()
        check_train_options(self.scope, self.train, self.kv_scope)
        if self.reference.steps <= 0:
            raise P2DError(f"--reference-steps must be positive, got {self.reference.steps}")
        if self.mine_max_length <= 0:
            raise P2DError(f"--mine-max-length must be positive, got {self.mine_max_length}")
        if self.eval_limit is not None and self.eval_limit < 0:
            raise P2DError(f"--eval-limit must be 0 or more, got {self.eval_limit}")
        self.mine_config("").validate_options()
        check_template(self.template, self.model)


def _stage_options(cfg: RunConfig) -> dict[str, dict]:
    """Each stage's cache key: its options plus digests of what its inputs resolve to here (content, not names)."""
    from p2d.io import input_digest
    from p2d.models import model_digest
    from p2d.pipelines.mine import target_source

    d = asdict(cfg)
    d["inputs"] = {"model": model_digest(cfg.model), "task_model": cfg.task_model and model_digest(cfg.task_model),
                   "proxy_data": None if cfg.task_model else input_digest(proxy_source(cfg.localize_config())),
                   "pool": input_digest(cfg.pool),
                   "target": input_digest(target_source(cfg.mine_config(""))) if (cfg.target or cfg.domain) else None}
    inputs = d["inputs"]
    return {
        "proxy": {k: d[k] for k in ("domain", "model", "task_model", "proxy_data", "proxy", "template")}
        | {"inputs": {k: inputs[k] for k in ("model", "task_model", "proxy_data")}},
        "localize": {k: d[k] for k in ("head_frac", "metric", "head_method", "seed")},
        "mine": {k: d[k] for k in ("pool", "fields", "target", "data_frac", "mining_heads", "mining_max_layer",
                                   "head_report", "quality", "quality_weight", "selector", "diversity", "pooling",
                                   "dedup", "mine_max_length", "mining_window", "template")}
        | {"inputs": {k: inputs[k] for k in ("pool", "target")}},
        "train": {k: d[k] for k in ("scope", "kv_scope", "train_o", "lora_rank", "fields", "train", "template")},
        "reference": {k: d[k] for k in ("pool", "fields", "model", "train", "reference", "measure_reference",
                                        "template")}
        | {"inputs": {k: inputs[k] for k in ("pool", "model")}},
    }


def run_pipeline(cfg: RunConfig, run_dir: str | Path, from_stage: str | None = None, progress: bool = True,
                 command: str | None = None) -> dict:
    """Run (or resume) every stage in `run_dir`; returns the AER report. `command`: the CLI line, for report.md."""
    if from_stage is not None and from_stage not in STAGE_ORDER:
        raise P2DError(f"--from-stage must be one of {', '.join(STAGE_ORDER)}, got {from_stage!r}")
    cfg.validate()
    run_dir = Path(run_dir).resolve()  # stage summaries hold absolute paths: a rerun from elsewhere finds them
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "run.json", {"config": asdict(cfg)})
    proxy_data = None if cfg.task_model else proxy_source(cfg.localize_config())
    model_cfg, lengths, proxy_lengths = scan_pool(cfg.model, cfg.pool, cfg.fields, proxy_data, cfg.template)
    plan = make_plan(model_cfg, lengths, cfg.plan_config(), proxy_lengths)
    write_json(run_dir / "plan.json", plan)
    console.print(plan_table(plan))
    ledger = Ledger(run_dir / "ledger.json")
    options = _stage_options(cfg)
    stages, prev = {}, ""
    for name in STAGE_ORDER:
        prev = fingerprint(options[name], prev if name != "reference" else "")
        stages[name] = Stage(name, run_dir / name, prev)
    forced = set(STAGE_ORDER[STAGE_ORDER.index(from_stage):]) if from_stage else set()

    def run_stage(name: str, fn, timed: bool = True):
        stage = stages[name]
        if stage.is_done() and name not in forced:
            console.print(f"[green]✓ {name}[/] reused from {stage.dir}")
            return stage.state()["summary"]
        resume = stage.begin(force=name in forced)
        console.rule(f"[bold]{name}")
        if timed:
            with ledger.stage(name, resume=resume):
                summary = fn(stage.dir)
        else:
            summary = fn(stage.dir)
        stage.finish(summary)
        return summary

    proxy = run_stage("proxy", lambda d: {"task_model": make_task_model(cfg.localize_config(), d.parent, progress)})
    loc = run_stage("localize", lambda d: {"heads": str(score_and_select(cfg.localize_config(), proxy["task_model"], d))})
    heads = loc["heads"]
    mined = run_stage("mine", lambda d: mine_pool(cfg.mine_config(heads, proxy["task_model"]), d, progress))
    subset = mined["outputs"]["selected.jsonl"]
    per_source = [v for k, v in mined["outputs"].items() if k.startswith("selected/")]  # several sources' schemas
    trained = run_stage("train", lambda d: train_model(
        TrainRunConfig(data=per_source or subset, model=cfg.model, heads=heads, scope=cfg.scope, kv_scope=cfg.kv_scope,
                       train_o=cfg.train_o, lora_rank=cfg.lora_rank, fields=cfg.fields, template=cfg.template,
                       train=cfg.train), d, progress))
    reference = run_stage("reference", lambda d: reference_cost(ReferenceRunConfig(
        pool=cfg.pool, model=cfg.model, train=cfg.train, estimate=cfg.reference, measure=cfg.measure_reference,
        fields=cfg.fields, template=cfg.template), d,
        progress), timed=False)

    report = aer_report(ledger, reference)
    _count_flops(report, plan, model_cfg, lengths, cfg, mined, read_heads_json(heads).heads, proxy_lengths)
    report["subset"] = {"selected": mined["counts"]["selected"], "pool": mined["counts"]["pool"], "path": subset}
    report["heads"] = {"selected": len(read_json(heads)["selected"]), "path": heads}
    report["trainable_params"] = trained["trainable_params"]
    report["template"] = trained["template"]
    report["outputs"] = {"subset": subset, "heads": heads, **trained.get("outputs", {}),
                         "plan": str(run_dir / "plan.json"), "aer": str(run_dir / "aer.json")}
    report["command"] = command
    if cfg.evaluate:
        report["eval"] = _evaluate(cfg, run_dir)
    write_aer(run_dir, report)
    write_text(run_dir / "report.md", _report_md(cfg, report, run_dir))
    console.print(aer_table(report))
    console.print(f"report: {run_dir / 'report.md'}")
    return report


def _count_flops(report: dict, plan: dict, model_cfg, lengths, cfg: RunConfig, mined: dict, heads: list,
                 proxy_lengths=None) -> None:
    """FLOPs of each stage as it ran (the real subset and heads; mining's target and shortlist lengths as
    assumed) beside the seconds, and the plan's predicted seconds beside the measured ones."""
    import csv

    import numpy as np

    with open(mined["outputs"]["scores.csv"], encoding="utf-8") as f:
        subset = np.flatnonzero([row["selected"] == "1" for row in csv.DictReader(f)])
    flops = stage_flops(Shape.from_config(model_cfg), lengths, cfg.plan_config(), subset=subset,
                        heads=[tuple(h) for h in heads], proxy=proxy_lengths)
    for name, stage in report["stages"].items():
        stage["flops"] = flops[name]["flops"]
        stage["planned_seconds"] = plan["stages"][name]["seconds"]
    report["reference"]["flops"] = flops["reference"]["flops"]
    report["reference"]["planned_seconds"] = plan["stages"]["reference"]["seconds"]
    report["total_flops"] = sum(s["flops"] for s in report["stages"].values())
    report["aer_flops"] = report["total_flops"] / flops["reference"]["flops"]
    report["flops_method"] = "p2d.flops (matmul FLOPs of what runs; counted as torch's FLOP counter counts them)"


def _evaluate(cfg: RunConfig, run_dir: Path) -> dict:
    from p2d.evaluate import evaluate

    out = {}
    for name, model in (("base", cfg.model), ("trained", str(run_dir / "train" / "model"))):
        res = evaluate(model, cfg.domain, task_limit=cfg.eval_limit, template=cfg.template,
                       out=run_dir / f"eval-{name}.json")
        out[name] = {k: v for k, v in res.items() if k != "task_results"}  # per-task details stay in eval-*.json
    return out


def _report_md(cfg: RunConfig, report: dict, run_dir: Path) -> str:
    rows = "\n".join(f"| {k} | {v['seconds']:.1f} | {v['seconds'] / report['reference']['seconds']:.1%} |"
                     for k, v in report["stages"].items())
    lines = [
        f"# p2d run: domain {cfg.domain}",
        "",
        f"`{report['command']}`" if report.get("command") else "(run from Python: `p2d.pipelines.run.run_pipeline`)",
        "",
        f"Model `{cfg.model}`, pool `{cfg.pool}`; the whole configuration is in `run.json`.",
        "",
        f"- heads: {report['heads']['selected']} selected (`{report['heads']['path']}`)",
        f"- subset: {report['subset']['selected']} of {report['subset']['pool']} samples (`{report['subset']['path']}`)",
        f"- trainable parameters: {report['trainable_params']:,} (scope `{cfg.scope}`)",
        f"- prompt template: `{report['template']}` (the merged model's tokenizer renders it as its chat template)",
        "",
        "## Cost (AER)",
        "",
        "| stage | seconds | share of reference |",
        "|---|---:|---:|",
        rows,
        f"| **P2D total** | **{report['total_seconds']:.1f}** | **{report['aer']:.1%}** |",
        f"| reference ({report['reference']['method']}) | {report['reference']['seconds']:.1f} | 100% |",
        "",
        f"AER = {report['aer']:.3f}, speedup = {report['speedup']:.2f}x.",
        "",
        "![AER](aer.png)",
        "",
        "## Heads",
        "",
        f"![heads]({Path(os.path.relpath(Path(report['heads']['path']).parent, run_dir)) / 'heads.png'})",
    ]
    if "loss.png" in report["outputs"]:
        lines += ["", "## Training loss", "", f"![loss]({os.path.relpath(report['outputs']['loss.png'], run_dir)})"]
    lines += ["", "## Outputs", "", "| what | path |", "|---|---|",
              *[f"| {k} | `{v}` |" for k, v in report["outputs"].items()]]
    if "eval" in report:
        lines += ["", "## Evaluation", "", "| model | metric | value |", "|---|---|---:|"]
        for name, res in report["eval"].items():
            lines += [f"| {name} | {k} | {v:.4f} |" for k, v in res.items() if isinstance(v, float)]
    return "\n".join(lines) + "\n"
