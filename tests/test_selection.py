import json

import numpy as np
import pytest

from p2d import P2DError
from p2d.geometry import AttentionGeometry
from p2d.plots import plot_head_scores
from p2d.selection import read_heads_json, select_heads, write_heads_json

GEOM = AttentionGeometry("llama", 30, 9, 3, 64, 576)


@pytest.fixture
def scores():
    return np.random.default_rng(0).random((30, 9))


@pytest.mark.parametrize("frac,k", [(0.1, 27), (1.0, 270), (1e-9, 1), (0.05, 14), (1 / 3, 90)])
@pytest.mark.parametrize("method", ["top", "lc", "random"])
def test_count_is_ceil(scores, frac, k, method):
    chosen = select_heads(scores, frac, method)
    assert len(chosen) == k == len(set(chosen))


def test_top_is_global_top_sorted_with_deterministic_ties():
    scores = np.zeros((4, 3))
    scores[2, 1], scores[0, 2] = 5.0, 3.0
    assert select_heads(scores, 4 / 12) == [(2, 1), (0, 2), (0, 0), (0, 1)]


def test_lc_is_layer_uniform(scores):
    chosen = select_heads(scores, 0.1, "lc")  # 27 over 30 layers: 27 layers get one head
    per_layer = np.bincount([layer for layer, _ in chosen], minlength=30)
    assert sorted(set(per_layer)) == [0, 1]
    best = scores.max(axis=1)
    assert set(np.flatnonzero(per_layer)) == set(np.argsort(-best)[:27])
    assert all(scores[layer, head] == best[layer] for layer, head in chosen)
    chosen = select_heads(scores, 0.2, "lc")  # 54 = 30 + 24
    per_layer = np.bincount([layer for layer, _ in chosen], minlength=30)
    assert sorted(set(per_layer)) == [1, 2]
    assert [scores[layer, head] for layer, head in chosen] == sorted((scores[l, h] for l, h in chosen), reverse=True)


def test_random_is_seeded(scores):
    a = select_heads(scores, 0.1, "random", seed=1)
    assert a == select_heads(scores, 0.1, "random", seed=1)
    assert set(a) != set(select_heads(scores, 0.1, "random", seed=2))
    assert set(a) != set(select_heads(scores, 0.1, "top"))


@pytest.mark.parametrize("frac", [0, 1.5, -1, float("nan")])
def test_bad_head_frac(scores, frac):
    with pytest.raises(P2DError, match="head_frac"):
        select_heads(scores, frac)


def test_unknown_method(scores):
    with pytest.raises(P2DError, match="method"):
        select_heads(scores, 0.1, "best")


def write(path, scores, method="lc"):
    chosen = select_heads(scores, 0.1, method)
    write_heads_json(path, scores, chosen, GEOM, "smollm2-135m", "runs/proxy", "w1", 1.0, 0.1, method)
    return chosen


def test_heads_json_round_trip(scores, tmp_path):
    path = tmp_path / "heads.json"
    chosen = write(path, scores)
    data = json.loads(path.read_text())
    assert {"model", "task_model", "metric", "tau", "head_frac", "num_layers", "num_heads", "num_kv_heads",
            "selected", "method", "head_dim"} <= set(data)
    sel = read_heads_json(path, GEOM)
    assert sel.heads == chosen and sel.method == "lc" and sel.num_kv_heads == 3
    ranks = [s.rank for s in sel.selected]
    assert ranks == sorted(ranks) and ranks[0] == 1
    for s in sel.selected:
        assert s.kv_group == s.head // 3 and s.score == scores[s.layer, s.head]
    top = tmp_path / "top.json"
    write(top, scores, "top")
    assert [s.rank for s in read_heads_json(top).selected] == list(range(1, 28))


def test_heads_json_for_another_model(scores, tmp_path):
    path = tmp_path / "heads.json"
    write(path, scores)
    other = AttentionGeometry("llama", 30, 9, 9, 64, 576)
    with pytest.raises(P2DError, match=r"heads\.json.*another model.*num_kv_heads"):
        read_heads_json(path, other)
    data = json.loads(path.read_text())
    data["selected"][0]["layer"] = 30
    path.write_text(json.dumps(data))
    with pytest.raises(P2DError, match="out of range"):
        read_heads_json(path)


@pytest.mark.parametrize("edit,message", [
    (lambda d: d.pop("num_heads"), "missing key 'num_heads'"),
    (lambda d: d["selected"][1].pop("head"), r"selected\[1\] is missing key 'head'"),
    (lambda d: d["selected"][0].update(kv_group=2, head=0), "kv_group"),
    (lambda d: d.update(num_layers="x"), "malformed"),
])
def test_heads_json_malformed(scores, tmp_path, edit, message):
    path = tmp_path / "heads.json"
    write(path, scores)
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(P2DError, match=message):
        read_heads_json(path)
    path.write_text("{not json")
    with pytest.raises(P2DError, match="heads.json.*JSON"):
        read_heads_json(path)


@pytest.mark.parametrize("shape", [(30, 9), (32, 32)])
def test_plot_head_scores(tmp_path, shape):
    scores = np.random.default_rng(0).random(shape)
    path = tmp_path / "plots" / "heads.png"
    plot_head_scores(scores, select_heads(scores, 0.1), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(path.parent.iterdir()) == [path]
