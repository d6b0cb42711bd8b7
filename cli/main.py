"""`p2d`: localize heads, mine data, train heads, and run the whole pipeline with its cost report."""

from __future__ import annotations

import functools
import shlex
import sys

import click
from rich.console import Console

from p2d import P2DError, __version__
from p2d.alps import METRICS, VARIANTS
from p2d.cards import available_domains
from p2d.features import FEATURE_DTYPES, POOLINGS
from p2d.masking import KV_SCOPES
from p2d.mining import DIVERSITIES, HEAD_SETS, INDEXES, QUALITIES, SELECTORS
from p2d.models import COMPUTE_DTYPES
from p2d.pipelines.run import SCOPES as RUN_SCOPES
from p2d.pipelines.run import STAGE_ORDER
from p2d.pipelines.train import DEFAULT_EPOCHS, DEFAULT_MAX_LENGTH, default_lr
from p2d.pipelines.train import SCOPES as TRAIN_SCOPES
from p2d.plan import PEAK_BF16_TFLOPS
from p2d.selection import METHODS
from p2d.tokens import TEMPLATES

console = Console(stderr=True)
DOMAINS = tuple(available_domains())  # the data cards; every choice list below is its module's constant


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


def template_option(f):
    return click.option("--template", type=click.Choice(TEMPLATES), default="auto",
                        help="Prompt format: auto (the tokenizer's chat template if it has one, else alpaca), chat "
                             "(every assistant turn trained), alpaca (the ALPS paper's), plain.")(f)


def data_option(*names: str, help: str, **kw):
    """A data option that takes several sources (repeat it), read as one pool, each in its own schema."""
    return click.option(*names, multiple=True, help=help + " Repeat it for several sources (one pool).", **kw)


def fields_option(f):
    return click.option("--fields", default=None,
                        help="The data's field map when p2d cannot tell it, e.g. 'instruction=q,output=a'.")(f)


def model_option(f):
    return click.option("--model", default="smollm2-135m",
                        help="Base model: embedded name, HF directory, .gguf file or hub id.")(f)


def proxy_options(f):
    for opt in reversed([
        click.option("--task-model", default=None, help="A ready fine-tuned model of the same architecture."),
        click.option("--domain", type=click.Choice(DOMAINS), default=None,
                     help="Domain whose data card gives the proxy data."),
        click.option("--proxy-data", default=None, help="Data file (or hub id) for the proxy fine-tune."),
        click.option("--proxy-samples", default=64, help="Samples in the proxy fine-tune."),
        click.option("--proxy-steps", default=16, help="Optimizer steps of the proxy fine-tune."),
        click.option("--head-frac", default=0.1, type=float, help="Fraction r of heads kept: top ceil(r*n)."),
        click.option("--metric", type=click.Choice(METRICS), default="w1"),
        click.option("--variant", type=click.Choice(VARIANTS), default="alps"),
        click.option("--head-method", type=click.Choice(METHODS), default="top",
                     help="top: global top-k (ALPS); lc: same count per layer; random: baseline."),
    ]):
        f = opt(f)
    return f


def localize_config(kw: dict):
    from p2d.pipelines.localize import LocalizeConfig
    from p2d.proxy import ProxyConfig

    return LocalizeConfig(model=kw["model"], task_model=kw["task_model"], domain=kw["domain"],
                          proxy_data=kw["proxy_data"],
                          proxy=ProxyConfig(samples=kw["proxy_samples"], steps=kw["proxy_steps"],
                                            template=kw["template"]),
                          head_frac=kw["head_frac"], metric=kw["metric"], variant=kw["variant"],
                          method=kw["head_method"])


@main.command()
@model_option
@proxy_options
@template_option
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@config_option
@user_errors
def localize(out: str, **kw) -> None:
    """Score every attention head with ALPS and write heads.json, head_scores.npy, heads.png."""
    from p2d.pipelines.localize import localize as run_localize

    from p2d.io import locked_dir

    cfg = localize_config(kw)
    cfg.validate()
    with locked_dir(out):
        timings = run_localize(cfg, out)
    console.print(f"proxy {timings['proxy_seconds']:.1f}s, scoring {timings['localize_seconds']:.1f}s -> {out}/heads.json")



def mine_options(f):
    for opt in reversed([
        click.option("--data-frac", default=0.1, type=float, help="Fraction f of the pool kept: top ceil(f*N)."),
        click.option("--target", default=None, help="Target samples that define the domain (default: the card's seed set)."),
        click.option("--mining-heads", type=click.Choice(HEAD_SETS), default="alps",
                     help="Heads whose outputs mine: ALPS (heads.json), random, or those that best separate target from pool."),
        click.option("--mining-max-layer", type=int, default=None,
                     help="Random/discriminative heads only from layers 0..N: extraction stops after layer N."),
        click.option("--head-report", is_flag=True,
                     help="Also measure how well each head set (alps, random, discriminative) separates target from "
                          "pool: one extra all-heads pass over the target and 256 pool rows."),
        click.option("--quality", type=click.Choice(QUALITIES), default="ifd-rank",
                     help="Quality signal folded into p2d's rank: ifd-rank (IFD within an affinity shortlist), nll "
                          "(base response loss), ifd (drop IFD >= 1), reducible (base minus proxy task-model loss on "
                          "the shortlist; needs the task model), or none."),
        click.option("--diversity", type=click.Choice(DIVERSITIES),
                     default="auto",
                     help="auto: facility-quality for the p2d and embedding selectors with ifd-rank or reducible "
                          "quality, none otherwise (baselines select as published). facility: pick the subset that best covers (facility location over the selector's "
                          "features) the top 2x candidates by score, instead of their top 1x; facility-quality: "
                          "the same, never taking a candidate in the shortlist's worst third by the quality signal."),
        click.option("--pooling", type=click.Choice(POOLINGS), default="mean",
                     help="How head features are pooled over a sample (rds always uses weighted)."),
        click.option("--quality-weight", default=None, type=float,
                     help="Weight of the quality rank against affinity (default: 0.5 for nll, 1.0 for ifd-rank and "
                          "reducible)."),
        click.option("--dedup", default=None, type=float, help="Drop samples whose cosine to a kept one is >= this."),
        click.option("--feature-dtype", type=click.Choice(FEATURE_DTYPES), default="float32",
                     help="How the feature store keeps features: float16 halves its disk and memory (large pools)."),
        click.option("--mining-dtype", type=click.Choice(COMPUTE_DTYPES), default="auto",
                     help="Precision of the pool pass: bfloat16 is ~2x faster where the hardware has it (GPUs, "
                          "CPUs with AVX512-BF16 or AMX); auto takes it there and float32 elsewhere."),
        click.option("--selector", type=click.Choice(SELECTORS), default="p2d",
                     help="p2d (head affinity + quality), or a baseline: p2d-paper (head affinity alone), rds "
                          "(RDS+), ifd (Superfiltering), random, embedding-mid/-last."),
    ]):
        f = opt(f)
    return f


@main.command()
@model_option
@click.option("--heads", default=None, type=click.Path(dir_okay=False), help="heads.json from `p2d localize`.")
@data_option("--data", default=["p2d:default"], help="The pool: a data file, a datasets dir, a hub id, or p2d:default.")
@click.option("--domain", type=click.Choice(DOMAINS), default=None)
@mine_options
@click.option("--task-model", default=None,
              help="Proxy task model for --quality reducible (default: the task_model recorded in heads.json).")
@click.option("--index", type=click.Choice(INDEXES), default="auto",
              help="FAISS index for --dedup: flat (exact), ivf (approximate), auto (ivf above 200k rows).")
@click.option("--max-length", default=128, help="Tokens read per sample.")
@click.option("--mining-window", "window", default=None, type=int,
              help="Read each sample's prompt and only its first N response tokens (default: as --max-length allows).")
@template_option
@click.option("--batch-size", default=16)
@fields_option
@click.option("--parquet", is_flag=True, help="Also write selected.parquet.")
@click.option("--seed", default=0)
@click.option("--out", required=True, type=click.Path(file_okay=False))
@config_option
@user_errors
def mine(out: str, **kw) -> None:
    """Mine a pool with head-activation affinity; write selected.jsonl, scores.csv, trainer snippets, mine.json."""
    from p2d.pipelines.mine import MineConfig, mine_pool

    import os

    from p2d.io import locked_dir

    cfg = MineConfig(**kw)
    cfg.validate()
    with locked_dir(out):
        mine_pool(cfg, out)
    if os.environ.get("RANK", "0") == "0":
        console.print(f"-> {out}/selected.jsonl")


def train_options(f):
    for opt in reversed([
        click.option("--epochs", default=DEFAULT_EPOCHS, help="Epochs over the data."),
        click.option("--max-steps", default=None, type=int, help="Optimizer steps (overrides --epochs)."),
        click.option("--lr", default=None, type=float,
                     help="Peak learning rate, cosine to 10% after 10% warmup (default: 1e-3 for heads, lc, random "
                          "and lora scopes, 5e-5 for the others)."),
        click.option("--batch-size", default=4, help="Micro-batch size per process."),
        click.option("--grad-accum", default=1, help="Micro-batches per optimizer step."),
        click.option("--max-length", default=DEFAULT_MAX_LENGTH, help="Tokens per sample."),
        click.option("--weight-decay", default=0.1, type=float),
        click.option("--deepspeed", default=None, type=click.Path(dir_okay=False),
                     help="DeepSpeed JSON config (ZeRO-1/2/3); or launch with the deepspeed launcher."),
        click.option("--save-every", default=50, help="Optimizer steps between resumable checkpoints."),
        click.option("--tensorboard", is_flag=True,
                     help="Also log loss, lr and tokens/s to OUT/tensorboard (needs the tensorboard package)."),
        click.option("--local_rank", "--local-rank", "local_rank", type=int, default=None, hidden=True,
                     help="Set by the deepspeed launcher."),
    ]):
        f = opt(f)
    return f


def launcher_rank(kw: dict) -> None:
    """The deepspeed launcher passes --local_rank; the trainer reads the environment."""
    import os

    local_rank = kw.pop("local_rank")
    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))


def train_config(kw: dict):
    from p2d.trainer import TrainConfig

    launcher_rank(kw)

    lr = kw.pop("lr")
    return TrainConfig(lr=default_lr(kw["scope"]) if lr is None else lr, weight_decay=kw.pop("weight_decay"), batch_size=kw.pop("batch_size"),
                       grad_accum=kw.pop("grad_accum"), epochs=kw.pop("epochs"), max_steps=kw.pop("max_steps"),
                       max_length=kw.pop("max_length"), deepspeed=kw.pop("deepspeed"),
                       save_every=kw.pop("save_every"), tensorboard=kw.pop("tensorboard"), seed=kw.get("seed", 0))


SCOPE_TEXT = {"heads": "only the selected heads' q rows and their KV groups' k/v rows",
              "alps": "those plus every non-attention weight", "random": "heads, given a random heads.json",
              "lc": "heads, given a layer-uniform heads.json", "full": "every weight",
              "no-attn": "every weight outside attention", "lora": "LoRA on q/k/v (--lora-rank)",
              "qkv": "all attention q/k/v"}


def scope_help(scopes: tuple[str, ...]) -> str:
    return "; ".join(f"{s}: {SCOPE_TEXT[s]}" for s in scopes) + "."


@main.command()
@model_option
@click.option("--heads", default=None, type=click.Path(dir_okay=False), help="heads.json (head scopes).")
@data_option("--data", required=True, help="Training data (e.g. a mined selected.jsonl).")
@click.option("--scope", type=click.Choice(TRAIN_SCOPES), default="heads", help=scope_help(TRAIN_SCOPES))
@click.option("--train-o", is_flag=True, help="Also train the selected heads' o_proj columns.")
@click.option("--kv-scope", type=click.Choice(KV_SCOPES), default="shared",
              help="shared: also train the heads' KV groups (k/v rows other query heads read too); none: query "
                   "rows only, so 10%% of heads stays 10%% under heavy GQA.")
@click.option("--lora-rank", default=128)
@click.option("--overwrite", is_flag=True, help="Discard a checkpoint in --out that another run (other data or options) wrote.")
@fields_option
@template_option
@train_options
@click.option("--seed", default=0)
@click.option("--out", required=True, type=click.Path(file_okay=False))
@config_option
@user_errors
def train(out: str, **kw) -> None:
    """Train one model in a scope; write a merged HF checkpoint (DIR/model) and the delta adapter (DIR/adapter)."""
    from p2d.pipelines.train import TrainRunConfig, train_model

    from p2d.io import locked_dir

    cfg = train_config(kw)
    kw.pop("seed")
    run_cfg = TrainRunConfig(train=cfg, **kw)
    run_cfg.validate()
    with locked_dir(out):
        summary = train_model(run_cfg, out)
    console.print(f"{summary['steps']} steps in {summary['seconds']:.1f}s ({summary['tokens_per_s']:.0f} tokens/s), "
                  f"final loss {summary['final_loss']:.4f} -> {out}/model")


@main.command()
@click.option("--domain", type=click.Choice(DOMAINS), default="code")
@model_option
@click.option("--task-model", default=None, help="A ready fine-tuned model instead of the proxy run.")
@data_option("--pool", "--data", "pool", default=["p2d:default"],
             help="The pool to mine (default: the embedded default pool); --data as in `p2d mine`.")
@fields_option
@click.option("--proxy-data", default=None, help="Proxy data (default: the domain card's training data).")
@click.option("--proxy-samples", default=64)
@click.option("--proxy-steps", default=16)
@click.option("--head-frac", default=0.1, type=float, help="Fraction r of heads kept: top ceil(r*n).")
@click.option("--head-method", type=click.Choice(METHODS), default="top")
@mine_options
@click.option("--scope", type=click.Choice(RUN_SCOPES), default="heads", help=scope_help(RUN_SCOPES))
@click.option("--kv-scope", type=click.Choice(KV_SCOPES), default="shared",
              help="none: train only the heads' query rows, never a KV group shared with other heads.")
@click.option("--train-o", is_flag=True, help="Also train the selected heads' o_proj columns.")
@click.option("--lora-rank", default=128, help="Rank of --scope lora.")
@click.option("--mine-max-length", default=128, help="Tokens read per sample when mining (prompt and response start).")
@click.option("--mining-window", default=None, type=int,
              help="When mining, read each sample's prompt and only its first N response tokens.")
@template_option
@train_options
@click.option("--measure-reference", is_flag=True, help="Measure full-data full-parameter training in full.")
@click.option("--reference-steps", default=12,
              help="Steps of the real full-parameter plan timed for the reference estimate (stratified by size).")
@click.option("--eval", "evaluate", is_flag=True, help="Evaluate base vs trained on the domain's eval set.")
@click.option("--eval-limit", default=20, help="Task problems evaluated with --eval (CPU generation is slow).")
@click.option("--from-stage", type=click.Choice(STAGE_ORDER), default=None,
              help="Redo this stage and every later one.")
@click.option("--seed", default=0)
@click.option("--out", default=None, type=click.Path(file_okay=False), help="Run directory (default: runs/DOMAIN).")
@config_option
@user_errors
def run(out: str | None, from_stage: str | None, **kw) -> None:
    """Run proxy -> localize -> mine -> train -> report; reuse finished stages, resume interrupted ones."""
    from p2d.io import locked_dir
    from p2d.pipelines.run import RunConfig, run_pipeline

    launcher_rank(kw)
    cfg = RunConfig.from_options(**kw)
    cfg.validate()
    out = out or f"runs/{kw['domain']}"
    with locked_dir(out):
        run_pipeline(cfg, out, from_stage, command="p2d " + shlex.join(sys.argv[1:]))


@main.command()
@click.option("--model", default="smollm2-135m",
              help="Base model: embedded name, HF directory, .gguf, hub id, or a config.json file (any size; no weights).")
@data_option("--data", default=["p2d:default"], help="The pool (its token lengths are scanned).")
@click.option("--target", default=None,
              help="The mining target: the subset is assumed as long as its rows (else as the pool's).")
@click.option("--domain", type=click.Choice(DOMAINS), default=None, help="Its data card's seed set as the target.")
@fields_option
@template_option
@click.option("--data-frac", default=0.1, type=float, help="Fraction of the pool kept.")
@click.option("--head-frac", default=0.1, type=float, help="Fraction of heads trained.")
@click.option("--scope", type=click.Choice(RUN_SCOPES), default="heads", help=scope_help(RUN_SCOPES))
@click.option("--epochs", default=DEFAULT_EPOCHS, help="Epochs, for p2d's training and for the reference alike.")
@click.option("--max-length", default=DEFAULT_MAX_LENGTH, help="Training tokens per sample.")
@click.option("--mining-dtype", "mine_dtype", type=click.Choice(COMPUTE_DTYPES), default="auto",
              help="Precision mining will compute in (as `p2d mine --mining-dtype`).")
@click.option("--hardware", type=click.Choice(("calibrate", *PEAK_BF16_TFLOPS)), default="calibrate",
              help="calibrate: measure this machine once (cached); or a GPU's bf16 peak times --mfu.")
@click.option("--mfu", default=0.4, type=float, help="Model FLOP utilisation assumed with a named GPU.")
@click.option("--out", default=None, type=click.Path(dir_okay=False), help="Write the plan as JSON here.")
@user_errors
def plan(model: str, data: tuple[str, ...], fields: str | None, template: str, out: str | None, max_length: int,
         target: str | None, domain: str | None, **kw) -> None:
    """Predict each stage's FLOPs, seconds and peak memory before running anything."""
    from p2d.pipelines.plan import plan_pool
    from p2d.plan import PlanConfig

    cfg = PlanConfig(train_max_length=max_length, **kw)
    cfg.validate()
    plan_pool(model, list(data), cfg, out, fields, template, target, domain)


@main.command(name="eval")
@click.argument("model")
@click.option("--domain", type=click.Choice(DOMAINS), required=True)
@click.option("--eval-data", default=None, help="Held-out set (default: the domain card's eval set).")
@click.option("--limit", default=None, type=int, help="Task problems to generate for (pass@1 / exact match).")
@click.option("--nll-limit", default=None, type=int, help="Samples for the held-out NLL.")
@click.option("--no-tasks", is_flag=True, help="Held-out NLL only, no generation.")
@template_option
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
