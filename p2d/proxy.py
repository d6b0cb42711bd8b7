"""The proxy run: a short, cheap fine-tune of the base that gives ALPS a task model to compare against.

Attention q/k/v only, on a small slice of the domain's data: the ALPS paper (Table 10) shows that
10% of the data or of the parameters is enough for the head ranking, so the proxy stays cheap.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from p2d.config import option
from p2d.geometry import AttentionGeometry
from p2d.io import write_json
from p2d.models import load_model, save_model
from p2d.tokens import TEMPLATE_HELP, TEMPLATES, Example, resolve_template, tokenize


@dataclass
class ProxyConfig:
    samples: int = option(64, "Samples in the proxy fine-tune.", flag="--proxy-samples")
    steps: int = option(16, "Optimizer steps of the proxy fine-tune.", flag="--proxy-steps")
    batch_size: int = 4
    lr: float = 1e-4
    max_length: int = 256
    scope: str = "qkv"
    template: str = option("auto", TEMPLATE_HELP, choices=TEMPLATES)  # the prompt format the heads are localized under
    seed: int = 0


def run_proxy(base: str, examples: list[Example], out_dir: str | Path, config: ProxyConfig,
              progress: bool = True, key: str | None = None) -> Path:
    """Fine-tune `base` on the first `config.samples` examples; return the saved task-model directory.

    `key` (what the caller made it from) is recorded in proxy.json, so a later call can tell whether
    the saved task model is still the one its options ask for."""
    from p2d.masking import apply_scope
    from p2d.trainer import TrainConfig, train

    out_dir = Path(out_dir)
    model, tok = load_model(base)
    apply_scope(model, AttentionGeometry.from_config(model.config), config.scope)
    template = resolve_template(config.template, tok)
    data = tokenize(examples[: config.samples], tok, config.max_length, template)
    result = train(model, data, tok.pad_token_id,
                   TrainConfig(lr=config.lr, batch_size=config.batch_size, max_steps=config.steps,
                               max_length=config.max_length, seed=config.seed, save_every=10**9),
                   out_dir / "train", progress=progress, run_key=key, overwrite=True)
    task_dir = out_dir / "task_model"
    save_model(model, tok, task_dir)
    write_json(out_dir / "proxy.json", {"base": base, "samples": len(data), **asdict(config), "template": template,
                                        "key": key,
                                        "train": {"steps": result.steps, "seconds": result.seconds,
                                                  "final_loss": result.final_loss}})
    shutil.rmtree(out_dir / "train", ignore_errors=True)  # its checkpoint only served resumption
    return task_dir
