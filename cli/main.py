"""`p2d`: localize heads, mine data, train heads, and run the whole pipeline with its cost report."""

from __future__ import annotations

import functools
import sys

import click
from rich.console import Console

from p2d import P2DError, __version__

console = Console(stderr=True)


def user_errors(fn):
    """Print a P2DError as one clear line (no traceback) and exit with status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except P2DError as e:
            console.print(f"[bold red]error:[/] {e}")
            sys.exit(2)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="p2d")
def main() -> None:
    """p2d: find a domain's attention heads, mine the data they respond to, train only them."""


def model_option(f):
    return click.option("--model", default="smollm2-135m",
                        help="Base model: embedded name, HF directory, .gguf file or hub id.")(f)


def proxy_options(f):
    for opt in reversed([
        click.option("--task-model", default=None, help="A ready fine-tuned model of the same architecture."),
        click.option("--domain", type=click.Choice(["code", "math", "general"]), default=None,
                     help="Domain whose data card gives the proxy data."),
        click.option("--proxy-data", default=None, help="Data file (or hub id) for the proxy fine-tune."),
        click.option("--proxy-samples", default=64, help="Samples in the proxy fine-tune."),
        click.option("--proxy-steps", default=16, help="Optimizer steps of the proxy fine-tune."),
        click.option("--head-frac", default=0.1, type=float, help="Fraction r of heads kept: top ceil(r*n)."),
        click.option("--metric", type=click.Choice(["w1", "kl", "cosine", "euclidean"]), default="w1"),
        click.option("--variant", type=click.Choice(["alps", "qkv-concat"]), default="alps"),
        click.option("--head-method", type=click.Choice(["top", "lc", "random"]), default="top",
                     help="top: global top-k (ALPS); lc: same count per layer; random: baseline."),
    ]):
        f = opt(f)
    return f


def localize_config(kw: dict):
    from p2d.pipelines.localize import LocalizeConfig
    from p2d.proxy import ProxyConfig

    return LocalizeConfig(model=kw["model"], task_model=kw["task_model"], domain=kw["domain"],
                          proxy_data=kw["proxy_data"],
                          proxy=ProxyConfig(samples=kw["proxy_samples"], steps=kw["proxy_steps"]),
                          head_frac=kw["head_frac"], metric=kw["metric"], variant=kw["variant"],
                          method=kw["head_method"])


@main.command()
@model_option
@proxy_options
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@user_errors
def localize(out: str, **kw) -> None:
    """Score every attention head with ALPS and write heads.json, head_scores.npy, heads.png."""
    from p2d.pipelines.localize import localize as run_localize

    timings = run_localize(localize_config(kw), out)
    console.print(f"proxy {timings['proxy_seconds']:.1f}s, scoring {timings['localize_seconds']:.1f}s -> {out}/heads.json")


if __name__ == "__main__":
    main()
