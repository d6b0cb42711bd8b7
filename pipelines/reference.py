"""The reference stage: full-data, full-parameter training of the pool, estimated (default) or run in full."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from p2d import P2DError
from p2d.config import option
from p2d.models import DEFAULT_MODEL
from p2d.pipelines.mine import DEFAULT_POOL
from p2d.reference import ReferenceConfig
from p2d.trainer import TrainConfig


@dataclass
class ReferenceRunConfig:
    pool: str | list[str] = DEFAULT_POOL
    model: str = DEFAULT_MODEL
    train: TrainConfig = field(default_factory=TrainConfig)  # the same loop as p2d's training, on all weights
    estimate: ReferenceConfig = field(default_factory=ReferenceConfig)
    measure: bool = option(False, "Measure full-data full-parameter training in full (train it) instead of "
                                  "estimating it.", flag="--measure-reference")
    template: str = "auto"  # as p2d's training: the reference trains the same tokens
    fields: str | None = None

    def validate(self) -> None:
        if self.estimate.steps <= 0:
            raise P2DError(f"--reference-steps must be positive, got {self.estimate.steps}")


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
