"""The reference: what full-data, full-parameter training of the whole pool costs, estimated up front.

A short probe on random rows mis-states the cost (its batches pad more than the real, length-grouped
plan does, and machines drift), so the estimate times steps OF the real plan: the epoch's steps
(`p2d.trainer.step_plan`) are sorted by size and `steps` of them are taken at evenly spaced
quantiles. They run twice, widest first, and only the second pass is timed: the first steps of a
process run 10-20% slower than the same steps later (measured on the 2-core EPYC: 60.2 s, 53.8 s,
52.0 s for three passes over the same 12 steps), and a long reference run is almost all steady
state. Per-step seconds are fitted as
a + b·positions + c·Σ rows·width² (padded positions, and attention's quadratic term) with
non-negative coefficients, and the fit is summed over every step of the plan and every epoch. The
interval is a bootstrap over the timed steps (refit, re-sum), so it says how well the probe pins the
cost down; it does not cover drift of the machine after the probe.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy.optimize import nnls

from p2d import P2DError
from p2d.config import option
from p2d.tokens import Tokenized, token_lengths

BOOTSTRAP = 1000


@dataclass
class ReferenceConfig:
    steps: int = option(12, "Steps of the real full-parameter plan timed for the reference estimate (stratified "
                            "by size; each runs once untimed first).", flag="--reference-steps")
    seed: int = 0


def step_features(lengths: list[int], plan: list[list[list[int]]]) -> np.ndarray:
    """[steps, 3]: 1, padded positions, Σ rows·width² of each planned step."""
    rows = []
    for step in plan:
        widths = [(len(mb), max(lengths[i] for i in mb)) for mb in step]
        rows.append([1.0, float(sum(n * w for n, w in widths)), float(sum(n * w * w for n, w in widths))])
    return np.array(rows)


def stratified(features: np.ndarray, count: int) -> np.ndarray:
    """Indices of `count` steps at evenly spaced quantiles of size (positions), smallest to largest."""
    order = np.argsort(features[:, 1], kind="stable")
    picks = np.unique(np.round(np.linspace(0, len(order) - 1, min(count, len(order)))).astype(int))
    return order[picks]


def fit_total(x: np.ndarray, y: np.ndarray, plan: np.ndarray) -> float:
    """Σ over the plan of the non-negative least-squares fit seconds ~ x (columns scaled for conditioning)."""
    scale = np.maximum(np.abs(x).max(0), 1e-12)
    coef, _ = nnls(x / scale, y)
    return float(((plan / scale) @ coef).sum())


def estimate(seconds: np.ndarray, timed: np.ndarray, plan: np.ndarray, epochs: int, seed: int = 0) -> dict:
    """The reference estimate and its 90% bootstrap interval from timed steps' seconds and features."""
    total = epochs * fit_total(timed, seconds, plan)
    rng = np.random.default_rng(seed)
    boots = [epochs * fit_total(timed[i], seconds[i], plan)
             for i in (rng.integers(0, len(seconds), len(seconds)) for _ in range(BOOTSTRAP))]
    lo, hi = np.percentile(boots, [5, 95])
    return {"seconds": total, "interval": [float(lo), float(hi)]}


def estimate_reference(model_spec: str, data: Sequence[Tokenized], pad_id: int, config, ref: ReferenceConfig) -> dict:
    """Full-parameter training of all of `data` (tokenized at `config.max_length`, packed or not) for
    `config`'s epochs: timed steps of its plan, fitted, summed.

    Under a launcher with a DeepSpeed config every rank times the same number of steps of its own
    share of the plan (the ranks step together, as in real training, each loading only its ZeRO-3
    partition); rank 0's fit, summed over its share, is the estimate.
    """
    from p2d.geometry import AttentionGeometry
    from p2d.masking import apply_scope
    from p2d.models import load_model
    from p2d.trainer import launch_ranks, partitioned_loading, step_plan, time_steps

    lengths = token_lengths(data)
    if max(lengths) > config.max_length:
        raise P2DError(f"reference: samples of up to {max(lengths)} tokens, but training cuts at {config.max_length}")
    world, rank = launch_ranks(config)
    plan = step_plan(lengths, config, 0, world, rank)
    feats = step_features(lengths, plan)
    picks = stratified(feats, ref.steps)
    with partitioned_loading(config):
        model, _ = load_model(model_spec)
        apply_scope(model, AttentionGeometry.from_config(model.config), "full")
        steps = [plan[i] for i in picks]
        seconds = np.array(time_steps(model, data, pad_id, replace(config, save_every=10**9),
                                      steps[::-1] + steps)[len(steps):])
    epochs = config.epochs if config.max_steps is None else 1
    out = estimate(seconds, feats[picks], feats, epochs, ref.seed)
    ranks = f" on each of {world} ranks" if world > 1 else ""
    return {**out, "method": f"{len(picks)} timed steps of the real plan{ranks} (each after an untimed run), "
                             f"fit a + b·positions + c·Σrows·width², summed over {len(plan)} steps × {epochs} epochs (90% bootstrap interval)",
            "epochs": epochs, "steps_per_epoch": len(plan), "timed_steps": len(picks), "samples": len(data),
            "padded_positions": int(epochs * feats[:, 1].sum()), "pool_tokens": int(sum(lengths)), "ranks": world}
