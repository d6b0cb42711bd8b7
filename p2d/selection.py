"""Choosing heads from ALPS scores, and heads.json: the contract later stages and users read.

heads.json::

    {"model", "task_model", "metric", "tau", "head_frac", "method", "num_layers", "num_heads",
     "num_kv_heads", "head_dim", "selected": [{"layer", "head", "kv_group", "score", "rank"}]}

Indices are 0-based. `rank` is the head's 1-based rank among *all* heads by score (descending,
ties by (layer, head)), so for `top` it is the position in `selected`, and for `lc`/`random` it
shows how far down the global order a head was taken. `selected` is sorted by rank.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np

from p2d import P2DError
from p2d.geometry import AttentionGeometry
from p2d.io import read_json, write_json

METHODS = ("top", "lc", "random")
REQUIRED_KEYS = ("model", "task_model", "metric", "tau", "head_frac", "num_layers", "num_heads",
                 "num_kv_heads", "selected")
HEAD_KEYS = ("layer", "head", "kv_group", "score", "rank")


def head_count(frac: float, total: int) -> int:
    """ceil(frac * total), robust to float error (0.1 * 270 is 27.000000000000004)."""
    if not 0 < frac <= 1:
        raise P2DError(f"head_frac must be in (0, 1], got {frac}")
    return max(1, math.ceil(round(frac * total, 9)))


def global_order(scores: np.ndarray) -> np.ndarray:
    """Flat head indices by score descending, ties by (layer, head): deterministic."""
    flat = np.asarray(scores, dtype=np.float64).ravel()
    return np.lexsort((np.arange(flat.size), -flat))


def select_heads(scores: np.ndarray, frac: float, method: str = "top", seed: int = 0) -> list[tuple[int, int]]:
    """Choose ceil(frac * L*H) heads, returned as (layer, head) sorted by score descending.

    `top`: global top-k. `lc`: layer-uniform, k // L heads per layer and one more for the layers
    whose best head scores highest, top within each layer. `random`: seeded uniform sample (baseline).
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2 or not np.isfinite(scores).all():
        raise P2DError(f"head scores must be a finite [layers, heads] array, got shape {scores.shape}")
    L, H = scores.shape
    k = head_count(frac, L * H)
    order = global_order(scores)
    if method == "top":
        chosen = order[:k]
    elif method == "lc":
        per_layer = np.full(L, k // L)
        best = scores.max(axis=1)
        per_layer[np.lexsort((np.arange(L), -best))[: k % L]] += 1
        in_layer = [np.lexsort((np.arange(H), -scores[layer]))[: per_layer[layer]] for layer in range(L)]
        picked = {layer * H + h for layer in range(L) for h in in_layer[layer]}
        chosen = [i for i in order if i in picked]
    elif method == "random":
        picked = set(np.random.default_rng(seed).choice(L * H, size=k, replace=False).tolist())
        chosen = [i for i in order if i in picked]
    else:
        raise P2DError(f"unknown head selection method {method!r}; choose one of {', '.join(METHODS)}")
    return [(int(i) // H, int(i) % H) for i in chosen]


@dataclass(frozen=True)
class SelectedHead:
    layer: int
    head: int
    kv_group: int
    score: float
    rank: int


@dataclass(frozen=True)
class HeadSelection:
    model: str
    task_model: str
    metric: str
    tau: float
    head_frac: float
    method: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None
    selected: list[SelectedHead] = field(default_factory=list)

    @property
    def heads(self) -> list[tuple[int, int]]:
        return [(s.layer, s.head) for s in self.selected]


def write_heads_json(path: str | os.PathLike, scores: np.ndarray, selected: list[tuple[int, int]],
                     geom: AttentionGeometry, model: str, task_model: str, metric: str, tau: float,
                     head_frac: float, method: str, template: str | None = None) -> None:
    """Write heads.json atomically (see the module docstring for the contract). `template`: the prompt
    format the proxy task model was trained with (None for a user's task model)."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (geom.num_layers, geom.num_heads):
        raise P2DError(f"scores shape {scores.shape} does not match the model "
                       f"({geom.num_layers} layers x {geom.num_heads} heads)")
    rank = np.empty(scores.size, dtype=np.int64)
    rank[global_order(scores)] = np.arange(1, scores.size + 1)
    rows = [{"layer": int(layer), "head": int(head), "kv_group": geom.kv_group(head),
             "score": float(scores[layer, head]), "rank": int(rank[layer * geom.num_heads + head])}
            for layer, head in selected]
    rows.sort(key=lambda r: r["rank"])
    write_json(path, {"model": str(model), "task_model": str(task_model), "metric": metric, "tau": float(tau),
                      "head_frac": float(head_frac), "method": method, "template": template, **geom.as_dict(),
                      "selected": rows})


def read_heads_json(path: str | os.PathLike, geom: AttentionGeometry | None = None) -> HeadSelection:
    """Read and validate heads.json; with `geom`, also check it was made for that model."""
    try:
        data = read_json(path)
    except OSError as e:
        raise P2DError(f"cannot read heads file {path}: {e}") from e
    except ValueError as e:
        raise P2DError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise P2DError(f"{path}: expected a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise P2DError(f"{path}: missing key {missing[0]!r}")
    try:
        L, H, G = int(data["num_layers"]), int(data["num_heads"]), int(data["num_kv_heads"])
        head_dim = None if data.get("head_dim") is None else int(data["head_dim"])
        selected = []
        for i, row in enumerate(data["selected"]):
            absent = [k for k in HEAD_KEYS if k not in row]
            if absent:
                raise P2DError(f"{path}: selected[{i}] is missing key {absent[0]!r}")
            selected.append(SelectedHead(int(row["layer"]), int(row["head"]), int(row["kv_group"]),
                                         float(row["score"]), int(row["rank"])))
    except (TypeError, ValueError) as e:
        raise P2DError(f"{path}: malformed value ({e})") from e
    sel = HeadSelection(str(data["model"]), str(data["task_model"]), str(data["metric"]), float(data["tau"]),
                        float(data["head_frac"]), str(data.get("method", "top")), L, H, G, head_dim, selected)
    if geom is not None:
        mine = {"num_layers": L, "num_heads": H, "num_kv_heads": G}
        theirs = {k: v for k, v in geom.as_dict().items() if k in mine}
        if head_dim is not None:
            mine["head_dim"], theirs["head_dim"] = head_dim, geom.head_dim
        if mine != theirs:
            raise P2DError(f"{path} was made for another model: file {mine}, model {theirs}")
    if H <= 0 or G <= 0 or H % G:
        raise P2DError(f"{path}: num_heads={H} is not a multiple of num_kv_heads={G}")
    for i, s in enumerate(selected):
        if not (0 <= s.layer < L and 0 <= s.head < H):
            raise P2DError(f"{path}: selected[{i}] (layer {s.layer}, head {s.head}) is out of range "
                           f"for {L} layers x {H} heads")
        if s.kv_group != s.head // (H // G):
            raise P2DError(f"{path}: selected[{i}] kv_group {s.kv_group} is wrong for head {s.head} "
                           f"(expected {s.head // (H // G)})")
    if len(set(sel.heads)) != len(selected):
        raise P2DError(f"{path}: selected lists a head twice")
    return sel
