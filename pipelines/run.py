"""`p2d run`: proxy → localize → mine → train → report, each stage cached in the run directory.

Running the same command again reuses every finished stage; a run killed during mining or
training resumes from its feature-store shards or trainer checkpoint; `from_stage` redoes a stage
and everything after it. Changing a stage's options re-runs that stage and the ones after it.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import get_origin, get_type_hints

from rich.console import Console

from p2d import P2DError
from p2d.aer import Ledger, aer_report, aer_table, write_aer
from p2d.cards import DOMAINS
from p2d.config import flag, option, option_fields
from p2d.flops import Shape
from p2d.data import FIELDS_HELP, pool_spec
from p2d.io import read_json, write_json, write_text
from p2d.masking import PIPELINE_SCOPES
from p2d.models import DEFAULT_MODEL, MODEL_HELP
from p2d.pipelines.localize import LocalizeConfig, make_task_model, proxy_source, score_and_select
from p2d.pipelines.mine import DEFAULT_POOL, MineConfig, mine_pool, process_group, target_source
from p2d.pipelines.plan import scan_pool
from p2d.pipelines.reference import ReferenceRunConfig, reference_cost
from p2d.pipelines.stages import Stage, fingerprint
from p2d.pipelines.train import TrainRunConfig, default_loop, default_lr, train_model
from p2d.plan import PlanConfig, make_plan, observe, plan_table, stage_flops
from p2d.proxy import ProxyConfig
from p2d.reference import ReferenceConfig
from p2d.selection import read_heads_json
from p2d.tokens import TEMPLATE_HELP, TEMPLATES
from p2d.trainer import NOT_IN_KEY, single_process

console = Console(stderr=True)
STAGE_ORDER = ("proxy", "localize", "mine", "train", "reference")
# stage config fields the run fills (from the pool or the stage before) or manages (a stage whose key changed
# starts in an empty directory, so training's --overwrite has nothing to discard): not options of the run
NOT_RUN_OPTIONS = {"mine": ("heads", "data", "task_model"), "train": ("heads", "data", "overwrite"),
                   "reference": ("pool",)}


@dataclass
class RunConfig:
    """What every stage shares, and each stage's own config as its module defines it (peft-style).

    The shared fields are written into every stage config that has them (so run.json records what
    ran); a stage runs with its config plus the upstream outputs (`*_config()`), and its cache key
    is that config plus digests of its inputs: an option added to a stage config is part of the key,
    and an option of the run (`run_options`), without being named here.
    """

    domain: str = option("code", "The target domain: its data card gives the proxy data and the mining target.",
                         choices=DOMAINS)
    model: str = option(DEFAULT_MODEL, MODEL_HELP)
    pool: str | list[str] = option(DEFAULT_POOL, "The pool to mine: a data file, a datasets dir, a hub id, or "
                                                 "p2d:default (the embedded pool).")
    fields: str | None = option(None, FIELDS_HELP)  # mining, training and the reference read the pool the same way
    template: str = option("auto", TEMPLATE_HELP, choices=TEMPLATES)  # for every stage
    seed: int = option(0, "Seed of every stage.")
    localize: LocalizeConfig = field(default_factory=LocalizeConfig)
    mine: MineConfig = field(default_factory=MineConfig)
    train: TrainRunConfig = field(default_factory=lambda: TrainRunConfig(data="", train=default_loop()))
    reference: ReferenceRunConfig = field(default_factory=ReferenceRunConfig)
    evaluate: bool = option(False, "Evaluate base vs trained on the domain's eval set.", flag="--eval")
    eval_limit: int | None = option(20, "Task problems evaluated with --eval (CPU generation is slow).")

    def __post_init__(self) -> None:
        self.pool = pool_spec(self.pool)
        shared = dict(model=self.model, fields=self.fields, template=self.template)
        self.localize = replace(self.localize, model=self.model, domain=self.domain, seed=self.seed,
                                proxy=replace(self.localize.proxy, template=self.template, seed=self.seed))
        self.mine = replace(self.mine, data=self.pool, domain=self.domain, seed=self.seed, **shared)
        self.train = replace(self.train, train=replace(self.train.train, seed=self.seed), **shared)
        self.reference = replace(self.reference, pool=self.pool, train=self.train.train,
                                 estimate=replace(self.reference.estimate, seed=self.seed), **shared)

    def parts(self) -> dict[str, object]:
        """The run and each stage config it composes, by the part name `run_options` uses."""
        return {"run": self, "loop": self.train.train, "train": self.train, "localize": self.localize,
                "proxy": self.localize.proxy, "mine": self.mine, "reference": self.reference,
                "estimate": self.reference.estimate}

    @classmethod
    def from_options(cls, **options) -> "RunConfig":
        """A RunConfig from flat option names (the CLI's, a config file's; see `run_options`); an unknown
        name is an error. lr None (or absent) is the scope's default."""
        table = run_options()
        parts: dict[str, dict] = {k: {} for k in RunConfig().parts()}
        for name, value in options.items():
            if name not in table:
                raise P2DError(f"p2d run has no option {name!r}")
            part, key = table[name]
            parts[part][key] = value
        if parts["loop"].get("lr") is None:
            parts["loop"]["lr"] = default_lr(parts["train"].get("scope", "heads"))
        return cls(**parts["run"],
                   localize=LocalizeConfig(**parts["localize"], proxy=ProxyConfig(**parts["proxy"])),
                   mine=MineConfig(**parts["mine"]),
                   train=TrainRunConfig(data="", **parts["train"], train=default_loop(**parts["loop"])),
                   reference=ReferenceRunConfig(**parts["reference"], estimate=ReferenceConfig(**parts["estimate"])))

    @classmethod
    def from_json(cls, data: dict) -> "RunConfig":
        """The RunConfig a run.json records (its `asdict` read back), to plan or rerun it."""
        def build(kind, value, where: str):
            if get_origin(kind) is tuple and isinstance(value, list):  # JSON has no tuples
                return tuple(value)
            if not (is_dataclass(kind) and isinstance(value, dict)):
                return value
            hints, names = get_type_hints(kind), {f.name for f in fields(kind)}
            unknown = sorted(set(value) - names)
            if unknown:
                raise P2DError(f"run.json: {where or 'config'} has no field {', '.join(unknown)} "
                               "(written by another version of p2d?)")
            return kind(**{k: build(hints[k], v, f"{where}.{k}".lstrip(".")) for k, v in value.items()})

        return build(cls, data, "")

    def localize_config(self) -> LocalizeConfig:
        return self.localize

    def mine_config(self, heads: str | None, task_model: str | None = None) -> MineConfig:
        return replace(self.mine, heads=heads, task_model=task_model)

    def train_config(self, data: str | list[str], heads: str | None) -> TrainRunConfig:
        return replace(self.train, data=data, heads=heads)

    def reference_config(self) -> ReferenceRunConfig:
        return self.reference

    def plan_config(self) -> PlanConfig:
        t, proxy, mine = self.train.train, self.localize.proxy, self.mine
        return PlanConfig(data_frac=mine.data_frac, head_frac=self.localize.head_frac, scope=self.train.scope,
                          kv_scope=self.train.kv_scope, epochs=t.epochs if t.max_steps is None else 1,
                          train_batch_size=t.batch_size * t.grad_accum, train_max_length=t.max_length,
                          mine_max_length=mine.max_length, mine_window=mine.window, mine_dtype=mine.mining_dtype,
                          mine_batch_size=mine.batch_size,
                          proxy_samples=proxy.samples, proxy_steps=0 if self.localize.task_model else proxy.steps,
                          proxy_batch_size=proxy.batch_size, proxy_max_length=proxy.max_length, seed=self.seed)

    def validate(self) -> None:
        """Every option checked before the first stage starts, so a typo never costs a proxy run."""
        from p2d.cards import load_card
        from p2d.tokens import check_template

        load_card(self.domain)
        self.localize_config().validate()
        self.mine_config(None).validate_options()
        if self.train.scope not in PIPELINE_SCOPES:
            raise P2DError(f"--scope must be one of {', '.join(PIPELINE_SCOPES)} in p2d run, got {self.train.scope!r}")
        self.train.validate_options()
        self.reference_config().validate()
        if self.eval_limit is not None and self.eval_limit < 0:
            raise P2DError(f"--eval-limit must be 0 or more, got {self.eval_limit}")
        check_template(self.template, self.model)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1 and self.train.train.deepspeed is None:
            raise P2DError(f"p2d run on {world} processes trains on every rank: pass --deepspeed (a ZeRO config)")


@functools.cache
def run_options() -> dict[str, tuple[str, str]]:
    """Every option of `p2d run`: its name -> (the part of RunConfig.parts() that owns it, the field).

    The run's own fields, then every option field of each stage config (p2d.config.option) under the
    name of its declared flag, else its own; a field the run shares (model, seed, ...) or fills
    (NOT_RUN_OPTIONS) is not an option; a name an earlier part took gets the part's prefix (mine_max_length).
    So a field added to a stage config with help is an option of `p2d run` too.
    """
    cfg = RunConfig()
    table = {f.name: ("run", f.name) for f in option_fields(cfg)}
    stages = {part: config for part, config in cfg.parts().items() if part != "run"}
    for part, config in stages.items():
        for f in option_fields(config):
            if f.name in table and table[f.name][0] == "run" or f.name in NOT_RUN_OPTIONS.get(part, ()):
                continue
            name = flag(config, f.name).removeprefix("--").replace("-", "_")
            name = name if name not in table else f"{part}_{name}"
            if name in table:
                raise RuntimeError(f"p2d run would have two options named {name!r}: rename a stage field's flag")
            table[name] = (part, f.name)
    return table


PROXY_KEY = ("model", "task_model", "domain", "proxy_data", "proxy")  # the proxy stage's part of LocalizeConfig


def _stage_options(cfg: RunConfig) -> dict[str, dict]:
    """Each stage's cache key: its whole config (upstream outputs left out: the chained key covers them)
    plus digests of what its inputs resolve to here (content, not names)."""
    from p2d.io import input_digest
    from p2d.models import model_digest

    loc = asdict(cfg.localize_config())
    task_model = cfg.localize.task_model
    mine = cfg.mine_config(None)
    return {
        "proxy": {k: loc[k] for k in PROXY_KEY} | {"inputs": {
            "model": model_digest(cfg.model), "task_model": task_model and model_digest(task_model),
            "proxy_data": None if task_model else input_digest(proxy_source(cfg.localize_config()))}},
        "localize": {k: v for k, v in loc.items() if k not in PROXY_KEY},
        "mine": asdict(mine) | {"inputs": {
            "pool": input_digest(cfg.pool),
            "target": input_digest(target_source(mine)) if (mine.target or mine.domain) else None}},
        "train": _computing(asdict(cfg.train_config("", None))),
        "reference": _computing(asdict(cfg.reference_config())) | {"inputs": {"pool": input_digest(cfg.pool),
                                                                              "model": model_digest(cfg.model)}},
    }


def _computing(stage: dict) -> dict:
    """A stage key without the loop fields that never change what is computed (p2d.trainer.NOT_IN_KEY):
    changing how often a run checkpoints or logs resumes it instead of starting over."""
    return stage | {"train": {k: v for k, v in stage["train"].items() if k not in NOT_IN_KEY}}


def run_pipeline(cfg: RunConfig, run_dir: str | Path, from_stage: str | None = None, progress: bool = True,
                 command: str | None = None) -> dict:
    """Run (or resume) every stage in `run_dir`; returns the AER report. `command`: the CLI line, for report.md."""
    if from_stage is not None and from_stage not in STAGE_ORDER:
        raise P2DError(f"--from-stage must be one of {', '.join(STAGE_ORDER)}, got {from_stage!r}")
    cfg.validate()
    rank, world, barrier = process_group()
    lead, sync = rank == 0, barrier or (lambda: None)

    def share(value):
        """Rank 0's `value` on every rank (a broadcast, so also a barrier)."""
        if world == 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    run_dir = Path(run_dir).resolve()  # absolute: the stages' own paths; their summaries store them relative
    if world > 1:
        _same_config_on_every_rank({"config": asdict(cfg), "from_stage": from_stage, "run_dir": str(run_dir)}, world)
    if lead:  # first, alone: resolving the model may convert it into the shared cache
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "run.json", {"config": asdict(cfg)})
        proxy_data = None if cfg.localize.task_model else proxy_source(cfg.localize_config())
        target = target_source(cfg.mine_config(None))
        model_cfg, lengths, proxy_lengths, target_lengths = scan_pool(cfg.model, cfg.pool, cfg.fields, proxy_data,
                                                                      cfg.template, target)
        plan = make_plan(model_cfg, lengths, cfg.plan_config(), proxy_lengths, target_lengths)
        write_json(run_dir / "plan.json", plan)
        console.print(plan_table(plan))
        ledger = Ledger(run_dir / "ledger.json")
    sync()
    options = _stage_options(cfg)
    options["reference"]["ranks"] = world  # a reference estimated on other ranks is another figure
    stages, prev = {}, ""
    for name in STAGE_ORDER:
        prev = fingerprint(options[name], prev if name != "reference" else "")
        stages[name] = Stage(name, run_dir / name, prev)
    forced = set(STAGE_ORDER[STAGE_ORDER.index(from_stage):]) if from_stage else set()

    def run_stage(name: str, fn, timed: bool = True, every_rank: bool = False):
        """Run (or reuse) a stage. Under several processes rank 0 decides and keeps the stage's books, and
        runs it alone unless `every_rank` (mining, training and the reference split their work); the others
        wait, then read its summary. A stage failing on rank 0 alone stops the other ranks too."""
        stage = stages[name]
        if share(stage.is_done() and name not in forced if lead else None):
            if lead:
                console.print(f"[green]✓ {name}[/] reused from {stage.dir}")
            return stage.state()["summary"]
        if lead:
            resume = stage.begin(force=name in forced)
            console.rule(f"[bold]{name}")
        sync()
        summary, failed = None, None
        if lead or every_rank:
            books = ledger.stage(name, resume=resume) if lead and timed else contextlib.nullcontext()
            try:
                with books, (contextlib.nullcontext() if every_rank else single_process()):
                    summary = fn(stage.dir)
            except BaseException as e:
                if every_rank or world == 1:
                    raise  # every rank is in it: the launcher stops the job
                failed = e
        if share(f"{type(failed).__name__}: {failed}" if lead and failed else None) is not None:
            if failed is not None:
                raise failed
            raise P2DError(f"stage {name} failed on rank 0; see its output")
        if lead:
            stage.finish(summary)
        sync()
        return summary if lead else stage.state()["summary"]

    proxy = run_stage("proxy", lambda d: {"task_model": make_task_model(cfg.localize_config(), d.parent, progress)})
    loc = run_stage("localize", lambda d: {"heads": str(score_and_select(cfg.localize_config(), proxy["task_model"], d))})
    heads = loc["heads"]
    mined = run_stage("mine", lambda d: mine_pool(cfg.mine_config(heads, proxy["task_model"]), d, progress),
                      every_rank=True)
    subset = mined["outputs"]["selected.jsonl"]
    per_source = [v for k, v in mined["outputs"].items() if k.startswith("selected/")]  # several sources' schemas
    trained = run_stage("train", lambda d: train_model(cfg.train_config(per_source or subset, heads), d, progress),
                        every_rank=True)
    # several ranks: each times its share of the real (ZeRO) plan, so no rank holds what ZeRO splits
    reference = run_stage("reference", lambda d: reference_cost(cfg.reference_config(), d, progress), timed=False,
                          every_rank=world > 1)
    if not lead:
        return {}

    report = aer_report(ledger, reference)
    _count_flops(report, plan, model_cfg, lengths, cfg, mined, read_heads_json(heads).heads, proxy_lengths,
                 target_lengths)
    _observe_rates(report, stages, cfg, model_cfg, mined, run_dir, world)
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


def _same_config_on_every_rank(launch: dict, world: int) -> None:
    """Ranks launched with other options would run other stages: stop every rank, naming the options."""
    import json

    import torch.distributed as dist

    mine = json.loads(json.dumps(launch, default=str))
    every: list = [None] * world
    dist.all_gather_object(every, mine)
    for other, theirs in enumerate(every):
        diff = _differences(every[0], theirs)
        if diff:
            raise P2DError(f"rank {other} was launched with other options than rank 0 ({', '.join(diff[:5])}); "
                           f"every rank of p2d run needs the same command line")


def _differences(a, b, where: str = "") -> list[str]:
    """The dotted names of the fields whose values differ between two config trees."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(a.keys() | b.keys()) for d in _differences(a.get(k), b.get(k), f"{where}{k}.")]
    return [where.rstrip(".")] if a != b else []


def _count_flops(report: dict, plan: dict, model_cfg, lengths, cfg: RunConfig, mined: dict, heads: list,
                 proxy_lengths=None, target_lengths=None) -> None:
    """FLOPs of each stage as it ran (the real subset, heads and target; mining's shortlist lengths as
    assumed) beside the seconds, and the plan's predicted seconds beside the measured ones."""
    import csv

    import numpy as np

    with open(mined["outputs"]["scores.csv"], encoding="utf-8") as f:
        subset = np.flatnonzero([row["selected"] == "1" for row in csv.DictReader(f)])
    flops = stage_flops(Shape.from_config(model_cfg), lengths, cfg.plan_config(), subset=subset,
                        heads=[tuple(h) for h in heads], proxy=proxy_lengths, target=target_lengths)
    for name, stage in report["stages"].items():
        stage["flops"] = flops[name]["flops"]
        stage["planned_seconds"] = plan["stages"][name]["seconds"]
    report["reference"]["flops"] = flops["reference"]["flops"]
    report["reference"]["planned_seconds"] = plan["stages"]["reference"]["seconds"]
    report["total_flops"] = sum(s["flops"] for s in report["stages"].values())
    report["aer_flops"] = report["total_flops"] / flops["reference"]["flops"]
    report["flops_method"] = "p2d.flops (matmul FLOPs of what runs; counted as torch's FLOP counter counts them)"


def _observe_rates(report: dict, stages: dict, cfg: RunConfig, model_cfg, mined: dict, run_dir: Path,
                   world: int) -> None:
    """Each stage's achieved rate, for the next plan of this model here. Not under several processes (the
    plan models one), nor for training and the reference under --max-steps (their FLOPs count epochs)."""
    if world > 1:
        return
    ran = {n: report["stages"][n] for n in ("proxy", "mine")}
    if cfg.train.train.max_steps is None:
        ran |= {"train": report["stages"]["train"], "reference": report["reference"]}
    try:
        observe(Shape.from_config(model_cfg), cfg.plan_config(), mined.get("mining_dtype") == "bfloat16",
                {n: (f"{run_dir}:{stages[n].fingerprint}", s["flops"], s["seconds"]) for n, s in ran.items()})
    except (OSError, ValueError) as e:  # a damaged or unwritable cache costs the next plan's rates, not this report
        console.print(f"[yellow]warning:[/] could not keep the stages' rates for later plans: {e}", highlight=False)


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
        f"- trainable parameters: {report['trainable_params']:,} (scope `{cfg.train.scope}`)",
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
