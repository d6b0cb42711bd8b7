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
              template: str = "auto") -> tuple[object, Lengths, Lengths | None]:
    """(model config, the pool's token lengths, the proxy data's when given): all a plan reads.
    Without a tokenizer (a bare config.json) lengths are bytes / 4 whatever the template."""
    from p2d.data import load_examples, load_tokens

    config = model_config(model)
    if model.endswith(".json"):
        proxy = scan_bytes(load_examples(proxy_data)) if proxy_data else None
        return config, scan_bytes(load_examples(data, fields=fields)), proxy
    from p2d.models import load_tokenizer

    tok = load_tokenizer(model)
    proxy = scan(load_tokens(proxy_data, tok, 2**31, template)) if proxy_data else None
    return config, scan(load_tokens(data, tok, 2**31, template, fields)), proxy


def plan_pool(model: str, data: str | list[str], cfg: PlanConfig, out: str | Path | None = None, fields: str | None = None,
              template: str = "auto") -> dict:
    """Scan the pool's token lengths, predict each stage, print the table; write plan.json to `out` if given."""
    from p2d.data import pool_spec, sources_of

    config, lengths, _ = scan_pool(model, data, fields, template=template)
    plan = make_plan(config, lengths, cfg)
    plan["model"]["spec"], plan["pool"] = model, pool_spec(sources_of(data))
    console.print(plan_table(plan))
    if out is not None:
        write_json(Path(out), plan)
    return plan
