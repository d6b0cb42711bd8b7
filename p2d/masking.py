"""Structural head masking: what trains in each scope, and how trained heads become a checkpoint.

Selected heads train through small delta tensors (`HeadDeltaLinear`) rather than gradient masks:
AdamW's weight decay moves rows whose gradient is zero, and gradient hooks break under ZeRO-3.
With deltas the optimizer only ever sees the selected rows, so every frozen weight stays
bit-identical, and the trainable-parameter count is exact.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from p2d import P2DError
from p2d.geometry import PROJECTIONS, AttentionGeometry, attention, decoder_layers, projection
from p2d.io import atomic_dir, write_json

# `random` and `lc` are the `heads` scope with another head list (p2d/selection.py chooses it).
HEAD_ALIASES = ("random", "lc")
SCOPES = ("heads", "alps", "full", "no-attn", "qkv", "lora") + HEAD_ALIASES
HEAD_SCOPES = ("heads", "alps", *HEAD_ALIASES)  # the scopes that train selected heads (they need heads.json)
# p2d run's and p2d plan's: the run's heads come from its localize stage (--head-method), so the aliases add nothing
PIPELINE_SCOPES = tuple(s for s in SCOPES if s not in HEAD_ALIASES)
SCOPE_HELP = {"heads": "only the selected heads' q rows and their KV groups' k/v rows",
              "alps": "those plus every non-attention weight", "random": "heads, given a random heads.json",
              "lc": "heads, given a layer-uniform heads.json", "full": "every weight",
              "no-attn": "every weight outside attention", "lora": "LoRA on q/k/v (--lora-rank)",
              "qkv": "all attention q/k/v"}
# p2d's exact delta format, beside the peft LoRA adapter (adapter_config.json, p2d/peft_adapter.py)
ADAPTER_WEIGHTS = "p2d_adapter.safetensors"
ADAPTER_CONFIG = "p2d_adapter.json"


def scope_help(scopes: tuple[str, ...]) -> str:
    """--scope's help text for the scopes a command takes."""
    return "; ".join(f"{s}: {SCOPE_HELP[s]}" for s in scopes) + "."


class HeadDeltaLinear(nn.Module):
    """A frozen Linear plus a trainable zero-initialised delta on some output rows or input columns.

    rows: out[..., rows] += x @ deltaᵀ (+ delta_bias); cols: out += x[..., cols] @ deltaᵀ.
    The base is a registered submodule called as a module, so ZeRO-3 gathers its weight.
    """

    def __init__(self, base: nn.Linear, index: list[int], dim: str):
        super().__init__()
        if dim not in ("rows", "cols"):
            raise ValueError(f"dim must be 'rows' or 'cols', not {dim!r}")
        self.base = base.requires_grad_(False)
        self.dim = dim
        w = base.weight
        self.register_buffer("index", torch.tensor(index, dtype=torch.long, device=w.device))
        shape = (len(index), base.in_features) if dim == "rows" else (base.out_features, len(index))
        self.delta = nn.Parameter(torch.zeros(shape, dtype=w.dtype, device=w.device))
        has_bias = dim == "rows" and base.bias is not None
        self.delta_bias = nn.Parameter(torch.zeros(len(index), dtype=w.dtype, device=w.device)) if has_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.dim == "cols":
            return out + x.index_select(-1, self.index) @ self.delta.T
        upd = x @ self.delta.T
        if self.delta_bias is not None:
            upd = upd + self.delta_bias
        return out.index_add(-1, self.index, upd.to(out.dtype))

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain Linear holding W + Δ (and b + Δb) in the selected rows or columns."""
        b = self.base
        lin = nn.Linear(b.in_features, b.out_features, bias=b.bias is not None, device=b.weight.device,
                        dtype=b.weight.dtype)
        lin.weight.copy_(b.weight)
        if self.dim == "rows":
            lin.weight.index_add_(0, self.index, self.delta.to(b.weight.dtype))
        else:
            lin.weight.index_add_(1, self.index, self.delta.to(b.weight.dtype))
        if b.bias is not None:
            lin.bias.copy_(b.bias)
            if self.delta_bias is not None:
                lin.bias.index_add_(0, self.index, self.delta_bias.to(b.bias.dtype))
        return lin


@dataclass
class ScopeInfo:
    scope: str
    trainable_params: int
    total_params: int
    heads: list[tuple[int, int]] = field(default_factory=list)
    train_o: bool = False
    kv_scope: str = "shared"
    lora_rank: int | None = None
    lora_alpha: float | None = None
    per_projection: dict[str, int] = field(default_factory=dict)  # trainable params in q/k/v/o_proj


def _rows(blocks: list[slice]) -> list[int]:
    return [i for s in blocks for i in range(s.start, s.stop)]


KV_SCOPES = ("shared", "none")


def _wrap_heads(model: nn.Module, geom: AttentionGeometry, heads: list[tuple[int, int]], train_o: bool,
                kv_scope: str = "shared") -> None:
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        if not (0 <= layer < geom.num_layers and 0 <= head < geom.num_heads):
            raise P2DError(f"head ({layer}, {head}) is outside the model ({geom.num_layers} layers x {geom.num_heads} heads)")
        by_layer.setdefault(layer, []).append(head)
    for layer, hs in sorted(by_layer.items()):
        hs = sorted(set(hs))
        groups = sorted({geom.kv_group(h) for h in hs})
        q_rows = _rows([geom.q_rows(h) for h in hs])
        kv_rows = _rows([geom.kv_rows(g) for g in groups])
        attn = attention(model, layer)
        plan = {"q_proj": (q_rows, "rows")}
        if kv_scope == "shared":  # the heads' KV groups, which the group's other query heads also read
            plan |= {"k_proj": (kv_rows, "rows"), "v_proj": (kv_rows, "rows")}
        if train_o:
            plan["o_proj"] = (q_rows, "cols")  # o_proj's input columns follow the q head layout
        for name, (index, dim) in plan.items():
            base = getattr(attn, name)
            if isinstance(base, HeadDeltaLinear):
                raise P2DError("apply_scope was already applied to this model")
            setattr(attn, name, HeadDeltaLinear(base, index, dim))


def _numel(p: torch.Tensor) -> int:
    """A parameter's size, also when ZeRO-3 has partitioned it away from this rank (ds_numel)."""
    return getattr(p, "ds_numel", p.numel())


def _is_attention(name: str) -> bool:
    return ".self_attn." in name


def apply_scope(model: nn.Module, geom: AttentionGeometry, scope: str, heads=None, *, train_o: bool = False,
                kv_scope: str = "shared",
                lora_rank: int = 128, lora_alpha: float | None = None) -> ScopeInfo:
    """Make exactly the parameters of `scope` trainable (in place) and report how many there are.

    heads (aliases random, lc): the selected heads' q rows, their KV groups' k/v rows (shared by the
      other query heads of the group), q/k/v bias rows, and with train_o their o_proj input columns.
      kv_scope "none" leaves k/v frozen: under heavy GQA (8 query heads per KV group) 10% of the
      heads can touch most KV groups, and then "10% of heads" would train far more than 10%.
    alps: those slices plus every weight outside self_attn (MLP, norms, embeddings, lm_head).
    full: everything. no-attn: everything outside self_attn. qkv: all q/k/v weights only.
    lora: peft LoRA on q/k/v (rank `lora_rank`, alpha 2·rank unless given), injected in place.
    """
    if scope not in SCOPES:
        raise P2DError(f"unknown training scope {scope!r}; choose one of {', '.join(SCOPES)}")
    if kv_scope not in KV_SCOPES:
        raise P2DError(f"unknown kv scope {kv_scope!r}; choose one of {', '.join(KV_SCOPES)}")
    heads = sorted({(int(layer), int(h)) for layer, h in (heads or [])})
    head_scope = scope in ("heads", "alps") + HEAD_ALIASES
    if head_scope and not heads:
        raise P2DError(f"scope {scope!r} needs a non-empty head list (heads.json)")
    total = sum(_numel(p) for p in model.parameters())
    model.requires_grad_(scope in ("full", "no-attn", "alps"))
    if scope in ("no-attn", "alps"):
        for name, p in model.named_parameters():
            if _is_attention(name):
                p.requires_grad_(False)
    if scope == "qkv":
        for layer in range(geom.num_layers):
            for name in ("q_proj", "k_proj", "v_proj"):
                projection(model, layer, name).requires_grad_(True)
    if head_scope:
        _wrap_heads(model, geom, heads, train_o, kv_scope)
    if scope == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        lora_alpha = lora_alpha if lora_alpha is not None else 2 * lora_rank
        cfg = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=0.0,
                         target_modules=["q_proj", "k_proj", "v_proj"])
        inject_adapter_in_model(cfg, model)
    per_proj = {name: 0 for name in PROJECTIONS}
    for name, p in model.named_parameters():
        if p.requires_grad:
            for proj in PROJECTIONS:
                if f".{proj}." in name:
                    per_proj[proj] += _numel(p)
    info = ScopeInfo(
        scope=scope, trainable_params=sum(_numel(p) for p in model.parameters() if p.requires_grad),
        total_params=total, heads=heads if head_scope else [], train_o=train_o and head_scope,
        kv_scope=kv_scope if head_scope else "shared",
        lora_rank=lora_rank if scope == "lora" else None, lora_alpha=lora_alpha if scope == "lora" else None,
        per_projection=per_proj,
    )
    model.p2d_scope = info  # save_adapter records it
    return info


def merge_deltas(model: nn.Module) -> nn.Module:
    """Fold deltas (and LoRA) into plain Linear layers, in place, so the model saves as a stock HF checkpoint."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for layer in decoder_layers(model):
        attn = layer.self_attn
        for name in PROJECTIONS:
            mod = getattr(attn, name, None)
            if isinstance(mod, HeadDeltaLinear):
                setattr(attn, name, mod.merged())
            elif isinstance(mod, BaseTunerLayer):
                mod.merge()
                setattr(attn, name, mod.get_base_layer())
    model.__dict__.pop("peft_config", None)
    model.__dict__.pop("p2d_scope", None)
    return model


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable tensors plus the delta index buffers: all that differs from the base model."""
    state = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    state.update({n: b for n, b in model.named_buffers() if n.endswith(".index") and n[:-6] + ".delta" in state})
    return {n: t.contiguous().cpu() for n, t in state.items()}


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, heads_json_path: str | os.PathLike | None = None,
                 base_model: str | None = None, state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the adapter directory atomically; returns it.

    It holds p2d's exact deltas (p2d_adapter.safetensors + p2d_adapter.json, what `load_adapter`
    and `p2d merge` read), for head and LoRA scopes the same update as a peft LoRA adapter
    (adapter_config.json + adapter_model.safetensors), and heads.json when given. `state`
    overrides the tensors read from `model` (the trainer passes ZeRO-3-gathered ones).
    """
    from p2d.peft_adapter import PEFT_SCOPES, save_peft_adapter

    info: ScopeInfo | None = getattr(model, "p2d_scope", None)
    if info is None:
        raise P2DError("save_adapter needs a model prepared by p2d.masking.apply_scope")
    out_dir = Path(out_dir)
    geom = AttentionGeometry.from_config(model.config)
    config = {"scope": info.scope, "train_o": info.train_o, "kv_scope": info.kv_scope,
              "heads": [list(h) for h in info.heads],
              "lora_rank": info.lora_rank, "lora_alpha": info.lora_alpha, "geometry": geom.as_dict(),
              "hidden_size": geom.hidden_size, "model_type": geom.model_type,
              "base_model": base_model or getattr(model.config, "_name_or_path", None),
              "trainable_params": info.trainable_params}
    state = state if state is not None else adapter_state(model)
    with atomic_dir(out_dir) as tmp:
        save_file(state, str(tmp / ADAPTER_WEIGHTS))
        why_not = save_peft_adapter(model, state, tmp, config["base_model"]) if info.scope in PEFT_SCOPES else \
            f"scope {info.scope!r} trains whole matrices (use the merged model)"
        config["peft_adapter"] = None if why_not else "adapter_config.json"
        config["peft_adapter_missing_because"] = why_not
        write_json(tmp / ADAPTER_CONFIG, config)
        if heads_json_path is not None:
            shutil.copyfile(heads_json_path, tmp / "heads.json")
    return out_dir


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> ScopeInfo:
    """Apply a saved adapter to a base model in place (scope structure first, then the tensors)."""
    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / ADAPTER_CONFIG
    if not cfg_path.is_file():
        hint = " (a peft adapter: load it with peft.PeftModel.from_pretrained)" if (adapter_dir / "adapter_config.json").is_file() else ""
        raise P2DError(f"{adapter_dir}: not a p2d adapter (no {ADAPTER_CONFIG}){hint}")
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    geom = AttentionGeometry.from_config(model.config)
    if cfg["geometry"] != geom.as_dict() or cfg.get("hidden_size", geom.hidden_size) != geom.hidden_size:
        raise P2DError(f"{cfg_path}: adapter geometry {cfg['geometry']} does not match the model {geom.as_dict()}")
    kwargs = {"lora_rank": cfg["lora_rank"], "lora_alpha": cfg["lora_alpha"]} if cfg["scope"] == "lora" else {}
    info = apply_scope(model, geom, cfg["scope"], [tuple(h) for h in cfg["heads"]], train_o=cfg["train_o"],
                       kv_scope=cfg.get("kv_scope", "shared"), **kwargs)
    state = load_file(str(adapter_dir / ADAPTER_WEIGHTS))
    current = dict(model.named_parameters()) | dict(model.named_buffers())
    unknown = sorted(set(state) - set(current))
    missing = sorted(n for n, p in model.named_parameters() if p.requires_grad and n not in state)
    if unknown or missing:
        raise P2DError(f"{adapter_dir / ADAPTER_WEIGHTS}: does not fit the model "
                       f"(unexpected {unknown[:3]}, missing {missing[:3]})")
    with torch.no_grad():
        for name, t in state.items():
            if name.endswith(".index") and not torch.equal(current[name], t.to(current[name].device)):
                raise P2DError(f"{adapter_dir}: {name} disagrees with the heads in {ADAPTER_CONFIG}")
            current[name].copy_(t)
    return info


def merge_adapter(base_spec: str | os.PathLike, adapter_dir: str | os.PathLike,
                  out_dir: str | os.PathLike, chat_template: str | None = None) -> Path:
    """Base model + adapter -> a merged Hugging Face checkpoint at `out_dir` (written atomically).

    `chat_template` replaces the tokenizer's, so the model is served in the format it was trained in."""
    from transformers import AutoModelForCausalLM

    from p2d.models import load_config, load_tokenizer, resolve_model, save_tokenizer

    path = resolve_model(base_spec)
    saved_dtype = load_config(path).dtype or torch.float32
    saved_dtype = getattr(torch, saved_dtype) if isinstance(saved_dtype, str) else saved_dtype
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)  # merge in fp32, save as the base
    load_adapter(model, adapter_dir)
    merge_deltas(model).to(saved_dtype)
    try:
        tok = load_tokenizer(path)
    except (P2DError, OSError, ValueError):  # a bare weights directory: the checkpoint is still usable
        tok = None
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tok is not None:
            if chat_template is not None:
                tok.chat_template = chat_template
            save_tokenizer(tok, tmp)
        heads = Path(adapter_dir) / "heads.json"
        if heads.is_file():
            shutil.copyfile(heads, tmp / "heads.json")
    return out_dir
