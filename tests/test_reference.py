"""The reference estimate: steps of the real plan, a fit that recovers a known cost model, summed over the plan."""

import numpy as np
import pytest

from conftest import random_model, random_samples
from p2d.reference import estimate, step_features, stratified
from p2d.trainer import TrainConfig, step_plan, time_steps


def test_step_features_count_padded_positions_and_the_attention_term():
    lengths = [5, 3, 8, 8]
    feats = step_features(lengths, [[[0, 1], [2]], [[3]]])
    assert feats.tolist() == [[1.0, 2 * 5 + 8, 2 * 25 + 64], [1.0, 8, 64]]


def test_stratified_steps_span_the_plan_from_smallest_to_largest():
    feats = np.column_stack([np.ones(50), np.random.default_rng(0).permutation(50) + 1.0, np.zeros(50)])
    picks = stratified(feats, 5)
    sizes = feats[picks, 1]
    assert len(picks) == 5 and sizes.min() == 1 and sizes.max() == 50 and (np.diff(sizes) > 0).all()
    assert len(stratified(feats[:3], 12)) == 3  # never more steps than the plan has


def test_fit_recovers_a_known_cost_model_and_sums_the_whole_plan():
    rng = np.random.default_rng(1)
    positions = rng.integers(100, 1000, 200).astype(float)
    plan = np.column_stack([np.ones(200), positions, positions * rng.integers(20, 256, 200)])
    truth = plan @ np.array([0.05, 2e-3, 3e-6])
    picks = stratified(plan, 12)
    out = estimate(truth[picks], plan[picks], plan, epochs=3)
    assert out["seconds"] == pytest.approx(3 * truth.sum(), rel=1e-6)
    noisy = truth[picks] * rng.normal(1, 0.1, len(picks))
    out = estimate(noisy, plan[picks], plan, epochs=3)
    lo, hi = out["interval"]
    assert lo < out["seconds"] < hi and hi - lo > 0


def test_time_steps_runs_the_planned_steps():
    model = random_model().train()
    data = random_samples(12)
    cfg = TrainConfig(batch_size=2, lr=1e-3)
    plan = step_plan([len(t) for t in data], cfg, 0)
    before = [p.detach().clone() for p in model.parameters()]
    seconds = time_steps(model, data, 0, cfg, plan[:3])
    assert len(seconds) == 3
    assert any(not np.array_equal(a.numpy(), b.detach().numpy()) for a, b in zip(before, model.parameters()))
