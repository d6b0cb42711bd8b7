"""One config tree: every CLI option comes from a config field, with that field's default and help."""

from __future__ import annotations

import dataclasses

import click
import pytest

from p2d import P2DError
from p2d.cli.main import main
from p2d.config import option_fields
from p2d.pipelines.localize import LocalizeConfig
from p2d.pipelines.mine import MineConfig
from p2d.pipelines.run import RunConfig, run_options
from p2d.pipelines.train import TrainRunConfig, default_loop
from p2d.plan import PlanConfig


def cli_defaults(command: str, *args: str) -> dict:
    """The arguments a command's function would get with only `args` on its command line."""
    with main.commands[command].make_context(command, list(args)) as ctx:
        return dict(ctx.params)


def test_every_option_has_help():
    def commands(group: click.Group, prefix: str):
        for name, command in group.commands.items():
            yield f"{prefix} {name}", command
            if isinstance(command, click.Group):
                yield from commands(command, f"{prefix} {name}")

    for name, command in commands(main, "p2d"):
        for p in command.params:
            if isinstance(p, click.Option) and not p.hidden:
                assert p.help, f"{name} {p.opts[0]} has no help text"


def test_cli_defaults_are_the_configs_defaults():
    kw = cli_defaults("mine", "--out", "x")
    kw.pop("out")
    assert MineConfig(**kw) == MineConfig()

    kw = cli_defaults("localize", "--out", "x")
    kw.pop("out")
    proxy = {k: kw.pop(k) for k in ("samples", "steps", "template")}
    assert LocalizeConfig(proxy=dataclasses.replace(LocalizeConfig().proxy, **proxy), **kw) == LocalizeConfig()

    kw = cli_defaults("train", "--out", "x", "--data", "d.jsonl")
    loop = {f.name: kw.pop(f.name) for f in option_fields(default_loop()) if f.name in kw}
    assert loop.pop("lr") is None  # the scope's default
    assert default_loop(**loop) == default_loop()
    kw = {k: v for k, v in kw.items() if k not in ("out", "local_rank")}
    assert TrainRunConfig(**kw) == TrainRunConfig(data="d.jsonl")

    kw = cli_defaults("plan")
    assert PlanConfig(**{k: v for k, v in kw.items() if k in {f.name for f in dataclasses.fields(PlanConfig)}}) \
        == PlanConfig()

    kw = cli_defaults("run")
    for k in ("out", "from_stage", "local_rank"):
        kw.pop(k)
    assert RunConfig.from_options(**kw) == RunConfig()


def test_every_stage_option_is_a_run_option():
    """A field given help in a stage config is settable from `p2d run` (and its config file), and lands there."""
    table = run_options()
    params = {p.name for p in main.commands["run"].params}
    assert set(table) <= params
    parts = RunConfig().parts()
    for name, (part, field_name) in table.items():
        value = getattr(parts[part], field_name)
        # a non-default value of the option's type shows where the option lands
        new = {bool: not value, int: 7, float: 0.25}.get(type(value))
        if new is None or name == "seed":
            continue
        cfg = RunConfig.from_options(**{name: new})
        assert getattr(cfg.parts()[part], field_name) == new, name
    # the stage options the run used to miss
    assert {"mine_batch_size", "metric", "variant", "parquet", "index"} <= set(table)


def test_choices_are_checked_in_library_configs():
    with pytest.raises(P2DError, match="--index must be one of"):
        MineConfig(index="hnsw", domain="code").validate_options()
    with pytest.raises(P2DError, match="--head-method must be one of"):
        LocalizeConfig(method="best", domain="code").validate()
    with pytest.raises(P2DError, match="--mining-dtype must be one of"):
        PlanConfig(mine_dtype="fp8").validate()
    with pytest.raises(P2DError, match="no option 'mining_windows'"):
        RunConfig.from_options(mining_windows=16)
