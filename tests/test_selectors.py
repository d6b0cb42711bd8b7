"""Every `p2d mine --selector` on a planted signal with a tiny model, and the reducible-loss quality signal."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import random_model
from p2d import P2DError
from p2d.mining import SHORTLIST, combine, diversify, facility_location, ifd_score, mine, shortlist, worst_third
from p2d.tokens import IGNORE, Tokenized

VOCAB = 256


def sample(id_: str, prompt: list[int], response: list[int]) -> Tokenized:
    return Tokenized(id_, prompt + response, [IGNORE] * len(prompt) + response)


def planted(n_in: int, n_out: int, seed: int = 0) -> tuple[list[Tokenized], np.ndarray]:
    """A shuffled pool: `n_in` rows drawn from tokens 3-6 (the planted domain), the rest from 40-255."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_in + n_out):
        lo, hi = (3, 7) if i < n_in else (40, VOCAB)
        ids = rng.integers(lo, hi, int(rng.integers(12, 20))).tolist()
        rows.append(sample(f"r{i:03d}", ids[:4], ids[4:]))
    perm = rng.permutation(len(rows))
    return [rows[i] for i in perm], perm < n_in


@pytest.mark.parametrize("selector", ["p2d", "p2d-paper", "rds", "embedding-last"])
def test_affinity_selectors_find_the_planted_domain(selector):
    model = random_model(VOCAB)
    pool, is_in = planted(12, 36)
    target, _ = planted(8, 0, seed=5)
    res = mine(model, pool, target, data_frac=0.25, selector=selector,
               heads=[(0, 0), (0, 3), (1, 2), (2, 5), (3, 0), (3, 7)], quality="none", progress=False)
    assert res.selected.sum() == 12
    assert (res.selected == is_in).all()


def test_p2d_paper_is_p2d_without_quality():
    model = random_model(VOCAB)
    pool, _ = planted(12, 36)
    target, _ = planted(8, 0, seed=5)
    kw = dict(data_frac=0.25, heads=[(1, 2), (3, 0)], progress=False)
    paper = mine(model, pool, target, selector="p2d-paper", quality="nll", **kw)
    plain = mine(model, pool, target, selector="p2d", quality="none", **kw)
    assert paper.quality is None and (paper.rank == plain.rank).all()


def test_rds_pools_every_token_weighted_by_position():
    from p2d.features import _pool

    x = torch.tensor([[[1.0], [2.0], [4.0], [8.0]]])
    mask = torch.tensor([[1, 1, 1, 0]])
    weight = torch.tensor([[0, 0, 1, 0]])  # the response: ignored by the weighted pooling, which reads everything
    pooled = _pool(x, weight, mask, "weighted")
    assert pooled.item() == pytest.approx((1 * 1 + 2 * 2 + 3 * 4) / 6)


def test_ifd_keeps_the_hardest_pairs_that_the_instruction_helps():
    ifd = np.array([0.3, 1.4, 0.9, np.nan, 0.6])
    assert list(np.argsort(-ifd_score(ifd), kind="stable")) == [2, 4, 0, 1, 3]
    model = random_model(VOCAB)
    pool, _ = planted(6, 14)
    res = mine(model, pool, [], data_frac=0.25, selector="ifd", tokenizer=Tok(), progress=False)
    kept = res.quality[res.selected]
    assert res.selected.sum() == 5 and (kept < 1).all()
    assert kept.min() >= res.quality[~res.selected & (res.quality < 1)].max()


def copy_task(n: int, swapped: int, seed: int = 0) -> list[Tokenized]:
    """Response = f(last prompt token) repeated; the last `swapped` rows carry another row's response."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        prompt = [int(rng.integers(3, 40)), 3 + i % 12, 3 + i % 12]  # 12 instructions, one noisy token
        rows.append((prompt, [prompt[-1] * 7 + 100] * 3))
    for j in range(n - swapped, n):
        donor = n - swapped + (j - (n - swapped) + 1) % swapped
        rows[j] = (rows[j][0], rows[donor][1])
    return [sample(f"c{i:03d}", p, r) for i, (p, r) in enumerate(rows)]


def trained_copy(base, data: list[Tokenized], steps: int = 150):
    """A task model: `base` fine-tuned on clean rows of the copy task (the proxy run's role)."""
    import copy

    from p2d.tokens import collate

    model = copy.deepcopy(base).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = collate(data, pad_id=0)
    torch.manual_seed(0)
    for _ in range(steps):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


class Tok:
    bos_token_id, eos_token_id = 1, 0


def test_ifd_rank_ranks_swapped_answers_last():
    """The default quality signal: a model that learned the task finds swapped answers unhelped by their instruction."""
    model = trained_copy(random_model(VOCAB), copy_task(48, 0, seed=9))
    pool = copy_task(30, 6)
    target = copy_task(8, 0, seed=3)
    res = mine(model, pool, target, data_frac=0.34, heads=[(1, 2), (3, 0)], quality="ifd-rank", tokenizer=Tok(),
               quality_weight=100.0, progress=False)
    swapped = np.arange(30) >= 24
    assert res.summary["shortlist"] == 30 and np.isfinite(res.quality).all()
    assert res.quality[swapped].min() > res.quality[~swapped].max()
    assert (res.rank[swapped] > 24).all()


def test_reducible_loss_ranks_swapped_answers_last():
    base = random_model(VOCAB)
    task = trained_copy(base, copy_task(48, 0, seed=9))
    pool = copy_task(30, 6)
    target = copy_task(8, 0, seed=3)
    res = mine(base, pool, target, data_frac=0.34, heads=[(1, 2), (3, 0)], quality="reducible", task_model=task,
               quality_weight=100.0, progress=False)
    assert res.summary["shortlist"] == 30  # 3 x 11 >= 30: every row is read by the task model
    swapped = np.arange(30) >= 24
    assert (res.rank[swapped] > 24).all()  # the six swapped rows take the last six ranks
    default = mine(base, pool, target, data_frac=0.34, heads=[(1, 2), (3, 0)], quality="reducible", task_model=task,
                   progress=False)
    assert not default.selected[swapped].any()


def test_reducible_reads_only_the_affinity_shortlist():
    aff = np.array([0.9, 0.1, 0.8, 0.2, 0.7, 0.3])
    listed = shortlist(aff, 1)
    assert SHORTLIST == 3 and listed.tolist() == [0, 2, 4]
    red = np.full(6, np.nan)
    red[listed] = [0.1, 0.5, 0.3]
    score = combine(aff, red, 1.0, "reducible")
    assert list(np.argsort(-score)) == [2, 0, 4, 5, 3, 1]  # the shortlist by both signals, then the rest by affinity
    ifd = combine(aff, red, 2.0, "ifd-rank")  # the same values as IFD: lower is better
    assert list(np.argsort(-ifd)) == [0, 4, 2, 5, 3, 1]


def test_shortlisted_signals_without_their_model_are_clear_errors():
    model = random_model(VOCAB)
    pool, _ = planted(4, 4)
    with pytest.raises(P2DError, match="--task-model"):
        mine(model, pool, pool, data_frac=0.5, heads=[(0, 0)], quality="reducible", progress=False)
    with pytest.raises(P2DError, match="tokenizer"):
        mine(model, pool, pool, data_frac=0.5, heads=[(0, 0)], quality="ifd-rank", progress=False)
    with pytest.raises(P2DError, match="unknown selector"):
        mine(model, pool, pool, data_frac=0.5, heads=[(0, 0)], selector="less", progress=False)
    with pytest.raises(P2DError, match="quality-weight"):
        mine(model, pool, pool, data_frac=0.5, heads=[(0, 0)], quality="nll", quality_weight=float("nan"),
             progress=False)


def blobs(sizes: list[int], dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Tight clusters around random orthogonal-ish centres: (features, cluster of each row)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(sizes), dim)) * 5
    label = np.repeat(np.arange(len(sizes)), sizes)
    return (centres[label] + rng.normal(size=(len(label), dim)) * 0.1).astype(np.float32), label


def test_facility_location_covers_every_cluster():
    x, label = blobs([30, 5, 5])
    picks = facility_location(x, 3)
    assert sorted(label[picks].tolist()) == [0, 1, 2]  # one per cluster, the small ones too
    assert np.array_equal(picks, facility_location(x, 3))  # deterministic
    assert len(set(facility_location(x, 12).tolist())) == 12


def test_diversity_takes_the_subset_from_more_than_the_top_cluster():
    """Top-by-score is all cluster 0; `diversify` covers the 2x candidates, which hold cluster 1 too."""
    x, label = blobs([10, 10, 20], seed=1)
    score = np.where(label == 0, 2.0, np.where(label == 1, 1.0, 0.0)) + np.linspace(0, 0.01, len(label))
    ids = [f"r{i:02d}" for i in range(len(label))]
    top = np.argsort(-score)[:10]
    assert set(label[top]) == {0}
    diverse = diversify(ids, score, x, 10)
    picked = np.argsort(-diverse)[:10]
    assert set(label[picked]) == {0, 1}  # both candidate clusters, nothing from outside the 2x candidates
    rest = np.setdiff1d(np.arange(len(label)), picked)
    assert np.array_equal(np.argsort(-diverse[rest]), np.argsort(-score[rest]))  # the others keep their order


def test_worst_third_by_the_quality_signal_never_becomes_a_candidate():
    ifd = np.array([np.nan, 0.2, 0.9, 0.5, 0.95, 0.3, np.nan])  # NaN: not shortlisted
    assert worst_third(ifd, "ifd-rank").tolist() == [False, False, True, False, True, False, False]
    x, label = blobs([4, 3], seed=2)
    score = np.linspace(1, 0, 7)
    picked = np.argsort(-diversify([f"r{i}" for i in range(7)], score, x, 2, worst_third(ifd, "ifd-rank")))[:2]
    assert not set(picked) & {2, 4}


def test_unknown_diversity_is_an_error():
    with pytest.raises(P2DError, match="diversity"):
        mine(random_model(VOCAB), *planted(2, 2)[:1], planted(2, 0)[0], data_frac=0.5, diversity="dpp",
             progress=False)
    with pytest.raises(P2DError, match="facility-quality needs a shortlisted quality"):
        mine(random_model(VOCAB), *planted(2, 2)[:1], planted(2, 0)[0], data_frac=0.5, quality="nll",
             diversity="facility-quality", progress=False)
