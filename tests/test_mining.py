import math

import numpy as np
import pytest

from conftest import random_model, random_samples
from p2d import P2DError
from p2d.mining import affinity, auroc, combine, mine, prototypes, select, separation
from p2d.tokens import IGNORE, PackedTokens, Tokenized

tiny_model = random_model
samples = random_samples


def clusters(n_a: int, n_b: int, dim: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    ca, cb = rng.normal(size=dim), rng.normal(size=dim)
    a = ca + 0.3 * rng.normal(size=(n_a, dim))
    b = cb + 0.3 * rng.normal(size=(n_b, dim))
    return a.astype(np.float32), b.astype(np.float32), ca


def test_planted_domain_is_selected():
    a, b, ca = clusters(30, 70)
    pool = np.concatenate([b[:35], a, b[35:]])
    is_a = np.r_[np.zeros(35, bool), np.ones(30, bool), np.zeros(35, bool)]
    target = ca + 0.3 * np.random.default_rng(9).normal(size=(12, 32)).astype(np.float32)
    ids = [f"p{i:03d}" for i in range(100)]
    aff = affinity(pool, prototypes(target))
    rank, sel = select(ids, combine(aff, None, 0.5), 0.3)
    assert sel.sum() == 30 and (sel == is_a).all()
    assert sorted(rank.tolist()) == list(range(1, 101))


@pytest.mark.parametrize("frac,n", [(0.1, 7), (0.5, 7), (1.0, 7), (0.01, 250), (0.333, 10)])
def test_exact_count(frac, n):
    ids = [f"x{i}" for i in range(n)]
    _, sel = select(ids, np.random.default_rng(0).random(n), frac)
    assert sel.sum() == math.ceil(frac * n)


def test_ties_break_by_id():
    ids = ["d", "b", "a", "c", "e"]
    rank, sel = select(ids, np.array([1.0, 1.0, 1.0, 1.0, 2.0]), 0.6)
    assert rank.tolist() == [5, 3, 2, 4, 1]
    assert sel.tolist() == [False, True, True, False, True]


@pytest.mark.parametrize("frac", [0, 1.5, -0.2, float("nan")])
def test_bad_data_frac(frac):
    with pytest.raises(P2DError, match="data-frac"):
        select(["a"], np.zeros(1), frac)


def test_empty_pool_and_unusable_target():
    with pytest.raises(P2DError, match="pool is empty"):
        select([], np.zeros(0), 0.5)
    with pytest.raises(P2DError, match="no usable samples"):
        prototypes(np.zeros((0, 8), np.float32))
    with pytest.raises(P2DError, match="no usable samples"):
        prototypes(np.zeros((5, 8), np.float32))  # every target row had no response tokens
    model = tiny_model()
    empty = [Tokenized("t0", [4, 5], [IGNORE, IGNORE])]
    with pytest.raises(P2DError, match="no usable samples"):
        mine(model, samples(5), empty, data_frac=0.5, heads=[(0, 0)], progress=False)
    with pytest.raises(P2DError, match="no usable samples"):
        mine(model, samples(5), [], data_frac=0.5, heads=[(0, 0)], progress=False)
    with pytest.raises(P2DError, match="pool is empty"):
        mine(model, [], samples(3), data_frac=0.5, heads=[(0, 0)], progress=False)
    with pytest.raises(P2DError, match="data-frac"):
        mine(model, samples(5), samples(3), data_frac=0, heads=[(0, 0)], progress=False)


def test_dedup_skips_near_duplicates_and_keeps_count():
    a, _, _ = clusters(10, 0, dim=16)
    feats = np.concatenate([a, a[:3] * 1.0001])  # rows 10..12 duplicate rows 0..2
    ids = [f"i{i:02d}" for i in range(13)]
    score = np.r_[np.arange(10, 0, -1), [10.5, 9.5, 8.5]].astype(float)  # duplicates rank high
    for index in ("flat", "ivf"):
        _, sel = select(ids, score, 0.5, features=feats, dedup_threshold=0.999, index=index, chunk=4)
        assert sel.sum() == 7
        assert not (sel[:3] & sel[10:]).any()  # never both copies


def test_quality_folding_demotes_high_loss():
    aff = np.array([0.9, 0.8, 0.7, 0.1])
    nll = np.array([9.0, 1.0, 1.0, 1.0])
    assert combine(aff, None, 0.5).argmax() == 0
    assert combine(aff, nll, 1.0).argmax() == 1
    assert combine(aff, np.array([np.nan, 1, 2, 3]), 1.0)[0] < combine(aff, np.array([np.nan, 1, 2, 3]), 1.0)[1]


def test_ifd_filters_broken_pairs_without_favouring_easy_ones():
    aff = np.array([0.9, 0.8, 0.7, 0.6])
    ifd = np.array([1.2, 0.9, 0.2, np.nan])  # a swapped answer (IFD > 1), a hard and an easy sample, no value
    score = combine(aff, ifd, 0.5, "ifd")
    assert list(np.argsort(-score)) == [1, 2, 0, 3]  # kept samples by affinity, the broken and unknown last


def test_separation_measure():
    a, b, _ = clusters(40, 60)
    assert separation(a, b) > 0.95
    rng = np.random.default_rng(1)
    assert abs(separation(rng.normal(size=(40, 8)), rng.normal(size=(60, 8))) - 0.5) < 0.2
    assert auroc(np.array([2.0, 3.0]), np.array([1.0, 2.0])) == pytest.approx(0.875)
    assert math.isnan(separation(a[:1], b))  # one target sample: nothing to hold out


@pytest.mark.parametrize("selector,head_set", [("p2d", "alps"), ("p2d", "discriminative"), ("p2d", "random"),
                                               ("embedding-mid", "alps"), ("embedding-last", "alps"),
                                               ("random", "alps")])


def test_mine_end_to_end(selector, head_set):
    model = tiny_model()
    pool, target = samples(20, seed=1), samples(6, seed=2)
    res = mine(model, pool, target, data_frac=0.25, selector=selector, heads=[(1, 2), (3, 5)], head_set=head_set,
               quality="nll" if selector == "p2d" else "none", progress=False, seed=3, head_report=True)
    assert res.selected.sum() == 5 and res.ids == [t.id for t in pool]
    assert sorted(res.rank.tolist()) == list(range(1, 21))
    packed = PackedTokens.pack([pool[:7], pool[7:]])  # how `p2d mine` holds a pool: the same selection
    again = mine(model, packed, target, data_frac=0.25, selector=selector, heads=[(1, 2), (3, 5)], head_set=head_set,
                 quality="nll" if selector == "p2d" else "none", progress=False, seed=3)
    assert (again.selected == res.selected).all() and np.array_equal(again.score, res.score)
    s = res.summary
    assert s["counts"] == {"pool": 20, "target": 6, "selected": 5}
    if selector == "p2d":
        assert set(s["head_sets"]) >= {"alps", "random", "discriminative", "measure"}
        assert len(s["heads"]) == 2 and s["feature_dim"] == 16
        assert all(0 <= s["head_sets"][k]["separation_auroc"] <= 1 for k in ("alps", "random", "discriminative"))
        assert res.quality is not None and np.isfinite(res.quality).all()
        assert set(s["timings"]) == {"extract_s", "index_s", "select_s"}


def test_alps_heads_skip_the_separation_pass_unless_asked():
    """The all-heads report pass changes nothing in an ALPS selection, so it runs only on request."""
    from p2d.geometry import decoder_layers

    model = tiny_model()
    calls = [0]
    decoder_layers(model)[0].register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    pool, target = samples(40, seed=1), samples(8, seed=2)
    kw = dict(data_frac=0.25, heads=[(1, 2), (3, 5)], progress=False, batch_size=4)
    plain = mine(model, pool, target, **kw)
    plain_calls, calls[0] = calls[0], 0
    reported = mine(model, pool, target, **kw, head_report=True)
    assert "head_sets" not in plain.summary and "head_sets" in reported.summary
    assert calls[0] > plain_calls  # the report's extra forward passes
    assert (plain.selected == reported.selected).all() and np.array_equal(plain.score, reported.score)


def test_discriminative_without_alps_needs_count():
    model = tiny_model()
    with pytest.raises(P2DError, match="head count"):
        mine(model, samples(5), samples(3), data_frac=0.5, head_set="discriminative", progress=False)
    res = mine(model, samples(8), samples(4), data_frac=0.5, head_set="discriminative", n_heads=3, progress=False)
    assert len(res.summary["heads"]) == 3 and "alps" not in res.summary["head_sets"]


def test_max_layer_keeps_heads_shallow_and_stops_early():
    from p2d.geometry import decoder_layers

    model = tiny_model()
    calls = [0] * 4
    for i, layer in enumerate(decoder_layers(model)):
        layer.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    res = mine(model, samples(12, seed=1), samples(4, seed=2), data_frac=0.25, head_set="discriminative",
               n_heads=3, max_layer=1, progress=False)
    assert all(layer <= 1 for layer, _ in res.summary["heads"])
    assert all(layer <= 1 for layer, _ in res.summary["head_sets"]["random"]["heads"])
    assert calls[2] == calls[3] == 0 and calls[0] > 0
    with pytest.raises(P2DError, match="beyond the mining max layer"):
        mine(model, samples(6), samples(3), data_frac=0.5, heads=[(3, 0)], head_set="alps", max_layer=1,
             progress=False)

