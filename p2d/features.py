"""Per-sample features from chosen attention heads (or hidden states), and a resumable feature store.

A head's output is its slice of the o_proj input: the part of the attention output that head
writes before the heads are mixed. Pooling it over the response tokens gives one vector per head
per sample; each is L2-normalised so every head weighs the same in cosine affinity.

The forward pass stops right after the deepest layer that is needed (nothing later can change
what was captured), and the LM head runs only on response positions when a quality signal needs
logits, so a mining pass costs a fraction of a full forward.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from p2d import P2DError
from p2d.geometry import AttentionGeometry, decoder_layers, projection
from p2d.io import atomic_path, read_json, save_npy, write_json
from p2d.loss import forward_token_nll, row_means, token_nll
from p2d.tokens import IGNORE, PackedTokens, Tokenized, collate, length_batches, sample_ids, token_lengths

POOLINGS = ("mean", "last", "mean-all", "max", "weighted")
KINDS = ("heads", "hidden")
QUALITIES = ("none", "nll", "ifd")  # what one pass computes; "reducible" (mining) adds a task-model pass
SHARD_SAMPLES = 256
FEATURE_DTYPES = ("float32", "float16")  # float16 halves the store; unit-norm blocks keep cosines within ~1e-3


class _Stop(Exception):
    """Raised from a hook once every needed activation is captured, to skip the rest of the forward."""


@dataclass
class FeatureResult:
    ids: list[str]
    features: np.ndarray  # [N, dim] float32 (or float16), input order; a read-only memmap when a store was used
    quality: np.ndarray | None  # [N] float64 (nll or ifd; NaN where a sample has no response tokens)
    seconds: float
    tokens: int  # non-pad tokens forwarded in this run (0 when everything came from the store)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def fingerprint(tokenized: Sequence[Tokenized]) -> str:
    """sha256 over ids, token ids, trained positions and lengths: the features are a function of exactly these."""
    packed = tokenized if isinstance(tokenized, PackedTokens) else PackedTokens.pack([list(tokenized)])
    h = hashlib.sha256(json.dumps(packed.names, separators=(",", ":")).encode())
    for s in range(0, len(packed.ids), 1 << 22):  # ids as int32 whatever they are packed in, a slice at a time
        h.update(packed.ids[s: s + (1 << 22)].astype(np.int32).tobytes())
    for a in (packed.trained, packed.offsets):
        h.update(a.tobytes())
    return h.hexdigest()


def _pool(x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """[B, T, D] -> [B, D] over the response (`weight`) or non-pad (`mask`) positions; zero if none.

    `weighted` is RDS+'s position-weighted mean over the whole (non-pad) sample.
    """
    x = x.float()
    sel = (mask if pooling in ("mean-all", "weighted") else weight).bool()
    n = sel.sum(1, keepdim=True)
    if pooling in ("mean", "mean-all"):
        return (x * sel[..., None]).sum(1) / n.clamp(min=1)
    if pooling == "weighted":  # RDS+: later tokens, which have seen more of the sample, weigh more (w_t = t)
        w = sel.cumsum(1) * sel
        return (x * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp(min=1)
    if pooling == "max":
        return x.masked_fill(~sel[..., None], -math.inf).amax(1).masked_fill(n == 0, 0.0)
    pos = torch.arange(x.shape[1], device=x.device)
    last = (sel * (pos + 1)).argmax(1)  # last selected position (0 when none: zeroed below)
    return x[torch.arange(x.shape[0], device=x.device), last].masked_fill(n == 0, 0.0)


def _normalize_parts(pooled: torch.Tensor, part: int) -> torch.Tensor:
    """L2-normalise each `part`-wide block (one head or one layer); an all-zero block stays zero."""
    b = pooled.shape[0]
    return F.normalize(pooled.view(b, -1, part), dim=-1).view(b, -1)


def start_token(tokenizer) -> int:
    """The token a response-only sequence starts with: BOS, else EOS."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def response_only(t: Tokenized, start_id: int) -> Tokenized:
    """The response with one start token in front and nothing else, for IFD's unconditioned loss."""
    resp = [tok for tok in t.labels if tok != IGNORE]
    return Tokenized(t.id, [start_id] + resp, [IGNORE] + resp)


class _Capture:
    """Forward hooks that pool the chosen activations of one batch, and stop the forward when done."""

    def __init__(self, model, geom: AttentionGeometry, kind: str, units: list, pooling: str, stop: bool):
        self.model, self.geom, self.kind, self.pooling = model, geom, kind, pooling
        by_layer: dict[int, list[int]] = {}
        for u in units:
            layer, head = u if kind == "heads" else (u, None)
            by_layer.setdefault(layer, []).append(head)
        self.by_layer = by_layer
        self.last_layer = max(by_layer)
        self.stop = stop
        self.parts: dict[int, torch.Tensor] = {}
        self.weight = self.mask = None
        self.handles = []

    def __enter__(self) -> "_Capture":
        for layer, heads in self.by_layer.items():
            if self.kind == "heads":
                cols = torch.cat([torch.arange(h * self.geom.head_dim, (h + 1) * self.geom.head_dim) for h in heads])
                hook = self._head_hook(layer, cols)
                self.handles.append(projection(self.model, layer, "o_proj").register_forward_pre_hook(hook))
            else:
                self.handles.append(decoder_layers(self.model)[layer].register_forward_hook(self._hidden_hook(layer)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()

    def _keep(self, layer: int, x: torch.Tensor) -> None:
        self.parts[layer] = _pool(x, self.weight, self.mask, self.pooling)
        if self.stop and layer == self.last_layer:
            raise _Stop

    def _head_hook(self, layer: int, cols: torch.Tensor):
        def hook(_module, args):
            x = args[0]
            self._keep(layer, x.index_select(-1, cols.to(x.device)))
        return hook

    def _hidden_hook(self, layer: int):
        def hook(_module, _args, output):
            self._keep(layer, output[0] if isinstance(output, tuple) else output)
        return hook

    def features(self) -> torch.Tensor:
        """[B, dim]: layer by layer in ascending order, heads in ascending order, each block normalised."""
        pooled = torch.cat([self.parts[layer] for layer in sorted(self.by_layer)], dim=1)
        part = self.geom.head_dim if self.kind == "heads" else self.geom.hidden_size
        return _normalize_parts(pooled, part)


class FeatureStore:
    """A directory of feature shards that a later run with the same inputs resumes from.

    meta.json says what the features are (model, heads or layers, pooling, quality, data
    fingerprint); shard-NNNNN.npy holds one shard's features in length-sorted order and
    shard-NNNNN.json its ids and quality values. Each file is written atomically, the .json last,
    so a shard counts as done only once both exist.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def open(self, meta: dict) -> None:
        """Create the store, or check that an existing one was made from the same inputs."""
        meta_path = self.path / "meta.json"
        if meta_path.is_file():
            # stores written before the dtypes were recorded: features fp32, compute precision unknown (rebuild)
            old = {"dtype": "float32", "compute_dtype": None} | read_json(meta_path)
            diff = [k for k in meta if old.get(k) != meta[k]]
            if diff:
                what = "; ".join(f"{k}: store has {_short(old.get(k))}, this run {_short(meta[k])}" for k in diff)
                raise P2DError(f"feature store {self.path} was made from other inputs ({what}); "
                               f"use a fresh --out or delete {self.path}")
        else:
            write_json(meta_path, meta)

    def done(self, shard: int, ids: list[str]) -> bool:
        j = self.path / f"shard-{shard:05d}.json"
        return j.is_file() and (self.path / f"shard-{shard:05d}.npy").is_file() and read_json(j)["ids"] == ids

    def write(self, shard: int, ids: list[str], features: np.ndarray, quality: list[float] | None) -> None:
        save_npy(self.path / f"shard-{shard:05d}.npy", features)
        write_json(self.path / f"shard-{shard:05d}.json", {"ids": ids, "quality": quality})

    def features(self, shard: int) -> np.ndarray:
        """The shard's features, memory-mapped (not loaded)."""
        return np.load(self.path / f"shard-{shard:05d}.npy", mmap_mode="r")

    def quality(self, shard: int) -> list[float] | None:
        return read_json(self.path / f"shard-{shard:05d}.json")["quality"]


def _short(v) -> str:
    s = json.dumps(v)
    return s if len(s) <= 80 else s[:77] + "..."


def _progress(enabled: bool):
    """A rich bar with samples/s and ETA."""
    from rich.progress import BarColumn, MofNCompleteColumn, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    from p2d.progress import Progress

    class Rate(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.speed:.1f} samples/s" if task.speed else "- samples/s")

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), Rate(),
                    TimeRemainingColumn(), disable=not enabled)


def _shards(batches: list[list[int]], shard_samples: int) -> list[list[list[int]]]:
    """Consecutive length-sorted batches grouped into shards of >= shard_samples samples (last may be smaller)."""
    shards: list[list[list[int]]] = [[]]
    for b in batches:
        if sum(map(len, shards[-1])) >= shard_samples:
            shards.append([])
        shards[-1].append(b)
    return [s for s in shards if s]


def extract_features(model, tokenized: Sequence[Tokenized], *, heads: Iterable[tuple[int, int]] | None = None,
                     kind: str = "heads", layers: Iterable[int] | None = None, pooling: str = "mean",
                     quality: str = "none", tokenizer=None, batch_size: int = 16, max_tokens: int = 8192,
                     store_dir: str | Path | None = None, model_id: str = "", progress: bool = True,
                     early_stop: bool = True, shard_samples: int = SHARD_SAMPLES,
                     on_shard: Callable[[int], None] | None = None, rank: int = 0, world: int = 1,
                     barrier: Callable[[], None] | None = None, dtype: str = "float32") -> FeatureResult:
    """Pooled, per-head L2-normalised features of `tokenized` (and a quality signal) in one pass.

    kind="heads": the chosen `heads` [(layer, head)], dim = n_heads * head_dim.
    kind="hidden": the outputs of decoder `layers`, dim = n_layers * hidden_size (embedding baseline).
    quality="nll": mean response-token loss under `model`; "ifd": that loss divided by the loss of
    the response alone (a second, response-only forward; needs `tokenizer` for its start token).
    With `store_dir`, finished shards are kept on disk and skipped on a rerun; `on_shard(i)` is
    called after shard i is written (tests use it to simulate a kill). `dtype`: how features are
    kept (FEATURE_DTYPES); consumers compute in float32 either way.

    Several processes (`world` > 1, each with its `rank`, sharing `store_dir`) split the shards
    round-robin, each writes its own, and after `barrier()` every rank reads them all: the result
    is the one process's, shard for shard, since a shard's batches do not depend on the split.
    """
    if kind not in KINDS:
        raise P2DError(f"unknown feature kind {kind!r}; choose one of {', '.join(KINDS)}")
    if pooling not in POOLINGS:
        raise P2DError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
    if quality not in QUALITIES:
        raise P2DError(f"unknown quality {quality!r}; choose one of {', '.join(QUALITIES)}")
    if dtype not in FEATURE_DTYPES:
        raise P2DError(f"unknown feature dtype {dtype!r}; choose one of {', '.join(FEATURE_DTYPES)}")
    geom = AttentionGeometry.from_config(model.config)
    if kind == "heads":
        units = sorted(set((int(l), int(h)) for l, h in (heads or [])))
        bad = [u for u in units if not (0 <= u[0] < geom.num_layers and 0 <= u[1] < geom.num_heads)]
        dim = len(units) * geom.head_dim
    else:
        units = sorted(set(int(l) for l in (layers or [])))
        bad = [u for u in units if not 0 <= u < geom.num_layers]
        dim = len(units) * geom.hidden_size
    if not units:
        raise P2DError(f"no {'heads' if kind == 'heads' else 'layers'} given to extract features from")
    if bad:
        raise P2DError(f"{kind} {bad[:3]} out of range for a model with {geom.num_layers} layers x {geom.num_heads} heads")
    start_id = None
    if quality == "ifd":
        if tokenizer is None:
            raise P2DError("quality 'ifd' needs the tokenizer (for the start token of the response-only pass)")
        start_id = start_token(tokenizer)

    batches = length_batches(token_lengths(tokenized), batch_size, max_tokens)
    shards = _shards(batches, shard_samples)  # fixed before any work, so a rerun finds the same shards
    store = FeatureStore(store_dir) if store_dir is not None else None
    if world > 1 and (store is None or barrier is None):
        raise P2DError("extraction over several processes needs a shared store directory and a barrier")
    if store:
        meta = {"model_id": model_id, "kind": kind, "units": [list(u) if kind == "heads" else u for u in units],
                "pooling": pooling, "quality": quality, "fingerprint": fingerprint(tokenized),
                "n_samples": len(tokenized), "dim": dim, "dtype": dtype,
                "compute_dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
        if rank == 0:
            store.open(meta)
        if world > 1:
            barrier()  # rank 0 made the store; every other rank checks it holds the same inputs as its own
            if rank != 0:
                store.open(meta)

    stop = early_stop and quality == "none"
    names = sample_ids(tokenized)
    n_tokens = 0
    done_feats: list[np.ndarray | int] = []  # a shard's rows, or with a store its index (read back when assembled)
    done_quality: list[np.ndarray | None] = []  # arrays, not lists: a million long-lived floats pin pymalloc arenas
    t0 = time.perf_counter()
    bar = _progress(progress)
    with bar, torch.inference_mode():
        task = bar.add_task(f"{kind} features", total=len(tokenized))
        for si, shard in enumerate(shards):
            order = [i for b in shard for i in b]
            ids = [names[i] for i in order]
            if si % world != rank:  # another rank's shard: read after the barrier below
                continue
            if store and store.done(si, ids):
                qual = _quality_array(store.quality(si))
                bar.advance(task, len(order))
            else:
                feats_t, qual_t = [], []
                for b in shard:
                    f, q, n = _forward(model, geom, [tokenized[i] for i in b], kind, units, pooling, quality, stop)
                    feats_t.append(f)
                    qual_t.append(q)
                    n_tokens += n
                    bar.advance(task, len(b))
                feats = torch.cat(feats_t).cpu().numpy().astype(dtype)
                qual = torch.cat(qual_t).double().cpu() if quality != "none" else None
                if quality == "ifd":
                    alone, n = nll_pass(model, [response_only(tokenized[i], start_id) for i in order],
                                         batch_size, max_tokens)
                    n_tokens += n
                    qual = qual / alone
                qual = qual.numpy() if qual is not None else None
                if store:
                    store.write(si, ids, feats, None if qual is None else qual.tolist())
                if on_shard:
                    on_shard(si)
            done_feats.append(si if store else feats)
            done_quality.append(qual)
    if world > 1:
        barrier()
        done_feats, done_quality = [], []
        for si, shard in enumerate(shards):
            if not store.done(si, [names[i] for b in shard for i in b]):
                raise P2DError(f"feature store {store.path}: shard {si} is missing after every rank finished")
            done_feats.append(si)
            done_quality.append(_quality_array(store.quality(si)))
    seconds = time.perf_counter() - t0

    order = np.array([i for s in shards for b in s for i in b], dtype=np.int64)
    features = _assemble(done_feats, order, len(tokenized), dim, store, write=rank == 0, dtype=dtype)
    qual_arr = None
    if quality != "none":
        qual_arr = np.empty(len(tokenized), dtype=np.float64)
        qual_arr[order] = np.concatenate(done_quality)
    return FeatureResult(names, features, qual_arr, seconds, n_tokens)


def _quality_array(values: list[float] | None) -> np.ndarray | None:
    return None if values is None else np.asarray(values, dtype=np.float64)


def _assemble(shards: list[np.ndarray | int], order: np.ndarray, n: int, dim: int, store: FeatureStore | None,
              write: bool = True, dtype: str = "float32") -> np.ndarray:
    """Shard rows (length-sorted) back into input order. With a store, shards are read one at a time
    (a memory map each holds a file descriptor: thousands would exhaust the limit) into a memmapped
    features.npy (`write`: rank 0), so a pool larger than memory is never held at once."""
    def fill(out: np.ndarray) -> None:
        row = 0
        for part in shards:
            f = store.features(part) if isinstance(part, int) else part
            out[order[row: row + len(f)]] = f
            row += len(f)

    if store is None or not write:
        out = np.empty((n, dim), dtype=dtype)
        fill(out)
        return out
    path = store.path / "features.npy"
    with atomic_path(path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(n, dim))
        fill(out)
        out.flush()
        del out
    return np.load(path, mmap_mode="r")


def _forward(model, geom, batch: list[Tokenized], kind: str, units: list, pooling: str, quality: str,
             stop: bool) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """One batch: (features [B, dim], response nll [B] or None, non-pad tokens)."""
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in collate(batch, pad_id=0).items()}
    with _Capture(model, geom, kind, units, pooling, stop) as cap:
        cap.weight = (enc["labels"] != IGNORE)
        cap.mask = enc["attention_mask"].bool()
        try:
            out = model.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False)
        except _Stop:
            out = None
        nll = row_means(*token_nll(model, out.last_hidden_state, enc["labels"]), len(batch)).float() if quality != "none" else None
        return cap.features(), nll, int(enc["attention_mask"].sum())


def nll_pass(model, tokenized: Sequence[Tokenized], batch_size: int, max_tokens: int) -> tuple[torch.Tensor, int]:
    """Mean response loss of each sample (in the given order) and the tokens forwarded."""
    device = next(model.parameters()).device
    out = torch.empty(len(tokenized), dtype=torch.float64)
    n = 0
    for b in length_batches(token_lengths(tokenized), batch_size, max_tokens):
        enc = {k: v.to(device) for k, v in collate([tokenized[i] for i in b], pad_id=0).items()}
        out[b] = row_means(*forward_token_nll(model, enc), len(b)).cpu()
        n += int(enc["attention_mask"].sum())
    return out, n
