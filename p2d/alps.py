"""ALPS head scores: how far fine-tuning moved each attention head's weight distribution.

For query head h of a layer, with g = h // (num_heads // num_kv_heads) its KV group,
W_o^h = Q_hᵀ K_g V_gᵀ ([hidden, head_dim]) and P_h = softmax(W_o^h / tau) over all entries.
The score is a distance between P_h of the base and of the task model (default: Wasserstein-1
on the flattened index grid at positions linspace(0, 1, n), which equals POT's
``ot.wasserstein_1d(x, x, p_base, p_task, p=1)``).

All arithmetic is float64: with tens of thousands of entries per head, float32 cumulative sums
drown the differences a proxy fine-tune leaves. Checkpoints are read layer by layer so that a
model pair larger than memory still scores.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from p2d import P2DError
from p2d.geometry import AttentionGeometry, projection, state_key
from p2d.io import read_json
from p2d.models import default_device, load_config, resolve_model

METRICS = ("w1", "kl", "cosine", "euclidean")
VARIANTS = ("alps", "qkv-concat")


class WeightReader(Protocol):
    """Source of one projection weight at a time ([out_features, in_features], PyTorch layout)."""

    geometry: AttentionGeometry

    def get(self, layer: int, name: str) -> torch.Tensor: ...


class ModuleReader:
    """Weights of an in-memory model (any device and dtype)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.geometry = AttentionGeometry.from_config(model.config)

    def get(self, layer: int, name: str) -> torch.Tensor:
        return projection(self.model, layer, name).weight.detach()


class SafetensorsReader:
    """Weights read lazily from a Hugging Face directory (single file or sharded), one tensor at a time."""

    def __init__(self, model_dir: str | os.PathLike):
        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                self._weight_map: dict[str, str] = read_json(index)["weight_map"]
            except (ValueError, KeyError) as e:
                raise P2DError(f"{index}: not a safetensors index ({e})") from e
        elif (self.dir / "model.safetensors").is_file():
            with safe_open(self.dir / "model.safetensors", framework="pt") as f:
                self._weight_map = dict.fromkeys(f.keys(), "model.safetensors")
        else:
            raise P2DError(f"{self.dir}: no model.safetensors or model.safetensors.index.json")
        self.geometry = AttentionGeometry.from_config(load_config(self.dir))

    def get(self, layer: int, name: str) -> torch.Tensor:
        key = state_key(layer, name)
        filename = self._weight_map.get(key)
        if filename is None:
            raise P2DError(f"{self.dir}: weight {key} not found in the checkpoint")
        with safe_open(self.dir / filename, framework="pt") as f:
            return f.get_tensor(key)


def reader_for(model: "str | os.PathLike | nn.Module | WeightReader") -> WeightReader:
    """A WeightReader for a model directory, a model spec (see p2d.models.resolve_model), or a module."""
    if isinstance(model, nn.Module):
        return ModuleReader(model)
    if hasattr(model, "get") and hasattr(model, "geometry"):
        return model
    path = Path(resolve_model(model))
    if not path.is_dir():  # a hub id: fetch only config and weights
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(str(path), allow_patterns=["*.json", "*.safetensors"]))
        except Exception as e:  # offline, unknown repo, gated: all user-facing
            raise P2DError(f"cannot find model {str(model)!r} locally or on the hub: {e}") from e
    return SafetensorsReader(path)


@torch.no_grad()
def log_distributions(reader: WeightReader, layer: int, *, tau: float = 1.0, variant: str = "alps",
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """log P_h for every query head of `layer`: float64 [num_heads, n], each row a log-softmax over n entries."""
    geom = reader.geometry
    H, G, hd = geom.num_heads, geom.num_kv_heads, geom.head_dim

    def load(name: str) -> torch.Tensor:
        return reader.get(layer, name).to(device=device, dtype=torch.float64)

    q = load("q_proj").view(H, hd, -1)  # Q_h: [hd, d]
    k = load("k_proj").view(G, hd, -1)
    v = load("v_proj").view(G, hd, -1)
    group = torch.arange(H, device=q.device) // geom.group_size
    if variant == "alps":
        kv = k @ v.transpose(1, 2)  # K_g V_gᵀ: [G, hd, hd], shared by the group's heads
        logits = q.transpose(1, 2) @ kv[group]  # Q_hᵀ K_g V_gᵀ: [H, d, hd]
    elif variant == "qkv-concat":
        logits = torch.cat([q, k[group], v[group]], dim=1)  # [H, 3hd, d]
    else:
        raise P2DError(f"unknown ALPS variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    return torch.log_softmax(logits.reshape(H, -1) / tau, dim=-1)


def distance(log_p: torch.Tensor, log_q: torch.Tensor, metric: str = "w1") -> torch.Tensor:
    """Row-wise distance between distributions given as log-probabilities [..., n] (float64)."""
    if metric == "w1":
        # W1 on positions linspace(0, 1, n): sum |CDF_p - CDF_q| * 1/(n-1).
        n = log_p.shape[-1]
        cdf_gap = torch.cumsum(log_p.exp() - log_q.exp(), dim=-1)
        return cdf_gap.abs().sum(-1) / (n - 1)
    if metric == "kl":  # KL(P_base || P_task): how much the task model lost of the base's mass
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    if metric == "cosine":  # 1 - cos = |p/|p| - q/|q||² / 2, exactly 0 for identical inputs
        p, q = log_p.exp(), log_q.exp()
        unit_gap = p / p.norm(dim=-1, keepdim=True) - q / q.norm(dim=-1, keepdim=True)
        return unit_gap.square().sum(-1) / 2
    if metric == "euclidean":
        return (log_p.exp() - log_q.exp()).norm(dim=-1)
    raise P2DError(f"unknown ALPS metric {metric!r}; choose one of {', '.join(METRICS)}")


@torch.no_grad()
def score_heads(base, task, *, metric: str = "w1", tau: float = 1.0, variant: str = "alps",
                device: torch.device | str | None = None,
                progress: Callable[[int], object] | None = None) -> np.ndarray:
    """ALPS score of every head: float64 [num_layers, num_heads]; higher = moved more by fine-tuning.

    `base` and `task` are anything `reader_for` accepts. `progress(layer)` is called after each layer.
    """
    if metric not in METRICS:
        raise P2DError(f"unknown ALPS metric {metric!r}; choose one of {', '.join(METRICS)}")
    if variant not in VARIANTS:
        raise P2DError(f"unknown ALPS variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if not tau > 0:
        raise P2DError(f"tau must be positive, got {tau}")
    device = torch.device(device) if device is not None else default_device()
    base_reader, task_reader = reader_for(base), reader_for(task)
    geom = base_reader.geometry
    geom.check_same(task_reader.geometry)
    scores = np.zeros((geom.num_layers, geom.num_heads), dtype=np.float64)
    for layer in range(geom.num_layers):
        log_p = log_distributions(base_reader, layer, tau=tau, variant=variant, device=device)
        log_q = log_distributions(task_reader, layer, tau=tau, variant=variant, device=device)
        scores[layer] = distance(log_p, log_q, metric).cpu().numpy()
        if progress is not None:
            progress(layer)
    return scores
