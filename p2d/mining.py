"""Affinity mining: score every pool sample by how much it looks like the target domain, keep the top.

The target set is summarised by spherical k-means prototypes (FAISS) of its L2-normalised
features; a pool sample's affinity is its cosine to the NEAREST prototype (max, not mean: a
domain with several sub-styles should admit a sample close to any one of them). The prototypes
are what gets indexed (k <= 16 vectors) and the pool is streamed through as queries with
k = n_prototypes, so the search is exact, linear in the pool, and never near GPU FAISS's 2048
results-per-query limit. The pool-sized index is the near-duplicate index over kept samples,
which is where `index` (flat / IVF) applies.

Selectors (one place to add another: `SELECTORS` and the branch in `mine`):
- `p2d`: ALPS-head affinity with the quality signal folded in (below).
- `p2d-paper`: ALPS-head affinity alone, the P2D paper's method.
- `rds`: RDS+ (Ivison et al. 2025): position-weighted mean of the base model's last-layer hidden
  states over the whole sample, ranked by the max cosine to any target sample.
- `ifd`: Superfiltering: drop IFD >= 1, keep the highest IFD (target-agnostic).
- `random`, `embedding-mid`, `embedding-last` (mean hidden state, affinity to prototypes).

Quality signals folded into `p2d`:
- `nll` (a high response loss under the base model is worse): score = pct(affinity) -
  quality_weight * pct(nll), with pct the rank percentile in [0, 1], so the two signals are
  commensurable whatever their scales.
- `ifd-rank` (the default): affinity shortlists SHORTLIST x the subset; a response-only pass of
  the base model over the shortlist gives each sample's IFD (response loss with the instruction /
  without it), and within the shortlist score = pct(affinity) - quality_weight * pct(IFD). A swapped
  answer is one its instruction does not help predict (IFD near 1); ranking by IFD only inside the
  shortlist keeps it from pulling in easy off-domain rows. In the selection benchmark this kept 2
  corrupted rows of 120 where affinity alone kept 15.
- `reducible` (RHO-loss style: base response loss minus the proxy task model's), shortlisted the
  same way, higher is better. Measured worse: the absolute loss drop is largest on high-loss rows,
  swapped answers among them.
- `ifd` (instruction-following difficulty, loss with / loss without the instruction): a filter, as
  in Cherry and Superfiltering. A sample with IFD >= 1 (the instruction does not help predict the
  response) ranks below every other; the rest rank by affinity alone.
A sample with no quality value counts as worst. Ties break by sample id.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import faiss
import numpy as np
import torch

from p2d import P2DError
from p2d.features import extract_features, nll_pass, response_only, start_token
from p2d.geometry import AttentionGeometry
from p2d.tokens import IGNORE, Rows, Tokenized, sample_ids, token_lengths

SELECTORS = ("p2d", "p2d-paper", "rds", "ifd", "random", "embedding-mid", "embedding-last")
QUALITIES = ("none", "nll", "ifd", "ifd-rank", "reducible")
# quality_weight when none is given: nll as measured in the mining benchmark, the others in the selection one
QUALITY_WEIGHT = {"nll": 0.5, "ifd-rank": 1.0, "reducible": 1.0}
# signals read only on the affinity shortlist, and their direction there (+1: higher is better)
SHORTLISTED = {"ifd-rank": -1.0, "reducible": 1.0}
SHORTLIST = 3  # the second pass reads the top SHORTLIST x subset-size samples by affinity
HEAD_SETS = ("alps", "random", "discriminative")
INDEXES = ("auto", "flat", "ivf")  # auto: ivf above IVF_ABOVE pool rows
IVF_ABOVE = 200_000
MAX_PROTOTYPES = 16
SEPARATION_SAMPLE = 256
# auto: facility-quality where the selector folds in a shortlisted quality signal (p2d's default), else
# none, so baselines (rds, ifd, random, p2d-paper) select as published
DIVERSITIES = ("auto", "none", "facility", "facility-quality")
FOLDS_QUALITY = ("p2d", "embedding-mid", "embedding-last")
NEIGHBORS = 32  # facility location's k-nearest-neighbour graph
DIVERSE_POOL = 2  # facility location picks the subset from the top DIVERSE_POOL x subset-size by score


@dataclass
class MineResult:
    ids: list[str]  # pool order
    affinity: np.ndarray  # cosine to the nearest target prototype (NaN for the random selector)
    quality: np.ndarray | None
    score: np.ndarray
    rank: np.ndarray  # 1 = best, by (score desc, id asc)
    selected: np.ndarray  # bool
    summary: dict = field(default_factory=dict)
    features: np.ndarray | None = None  # [N, dim] pool features the selector used (None for random)


def n_selected(data_frac: float, n_pool: int) -> int:
    if not (isinstance(data_frac, (int, float)) and 0 < data_frac <= 1):
        raise P2DError(f"--data-frac must be in (0, 1], got {data_frac!r}")
    return math.ceil(data_frac * n_pool)


def _gpu(index: faiss.Index) -> faiss.Index:
    return faiss.index_cpu_to_all_gpus(index) if faiss.get_num_gpus() > 0 else index


def _normalized(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32).copy()
    faiss.normalize_L2(x)
    return x


def prototypes(target: np.ndarray, seed: int = 0) -> np.ndarray:
    """Spherical k-means centroids of the usable (non-zero) target rows, k = min(16, n // 4) >= 1."""
    target = np.asarray(target, dtype=np.float32)
    target = _normalized(target[np.linalg.norm(target, axis=1) > 0])
    if not len(target):
        raise P2DError("the target set has no usable samples (no rows, or none with response tokens)")
    k = max(1, min(MAX_PROTOTYPES, len(target) // 4))
    km = faiss.Kmeans(target.shape[1], k, niter=25, seed=seed, spherical=True, min_points_per_centroid=1,
                      gpu=faiss.get_num_gpus() > 0)
    km.train(target)
    return _normalized(km.centroids)


def affinity(pool: np.ndarray, protos: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Max cosine of each pool row to the prototypes; -1 (the minimum) for rows with no features.

    The pool is streamed in chunks, so a memory-mapped pool larger than memory works.
    """
    index = _gpu(faiss.IndexFlatIP(protos.shape[1]))
    index.add(protos)
    out = np.empty(len(pool), dtype=np.float32)
    for s in range(0, len(pool), chunk):
        x = np.asarray(pool[s: s + chunk], dtype=np.float32)
        usable = np.linalg.norm(x, axis=1) > 0
        sims, _ = index.search(_normalized(x), 1)  # the nearest prototype; k = 1 <= 2048
        out[s: s + chunk] = np.where(usable, sims[:, 0], -1.0)
    return out


IFD_MAX = 1.0  # IFD at or above this: the instruction does not help, the pair is likely broken


def ifd_broken(ifd: np.ndarray) -> np.ndarray:
    """Samples the ifd filter drops: IFD >= IFD_MAX, or no value (NaN)."""
    return ~(ifd < IFD_MAX)


def combine(affinity: np.ndarray, quality: np.ndarray | None, quality_weight: float, kind: str = "nll") -> np.ndarray:
    """The ranking score from affinity and an optional quality signal (see the module docstring).

    For the SHORTLISTED kinds, `quality` is NaN outside the shortlist: those samples rank below
    every shortlisted one, by affinity.
    """
    aff = _pct(affinity)
    if quality is None:
        return aff
    if kind == "ifd":
        return aff - 2.0 * ifd_broken(quality)  # below every kept sample, still ordered by affinity
    if kind in SHORTLISTED:
        listed = ~np.isnan(quality)
        out = aff - 2.0
        if listed.any():
            out[listed] = _pct(affinity[listed]) + SHORTLISTED[kind] * quality_weight * _pct(quality[listed])
        return out
    q = np.where(np.isnan(quality), np.inf, quality)  # no value = worst
    return aff - quality_weight * _pct(q)


def shortlist(affinity: np.ndarray, count: int) -> np.ndarray:
    """Indices of the SHORTLIST * count samples of highest affinity (ties by index), sorted."""
    order = np.lexsort((np.arange(len(affinity)), -np.asarray(affinity, dtype=np.float64)))
    return np.sort(order[: min(len(affinity), SHORTLIST * count)])


def ifd_score(ifd: np.ndarray) -> np.ndarray:
    """Superfiltering's rank: the highest IFD below 1 first; broken or missing values last."""
    return np.where(ifd_broken(ifd), -1.0, np.nan_to_num(ifd, nan=-1.0))


def diversify(ids: list[str], score: np.ndarray, features: np.ndarray, count: int,
              excluded: np.ndarray | None = None) -> np.ndarray:
    """Scores whose top `count` are facility location's picks among the DIVERSE_POOL x count best.

    `excluded` rows never become candidates. The picks rank first, in greedy order (most coverage
    first); every other sample keeps its score below them, so scores.csv still ranks the whole pool.
    """
    order = rank_order(ids, score)
    if excluded is not None:
        order = order[~excluded[order]]
    cand = order[: min(len(order), DIVERSE_POOL * count)]
    picks = cand[facility_location(_rows(features, cand), count)]
    out = np.asarray(score, dtype=np.float64).copy()
    out[picks] = out.max() + 1.0 + (count - np.arange(len(picks))) / count
    return out


def worst_third(quality: np.ndarray, kind: str) -> np.ndarray:
    """Rows whose shortlisted quality value is in the worst third of the shortlist (NaN: not shortlisted)."""
    signed = SHORTLISTED[kind] * quality
    listed = ~np.isnan(signed)
    cut = np.quantile(signed[listed], 1 / 3) if listed.any() else np.inf
    return listed & (signed < cut)


def facility_location(features: np.ndarray, count: int, neighbors: int = NEIGHBORS) -> np.ndarray:
    """Greedy facility location: `count` rows (greedy order) that best cover all rows by cosine.

    Maximises sum_i max_{j in S} max(0, cos(i, j)) over a k-nearest-neighbour graph (FAISS, k =
    `neighbors`), with lazy greedy: a candidate's gain can only shrink, so a stale gain that still
    tops the heap is exact. O(n k log n): a shortlist of 10^5-10^6 rows stays cheap. Ties break by
    row index, so the result is deterministic.
    """
    import heapq

    x = _normalized(features)
    n = len(x)
    k = min(n, neighbors + 1)  # the row itself comes back as its own nearest neighbour
    index = _gpu(faiss.IndexFlatIP(x.shape[1]))
    index.add(x)
    sims, nbrs = index.search(x, k)
    sims = np.maximum(sims, 0.0).astype(np.float64)
    best = np.zeros(n)

    def gain(j: int) -> float:
        return float(np.maximum(sims[j] - best[nbrs[j]], 0.0).sum())

    heap = [(-gain(j), j) for j in range(n)]
    heapq.heapify(heap)
    chosen: list[int] = []
    while heap and len(chosen) < count:
        _, j = heapq.heappop(heap)
        g = gain(j)
        if heap and g < -heap[0][0] - 1e-12:
            heapq.heappush(heap, (-g, j))
            continue
        chosen.append(j)
        valid = nbrs[j] >= 0
        best[nbrs[j][valid]] = np.maximum(best[nbrs[j][valid]], sims[j][valid])
    return np.array(chosen, dtype=np.int64)


def _rows(features: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """features[idx] as an array, read in ascending row order (sequential on a memory map), returned in idx order."""
    return np.asarray(features[np.sort(idx)])[np.argsort(np.argsort(idx))]


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties averaged."""
    from scipy.stats import rankdata  # here, not at import: scipy.stats takes seconds, and the CLI imports this module

    return rankdata(x, method="average")


def _pct(x: np.ndarray) -> np.ndarray:
    return (_ranks(x) - 1) / max(len(x) - 1, 1)


def rank_order(ids: list[str], score: np.ndarray) -> np.ndarray:
    """Indices by score descending, ties by id ascending (deterministic)."""
    id_rank = np.argsort(np.argsort(np.array(ids, dtype=object), kind="stable"), kind="stable")
    return np.lexsort((id_rank, -np.asarray(score, dtype=np.float64)))


def _dedup_index(dim: int, n_max: int, kind: str, train: np.ndarray) -> faiss.Index:
    if kind == "ivf":
        nlist = max(1, min(int(math.sqrt(n_max)), len(train) // 39 or 1))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(train)
        index.nprobe = max(1, nlist // 16)
        return _gpu(index)
    return _gpu(faiss.IndexFlatIP(dim))


def select(ids: list[str], score: np.ndarray, data_frac: float, *, features: np.ndarray | None = None,
           dedup_threshold: float | None = None, index: str = "flat", chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(rank 1..N, selected mask): the top ceil(data_frac * N) by score, skipping near-duplicates.

    With `dedup_threshold` t, a candidate whose cosine to an already-kept sample is >= t is
    skipped and the next one taken, so the count stays ceil(f*N) unless the pool runs out.
    """
    n = len(ids)
    if n == 0:
        raise P2DError("the pool is empty: nothing to select from")
    count = n_selected(data_frac, n)
    order = rank_order(ids, score)
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(1, n + 1)
    selected = np.zeros(n, dtype=bool)
    if dedup_threshold is None:
        selected[order[:count]] = True
        return rank, selected
    if features is None:
        raise P2DError("dedup needs features (the random selector has none)")
    sample = _normalized(np.asarray(features[np.sort(order[: min(n, 50_000)])]))
    kept = _dedup_index(sample.shape[1], count, index, sample)
    n_kept = 0
    for s in range(0, n, chunk):
        cand = order[s: s + chunk]
        x = _normalized(_rows(features, cand))
        near = kept.search(x, 1)[0][:, 0] >= dedup_threshold if n_kept else np.zeros(len(cand), bool)
        sims = x @ x.T  # within the chunk, earlier (better) candidates win
        take: list[int] = []
        for j in range(len(cand)):
            if n_kept + len(take) >= count:
                break
            if not near[j] and not (take and sims[j, take].max() >= dedup_threshold):
                take.append(j)
        if take:
            selected[cand[take]] = True
            kept.add(x[take])
            n_kept += len(take)
        if n_kept >= count:
            break
    return rank, selected


def separation(target: np.ndarray, other: np.ndarray, folds: int = 5, seed: int = 0) -> float:
    """Cross-validated AUROC of target vs pool along the centroid-difference direction.

    The direction is fitted on k-1 folds and scored on the held-out fold, so a high-dimensional
    head set is not rewarded for separating a few target samples by chance. 0.5 = no separation;
    NaN when either side has fewer than 2 samples (nothing to hold out).
    """
    folds = min(folds, len(target), len(other))
    if folds < 2:
        return math.nan
    rng = np.random.default_rng(seed)
    ft, fo = rng.permutation(len(target)) % folds, rng.permutation(len(other)) % folds
    st, so = np.empty(len(target)), np.empty(len(other))
    for k in range(folds):
        w = target[ft != k].mean(0) - other[fo != k].mean(0)
        st[ft == k], so[fo == k] = target[ft == k] @ w, other[fo == k] @ w
    return auroc(st, so)


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Mann-Whitney AUROC: P(pos > neg), ties counting half."""
    r = _ranks(np.concatenate([pos, neg]))
    return float((r[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def head_separations(target: np.ndarray, other: np.ndarray, geom: AttentionGeometry) -> np.ndarray:
    """[L, H] separation of every head, from all-heads features (blocks in (layer, head) order)."""
    d = geom.head_dim
    return np.array([separation(target[:, i * d:(i + 1) * d], other[:, i * d:(i + 1) * d])
                     for i in range(geom.total_heads)]).reshape(geom.num_layers, geom.num_heads)


def head_set_separation(heads: list[tuple[int, int]], target: np.ndarray, other: np.ndarray,
                        geom: AttentionGeometry) -> float:
    cols = np.concatenate([np.arange((l * geom.num_heads + h) * geom.head_dim, (l * geom.num_heads + h + 1) * geom.head_dim)
                           for l, h in sorted(heads)])
    return separation(target[:, cols], other[:, cols])


def random_heads(geom: AttentionGeometry, count: int, seed: int = 0) -> list[tuple[int, int]]:
    flat = np.random.default_rng(seed).choice(geom.total_heads, size=count, replace=False)
    return sorted((int(i) // geom.num_heads, int(i) % geom.num_heads) for i in flat)


def _rounded(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 4)


def _pool_sample(n: int, seed: int) -> np.ndarray:
    """The seeded pool rows that separation is measured against (the same for every selector)."""
    return np.sort(np.random.default_rng(seed).choice(n, size=min(SEPARATION_SAMPLE, n), replace=False))


def _usable(tokenized: list[Tokenized]) -> list[Tokenized]:
    return [t for t in tokenized if any(lab != IGNORE for lab in t.labels)]


def mine(model, pool: Sequence[Tokenized], target: list[Tokenized], *, data_frac: float, selector: str = "p2d",
         heads: list[tuple[int, int]] | None = None, head_set: str = "alps", n_heads: int | None = None,
         pooling: str = "mean", quality: str = "none", quality_weight: float | None = None, tokenizer=None,
         task_model=None, max_layer: int | None = None, head_report: bool = False, diversity: str = "auto",
         dedup_threshold: float | None = None, index: str = "auto", seed: int = 0, batch_size: int = 16,
         max_tokens: int = 8192, store_dir=None, model_id: str = "", progress: bool = True,
         ranks: tuple[int, int, object] | None = None, feature_dtype: str = "float32") -> MineResult:
    """Score and select pool samples for the domain the target samples define.

    selector: see the module docstring. For "p2d" the heads come from `heads` (ALPS, heads.json),
    or are a `random` or `discriminative` set of the same count (`n_heads` when no ALPS heads are
    given). `quality` applies to "p2d" and the embedding selectors; "reducible" needs `task_model`
    (the proxy fine-tune). The summary reports the separation of target vs a pool sample for the
    features used and, for p2d with `head_report` (always for the random and discriminative head
    sets, which need its all-heads pass), for every head set. `ranks` = (rank, world, barrier)
    splits the pool's extraction (the heavy pass) across processes sharing `store_dir`; every
    process then selects the same subset.
    """
    if selector not in SELECTORS:
        raise P2DError(f"unknown selector {selector!r}; choose one of {', '.join(SELECTORS)}")
    if quality not in QUALITIES:
        raise P2DError(f"unknown quality {quality!r}; choose one of {', '.join(QUALITIES)}")
    if head_set not in HEAD_SETS:
        raise P2DError(f"unknown head set {head_set!r}; choose one of {', '.join(HEAD_SETS)}")
    if diversity not in DIVERSITIES:
        raise P2DError(f"unknown diversity {diversity!r}; choose one of {', '.join(DIVERSITIES)}")
    if diversity == "auto":
        diversity = "facility-quality" if quality in SHORTLISTED and selector in FOLDS_QUALITY else "none"
    if diversity == "facility-quality" and (quality not in SHORTLISTED or selector not in FOLDS_QUALITY):
        raise P2DError(f"--diversity facility-quality needs a shortlisted quality signal ({', '.join(SHORTLISTED)}) "
                       f"and a selector that folds it in (p2d, embedding-*)")
    if index not in INDEXES:
        raise P2DError(f"unknown index {index!r}; choose auto, flat or ivf")
    if not pool:
        raise P2DError("the pool is empty: nothing to select from")
    if selector in ("p2d-paper", "rds", "ifd", "random"):
        quality = "none"  # these are defined without a folded quality signal (ifd is its own signal)
    if quality == "ifd-rank" and tokenizer is None:
        raise P2DError("quality 'ifd-rank' needs the tokenizer (for the start token of the response-only pass)")
    if quality == "reducible" and task_model is None:
        raise P2DError("--quality reducible needs the proxy task model: pass --task-model (or a heads.json "
                       "whose task_model exists)")
    if quality_weight is None:
        quality_weight = QUALITY_WEIGHT.get(quality, 0.5)
    if not math.isfinite(quality_weight):
        raise P2DError(f"--quality-weight must be a finite number, got {quality_weight}")
    count = n_selected(data_frac, len(pool))
    usable_target = _usable(target)
    if not usable_target and selector != "ifd":
        raise P2DError("the target set has no usable samples (no rows, or none with response tokens)")
    index = index if index != "auto" else ("ivf" if len(pool) > IVF_ABOVE else "flat")
    ids = sample_ids(pool)
    summary: dict = {"selector": selector, "counts": {"pool": len(pool), "target": len(usable_target), "selected": count},
                     "pool_tokens": int(sum(token_lengths(pool))),  # what the pool pass reads (the window sets it)
                     "data_frac": data_frac, "pooling": pooling, "quality": quality, "seed": seed,
                     "timings": {}}
    geom = AttentionGeometry.from_config(model.config)
    kw = dict(batch_size=batch_size, max_tokens=max_tokens, progress=progress, model_id=model_id)

    if selector == "random":
        score = np.random.default_rng(seed).random(len(pool))
        rank, selected = select(ids, score, data_frac)
        return MineResult(ids, np.full(len(pool), np.nan), None, score, rank, selected, summary)

    t0 = time.perf_counter()
    last = geom.num_layers - 1
    if selector in ("p2d", "p2d-paper"):
        heads, report = _choose_heads(model, geom, pool, usable_target, heads, head_set, n_heads, seed,
                                      max_layer, head_report, dict(kw, pooling=pooling))
        if report:
            summary["head_sets"] = report
        feat_kw = dict(kind="heads", heads=heads, pooling=pooling)
        summary["heads"] = [list(h) for h in heads]
    elif selector in ("rds", "ifd"):
        feat_kw = dict(kind="hidden", layers=[last], pooling="weighted")
        summary["layers"], summary["pooling"] = [last], "weighted"
    else:
        layer = geom.num_layers // 2 if selector == "embedding-mid" else last
        feat_kw = dict(kind="hidden", layers=[layer], pooling=pooling)
        summary["layers"] = [layer]
    pass_quality = "ifd" if selector == "ifd" else ("nll" if quality in SHORTLISTED else quality)
    rank, world, barrier = ranks or (0, 1, None)
    res = extract_features(model, pool, **feat_kw, **kw, quality=pass_quality, tokenizer=tokenizer,
                           store_dir=store_dir, rank=rank, world=world, barrier=barrier, dtype=feature_dtype)
    summary["timings"]["extract_s"] = round(time.perf_counter() - t0, 3)
    summary["extract_tokens_per_s"] = round(res.tokens_per_s, 1)
    summary["feature_dim"] = int(res.features.shape[1])

    if selector == "ifd":
        t0 = time.perf_counter()
        aff = np.full(len(pool), np.nan)
        qual = res.quality
        score = ifd_score(qual)
        summary["ifd_filtered"] = int(ifd_broken(qual).sum())
    else:
        t0 = time.perf_counter()
        tgt = extract_features(model, usable_target, **feat_kw, **kw)
        summary["timings"]["extract_s"] += round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        # RDS+ ranks by the nearest target sample; the other selectors by the nearest target prototype
        protos = _normalized(np.asarray(tgt.features)) if selector == "rds" else prototypes(tgt.features, seed)
        aff = affinity(res.features, protos)
        summary["n_prototypes"] = len(protos)
        sample = _pool_sample(len(pool), seed)
        summary["separation_auroc"] = _rounded(separation(np.asarray(tgt.features), np.asarray(res.features[sample])))
        qual = res.quality
        if quality in SHORTLISTED:
            listed = shortlist(aff, count)
            t1 = time.perf_counter()
            with torch.inference_mode():
                if quality == "reducible":
                    second, _ = nll_pass(task_model, Rows(listed, pool.__getitem__), batch_size, max_tokens)
                    values = res.quality[listed] - second.numpy()
                else:
                    start = start_token(tokenizer)
                    second, _ = nll_pass(model, Rows(listed, lambda i: response_only(pool[i], start)),
                                         batch_size, max_tokens)
                    values = res.quality[listed] / second.numpy()
            summary["timings"]["shortlist_s"] = round(time.perf_counter() - t1, 3)
            t0 += time.perf_counter() - t1  # index_s counts the index work, not this second pass
            qual = np.full(len(pool), np.nan)
            qual[listed] = values
            summary["shortlist"] = int(len(listed))
        score = combine(aff, qual, quality_weight, quality)
        if diversity != "none":
            excluded = worst_third(qual, quality) if diversity == "facility-quality" else None
            score = diversify(ids, score, res.features, count, excluded)
            summary["diversity"] = {"kind": diversity, "candidates": min(len(pool), DIVERSE_POOL * count),
                                    "neighbors": NEIGHBORS}
    summary["timings"]["index_s"] = round(time.perf_counter() - t0, 3)

    t0 = time.perf_counter()
    rank, selected = select(ids, score, data_frac, features=res.features, dedup_threshold=dedup_threshold, index=index)
    summary["timings"]["select_s"] = round(time.perf_counter() - t0, 3)
    summary["counts"]["selected"] = int(selected.sum())
    summary["index"] = {"prototypes": "flat-ip (exact)", "dedup": index if dedup_threshold is not None else None,
                        "gpu": faiss.get_num_gpus() > 0}
    summary["quality_weight"] = quality_weight if quality in QUALITY_WEIGHT else None
    if quality == "ifd":
        summary["ifd_filtered"] = int(ifd_broken(qual).sum())
    summary["dedup_threshold"] = dedup_threshold
    return MineResult(ids, aff, qual, score, rank, selected, summary, res.features)


def _choose_heads(model, geom: AttentionGeometry, pool: Sequence[Tokenized], target: list[Tokenized],
                  alps: list[tuple[int, int]] | None, head_set: str, n_heads: int | None, seed: int,
                  max_layer: int | None, report: bool, kw: dict) -> tuple[list[tuple[int, int]], dict | None]:
    """The heads to mine with, and (when asked, or needed to pick them) every head set's separation.

    The separation report costs an all-heads pass over the target and a pool sample; ALPS heads
    without the report skip it, since it changes nothing in the selection.

    `max_layer` limits the random and discriminative sets to layers 0..max_layer, so extraction
    stops after that layer: mining then costs about (max_layer + 1) / num_layers of a forward pass.
    """
    alps = sorted(set(map(tuple, alps))) if alps else None
    if head_set == "alps" and not alps:
        raise P2DError("head set 'alps' needs heads (heads.json from `p2d localize`)")
    count = len(alps) if alps else n_heads
    if not count or not 0 < count <= geom.total_heads:
        raise P2DError(f"head set {head_set!r} needs a head count in [1, {geom.total_heads}] (n_heads or heads.json)")
    layers = geom.num_layers if max_layer is None else max_layer + 1
    if not 0 < layers <= geom.num_layers:
        raise P2DError(f"mining max layer must be in [0, {geom.num_layers - 1}], got {max_layer}")
    if count > layers * geom.num_heads:
        raise P2DError(f"{count} heads do not fit in layers 0..{layers - 1} ({layers * geom.num_heads} heads)")
    if head_set == "alps" and max(l for l, _ in alps) >= layers:
        raise P2DError(f"the ALPS heads reach layer {max(l for l, _ in alps)}, beyond the mining max layer {max_layer}")
    if head_set == "alps" and not report:
        return alps, None
    shallow = replace(geom, num_layers=layers)  # the layers the all-heads pass reads
    sample = [pool[i] for i in _pool_sample(len(pool), seed)]
    everything = [(l, h) for l in range(layers) for h in range(geom.num_heads)]
    t = extract_features(model, target, kind="heads", heads=everything, **kw).features
    o = extract_features(model, _usable(sample) or sample, kind="heads", heads=everything, **kw).features
    per_head = head_separations(t, o, shallow)
    best = np.argsort(-np.nan_to_num(per_head.ravel(), nan=0.5), kind="stable")[:count]
    sets = {"random": random_heads(shallow, count, seed),
            "discriminative": sorted((int(i) // geom.num_heads, int(i) % geom.num_heads) for i in best)}
    if alps:
        sets["alps"] = alps
    report = {name: {"heads": [list(h) for h in hs],
                     "separation_auroc": _rounded(head_set_separation(hs, t, o, shallow))
                     if max(l for l, _ in hs) < layers else None}  # ALPS heads beyond max_layer: not measured
              for name, hs in sets.items()}
    report["measure"] = (f"5-fold cross-validated AUROC of target ({len(t)}) vs pool sample ({len(o)}) "
                         "along the centroid-difference direction; 0.5 = none")
    return sets[head_set], report
