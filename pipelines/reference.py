"""The reference stage: full-data, full-parameter training of the pool, estimated (default) or run in full."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from p2d.reference import ReferenceConfig
from p2d.trainer import TrainConfig


@dataclass
class ReferenceRunConfig:
    pool: str | list[str]
    model: str
    train: TrainConfig
    estimate: ReferenceConfig = field(default_factory=ReferenceConfig)
    measure: bool = False  # train the whole epoch(s) for real instead of estimating
    template: str = "auto"  # as p2d's training: the reference trains the same tokens
    fields: str | None = None


def reference_cost(cfg: ReferenceRunConfig, out: Path, progress: bool = True) -> dict:
    """{seconds, interval, method, ...}: what the reference costs on this machine."""
    from p2d.data import load_tokens
    from p2d.models import load_tokenizer
    from p2d.pipelines.train import TrainRunConfig, train_model
    from p2d.reference import estimate_reference

    if cfg.measure:
        start = time.perf_counter()
        summary = train_model(TrainRunConfig(data=cfg.pool, model=cfg.model, scope="full", train=cfg.train,
                                             fields=cfg.fields, template=cfg.template), out, progress)
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "interval": [seconds, seconds], "method": "measured: full run",
                "samples": summary["samples"]}
    tok = load_tokenizer(cfg.model)
    pool = load_tokens(cfg.pool, tok, cfg.train.max_length, cfg.template, cfg.fields)
    return estimate_reference(cfg.model, pool, tok.pad_token_id, cfg.train, cfg.estimate)
