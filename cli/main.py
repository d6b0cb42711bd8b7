"""`p2d`: localize heads, mine data, train heads, and run the whole pipeline with its cost report."""

from __future__ import annotations

import functools
import shlex
import sys

import click
from rich.console import Console

from p2d import P2DError, __version__
from p2d.cards import DOMAINS
from p2d.masking import PIPELINE_SCOPES, scope_help
from p2d.models import DEFAULT_MODEL
from p2d.pipelines.localize import LocalizeConfig
from p2d.pipelines.mine import MineConfig
from p2d.pipelines.run import RunConfig, STAGE_ORDER, run_options
from p2d.pipelines.train import LR_HELP, TrainRunConfig, default_loop
from p2d.plan import PlanConfig
from p2d.proxy import ProxyConfig
from p2d.tokens import TEMPLATE_HELP, TEMPLATES
from p2d.trainer import TrainConfig

from .options import field_option, field_options, split

console = Console(stderr=True)


def user_errors(fn):
    """Print a P2DError as one clear line (no traceback) and exit with status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except P2DError as e:
            console.print(f"[bold red]error:[/] {e}", soft_wrap=True, highlight=False)
            sys.exit(2)

    return wrapper


def _load_config(ctx: click.Context, _param, path: str | None) -> str | None:
    """--config FILE: a YAML (or JSON) mapping of option names to values, used as the command's defaults."""
    if path is None:
        return None
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        console.print(f"[bold red]error:[/] --config {path}: {e}", soft_wrap=True, highlight=False)
        sys.exit(2)
    names = {flag.lstrip("-").replace("-", "_"): p for p in ctx.command.params if p.name not in ("config", "help")
             for flag in [p.name, *getattr(p, "opts", [])]}  # a key may be an option's name or any of its flags
    if not isinstance(data, dict):
        console.print(f"[bold red]error:[/] --config {path}: expected a mapping of option names to values",
                      highlight=False)
        sys.exit(2)
    unknown = sorted(k for k in data if str(k).replace("-", "_") not in names)
    if unknown:
        console.print(f"[bold red]error:[/] --config {path}: unknown option(s) {', '.join(map(str, unknown))}; "
                      f"see `p2d {ctx.command.name} --help`", soft_wrap=True, highlight=False)
        sys.exit(2)
    params = {names[str(k).replace("-", "_")]: v for k, v in data.items()}
    ctx.default_map = (ctx.default_map or {}) | {  # a repeatable option (--data) also takes one value, as its flag does
        p.name: [v] if getattr(p, "multiple", False) and isinstance(v, str) else v for p, v in params.items()}
    return path


config_option = click.option(
    "--config", type=click.Path(dir_okay=False), default=None, is_eager=True, expose_value=False,
    callback=_load_config, help="YAML file of this command's options (names as the flags, e.g. data-frac: 0.1); "
                                "flags given on the command line override it.")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="p2d")
def main() -> None:
    """p2d: find a domain's attention heads, mine the data they respond to, train only them."""


out_option = click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
# the launchers' flag (deepspeed passes --local_rank); the trainer reads LOCAL_RANK from the environment
local_rank_option = click.option("--local_rank", "--local-rank", "local_rank", type=int, default=None, hidden=True)
# the stage options whose type click cannot read off the field
PATHS = {"heads": {"type": click.Path(dir_okay=False)}, "deepspeed": {"type": click.Path(dir_okay=False)}}
LR = {"lr": {"default": None, "help": LR_HELP}}


def launcher_rank(kw: dict) -> None:
    """The deepspeed launcher passes --local_rank; the trainer reads the environment."""
    import os

    local_rank = kw.pop("local_rank")
    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))


@main.command()
@field_options(LocalizeConfig())
@field_options(ProxyConfig(), only=("samples", "steps", "template"))
@out_option
@config_option
@user_errors
def localize(out: str, **kw) -> None:
    """Score every attention head with ALPS and write heads.json, head_scores.npy, heads.png."""
    from p2d.io import locked_dir
    from p2d.pipelines.localize import localize as run_localize

    cfg = LocalizeConfig(proxy=ProxyConfig(**split(kw, ProxyConfig)), **kw)
    cfg.validate()
    with locked_dir(out):
        timings = run_localize(cfg, out)
    console.print(f"proxy {timings['proxy_seconds']:.1f}s, scoring {timings['localize_seconds']:.1f}s -> {out}/heads.json")


@main.command()
@field_options(MineConfig(), overrides=PATHS)
@out_option
@config_option
@user_errors
def mine(out: str, **kw) -> None:
    """Mine a pool with head-activation affinity; write selected.jsonl, scores.csv, trainer snippets, mine.json."""
    import os

    from p2d.io import locked_dir
    from p2d.pipelines.mine import mine_pool

    cfg = MineConfig(**kw)
    cfg.validate()
    with locked_dir(out):
        mine_pool(cfg, out)
    if os.environ.get("RANK", "0") == "0":
        console.print(f"-> {out}/selected.jsonl")


@main.command()
@field_options(TrainRunConfig, skip=("train",), overrides=PATHS)
@field_options(default_loop(), overrides=PATHS | LR)
@local_rank_option
@out_option
@config_option
@user_errors
def train(out: str, **kw) -> None:
    """Train one model in a scope; write a merged HF checkpoint (DIR/model) and the delta adapter (DIR/adapter)."""
    from p2d.io import locked_dir
    from p2d.pipelines.train import default_lr, train_model

    launcher_rank(kw)
    loop = split(kw, TrainConfig)
    loop["lr"] = default_lr(kw["scope"]) if loop["lr"] is None else loop["lr"]
    cfg = TrainRunConfig(train=default_loop(**loop), **kw)
    cfg.validate()
    with locked_dir(out):
        summary = train_model(cfg, out)
    console.print(f"{summary['steps']} steps in {summary['seconds']:.1f}s ({summary['tokens_per_s']:.0f} tokens/s), "
                  f"final loss {summary['final_loss']:.4f} -> {out}/model")


def run_option_decorators(f):
    """Every option of `p2d run` (pipelines.run.run_options), each as its stage config declares it."""
    parts = RunConfig().parts()
    extra = {"pool": {"help": "The pool to mine (default: the embedded default pool); --data as in `p2d mine`."},
             "scope": {"type": click.Choice(PIPELINE_SCOPES), "help": scope_help(PIPELINE_SCOPES)}}
    for name, (part, field_name) in reversed(run_options().items()):
        aliases = ("--data",) if name == "pool" else ()
        f = field_option(parts[part], field_name, name, *aliases, **(PATHS | LR | extra).get(name, {}))(f)
    return f


@main.command()
@run_option_decorators
@click.option("--from-stage", type=click.Choice(STAGE_ORDER), default=None, help="Redo this stage and every later one.")
@local_rank_option
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Run directory (default: runs/DOMAIN).")
@config_option
@user_errors
def run(out: str | None, from_stage: str | None, **kw) -> None:
    """Run proxy -> localize -> mine -> train -> report; reuse finished stages, resume interrupted ones."""
    from p2d.io import locked_dir
    from p2d.pipelines.run import run_pipeline

    launcher_rank(kw)
    cfg = RunConfig.from_options(**kw)
    cfg.validate()
    out = out or f"runs/{kw['domain']}"
    with locked_dir(out):
        run_pipeline(cfg, out, from_stage, command="p2d " + shlex.join(sys.argv[1:]))


@main.command()
@click.option("--model", default=DEFAULT_MODEL, help="Base model: embedded name, HF directory, .gguf, hub id, or a "
                                                     "config.json file (any size; no weights).")
@field_options(MineConfig(), only=("data", "target", "domain", "fields", "template"),
                overrides={"data": {"help": "The pool (its token lengths are scanned)."},
                           "target": {"help": "The mining target: the subset is assumed as long as its rows (else as "
                                              "the pool's)."}})
@field_options(PlanConfig())
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Write the plan as JSON here.")
@user_errors
def plan(model: str, data: tuple[str, ...], fields: str | None, template: str, out: str | None,
         target: str | None, domain: str | None, **kw) -> None:
    """Predict each stage's FLOPs, seconds and peak memory before running anything."""
    from p2d.pipelines.plan import plan_pool

    cfg = PlanConfig(**kw)
    cfg.validate()
    plan_pool(model, list(data), cfg, out, fields, template, target, domain)


@main.command(name="eval")
@click.argument("model")
@click.option("--domain", type=click.Choice(DOMAINS), required=True, help="Domain whose data card gives the eval sets.")
@click.option("--eval-data", default=None, help="Held-out set (default: the domain card's eval set).")
@click.option("--limit", default=None, type=int, help="Task problems to generate for (pass@1 / exact match).")
@click.option("--nll-limit", default=None, type=int, help="Samples for the held-out NLL.")
@click.option("--no-tasks", is_flag=True, help="Held-out NLL only, no generation.")
@click.option("--template", type=click.Choice(TEMPLATES), default="auto", help=TEMPLATE_HELP)
@click.option("--unsafe-exec", is_flag=True,
              help="Run generated code for pass@1 without the Landlock sandbox (only where the kernel lacks it).")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Write the results as JSON here.")
@user_errors
def eval_cmd(model: str, domain: str, eval_data: str | None, limit: int | None, nll_limit: int | None,
             no_tasks: bool, template: str, unsafe_exec: bool, out: str | None) -> None:
    """Held-out response NLL, plus HumanEval pass@1 (code) or GSM8K exact match (math)."""
    from rich.table import Table

    from p2d.evaluate import evaluate

    res = evaluate(model, domain, eval_source=eval_data, nll_limit=nll_limit, task_limit=limit,
                   tasks=not no_tasks, template=template, out=out, unsafe_exec=unsafe_exec)
    table = Table(title=f"{model} on {domain}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in res.items():
        if isinstance(v, (int, float)):
            table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    console.print(table)


@main.group()
def data() -> None:
    """The embedded default pool and the domain data cards."""


@data.command(name="cards")
@user_errors
def data_cards() -> None:
    """List the domain data cards and which sources resolve here."""
    from rich.table import Table

    from p2d.cards import available_domains, load_card

    table = Table(title="data cards")
    for col in ("domain", "train source used", "seed", "eval", "license"):
        table.add_column(col)
    for d in available_domains():
        card = load_card(d)
        table.add_row(d, card.train_source(), card.seed, str(card.eval_source()), card.license)
    console.print(table)


@data.command(name="pool")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Write the embedded pool as JSONL here.")
@user_errors
def data_pool(out: str) -> None:
    """Build the embedded default pool (code, math, general) and write it as JSONL."""
    from collections import Counter

    from p2d.default_pool import build_pool
    from p2d.io import write_jsonl

    rows = build_pool()
    write_jsonl(out, rows)
    console.print(f"{len(rows)} rows {dict(Counter(r['domain'] for r in rows))} -> {out}")


if __name__ == "__main__":
    main()
