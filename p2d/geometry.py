"""Attention geometry: how many heads a model has and where their weights live.

Every later stage (scoring, feature capture, masking) slices q/k/v/o by head through this module,
so the GQA mapping and the weight layout are decided here once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from p2d import P2DError

# Decoder families whose attention is separate q_proj/k_proj/v_proj/o_proj Linear layers under
# model.model.layers[i].self_attn, with q rows laid out head after head (PyTorch row layout).
SUPPORTED_ARCHITECTURES = (
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe",
    "gemma", "gemma2", "gemma3_text", "olmo", "olmo2", "granite", "smollm3", "cohere", "starcoder2",
)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class AttentionGeometry:
    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int

    @classmethod
    def from_config(cls, config) -> "AttentionGeometry":
        model_type = getattr(config, "model_type", None) or type(config).__name__
        config = getattr(config, "text_config", None) or config
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise P2DError(
                f"unsupported architecture {model_type!r}: p2d needs separate q_proj/k_proj/v_proj/o_proj "
                f"attention; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        n_heads = config.num_attention_heads
        n_kv = getattr(config, "num_key_value_heads", None) or n_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        if n_heads % n_kv:
            raise P2DError(f"{model_type}: num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv}")
        return cls(model_type, config.num_hidden_layers, n_heads, n_kv, head_dim, config.hidden_size)

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    @property
    def total_heads(self) -> int:
        return self.num_layers * self.num_heads

    def kv_group(self, head: int) -> int:
        """KV head used by query head `head` (grouped-query attention: consecutive query heads share one)."""
        if not 0 <= head < self.num_heads:
            raise IndexError(f"head {head} out of range [0, {self.num_heads})")
        return head // self.group_size

    def q_rows(self, head: int) -> slice:
        return slice(head * self.head_dim, (head + 1) * self.head_dim)

    def kv_rows(self, group: int) -> slice:
        return slice(group * self.head_dim, (group + 1) * self.head_dim)

    def as_dict(self) -> dict:
        return {"num_layers": self.num_layers, "num_heads": self.num_heads,
                "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim}

    def check_same(self, other: "AttentionGeometry", what: str = "task model") -> None:
        if self.as_dict() != other.as_dict() or self.hidden_size != other.hidden_size:
            raise P2DError(f"{what} does not match the base model: base {self.as_dict()}, {what} {other.as_dict()}")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder layers of a causal LM (model.model.layers for every supported family)."""
    inner = getattr(model, "model", model)
    inner = getattr(inner, "language_model", inner)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise P2DError(f"cannot find decoder layers in {type(model).__name__}")
    return layers


def attention(model: nn.Module, layer: int) -> nn.Module:
    return decoder_layers(model)[layer].self_attn


def projection(model: nn.Module, layer: int, name: str) -> nn.Linear:
    return getattr(attention(model, layer), name)


def state_key(layer: int, name: str) -> str:
    """State-dict key of a projection weight (Hugging Face naming shared by the supported families)."""
    return f"model.layers.{layer}.self_attn.{name}.weight"


@torch.no_grad()
def head_slices(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, geom: AttentionGeometry, head: int):
    """(Q_h, K_g, V_g): the [head_dim, hidden] rows of query head `head` and of its KV group."""
    g = geom.kv_group(head)
    return q[geom.q_rows(head)], k[geom.kv_rows(g)], v[geom.kv_rows(g)]
