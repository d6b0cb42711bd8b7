"""`p2d plan`: predict every stage's cost before running (p2d/plan.py), print it and write plan.json."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from p2d import P2DError
from p2d.io import write_json
from p2d.plan import Lengths, PlanConfig, make_plan, plan_table, scan, scan_bytes

console = Console(stderr=True)


def model_config(spec: str):
    """A config.json file (any size, no weights needed), or a model spec p2d can resolve."""
    if spec.endswith(".json"):
        try:
            return json.loads(Path(spec).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise P2DError(f"--model {spec}: cannot read the config: {e}") from e
    from p2d.models import load_config

    return load_config(spec)


def scan_pool(model: str, data: str | list[str], fields: str | None = None, proxy_data: str | None = None,
              template: str = "auto", target: str | None = None) -> tuple[object, Lengths, Lengths | None, Lengths | None]:
    """(model config, the pool's token lengths, the proxy data's and the mining target's when given): all a
    plan reads. Without a tokenizer (a bare config.json) lengths are bytes / 4 whatever the template."""
    from p2d.data import load_examples, load_tokens

    config = model_config(model)
    if model.endswith(".json"):
        def lengths(source, fields=None):
            return scan_bytes(load_examples(source, fields=fields)) if source else None
    else:
        from p2d.models import load_tokenizer

        tok = load_tokenizer(model)

        def lengths(source, fields=None):
            return scan(load_tokens(source, tok, 2**31, template, fields)) if source else None
    return config, lengths(data, fields), lengths(proxy_data), lengths(target)


def plan_pool(model: str, data: str | list[str], cfg: PlanConfig, out: str | Path | None = None, fields: str | None = None,
              template: str = "auto", target: str | None = None, domain: str | None = None) -> dict:
    """Scan the pool's (and the mining target's: `target`, else `domain`'s seed set) token lengths,
    predict each stage, print the table; write plan.json to `out` if given."""
    from p2d.data import pool_spec
    from p2d.pipelines.mine import MineConfig, target_source

    source = target_source(MineConfig(target=target, domain=domain)) if (target or domain) else None
    config, lengths, _, target_lengths = scan_pool(model, data, fields, template=template, target=source)
    plan = make_plan(config, lengths, cfg, target=target_lengths)
    plan["model"]["spec"], plan["pool"] = model, pool_spec(data)
    console.print(plan_table(plan))
    if out is not None:
        write_json(Path(out), plan)
    return plan
