"""A trained head set as a standard peft LoRA adapter, for peft, vLLM, LLaMA-Factory and axolotl.

A head delta is exactly a low-rank update. On output rows R of a projection (q/k/v),
ΔW = B·A with A = the delta rows (r x in) and B the one-hot (out x r) that puts row i at R[i];
on input columns C (o_proj), A is the one-hot (r x in) that picks C and B = the delta (out x r).
Every module gets the same rank (the largest; unused ranks are zero) and lora_alpha = rank, so the
LoRA scaling is 1 and the adapter needs no per-module `rank_pattern`, which not every server reads.
`--scope lora` adapters are written in the same layout from peft's own state.

Bias deltas (q/k/v biases, e.g. Qwen2) become peft's `lora_bias`, which peft applies to every
target module and cannot merge into one without a bias: with bias deltas and `--train-o` on a
model whose o_proj has no bias, no peft adapter is written (p2d's own adapter and the merged model
still hold the update). Scopes that train whole matrices (alps, full, no-attn, qkv) have no adapter
form: use the merged model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_SCOPES = ("heads", "random", "lc", "lora")  # the scopes whose update is low-rank
PREFIX = "base_model.model."  # how peft names the wrapped model's modules in a saved adapter


def _delta_modules(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, tuple[str, int, int]]:
    """{module name: (dim, out_features, in_features)} of every head-delta module in `state`."""
    out = {}
    for name in state:
        if name.endswith(".delta"):
            module = name[: -len(".delta")]
            m = model.get_submodule(module)
            out[module] = (m.dim, m.base.out_features, m.base.in_features)
    return out


def head_lora(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int, bool]:
    """(peft tensors, rank, has bias) of the head deltas in `state` (names as in `adapter_state`)."""
    modules = _delta_modules(model, state)
    rank = max(len(state[f"{m}.index"]) for m in modules)
    bias = any(f"{m}.delta_bias" in state for m in modules)
    tensors = {}
    for module, (dim, n_out, n_in) in sorted(modules.items()):
        delta, index = state[f"{module}.delta"].float(), state[f"{module}.index"]
        r = len(index)
        a, b = torch.zeros(rank, n_in), torch.zeros(n_out, rank)
        if dim == "rows":
            a[:r] = delta
            b[index, torch.arange(r)] = 1.0
        else:
            a[torch.arange(r), index] = 1.0
            b[:, :r] = delta
        key = PREFIX + module
        tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a.contiguous(), b.contiguous()
        if bias:
            tensors[f"{key}.lora_B.bias"] = torch.zeros(n_out).index_add_(
                0, index, state.get(f"{module}.delta_bias", torch.zeros(r)).float())
    return tensors, rank, bias


def peft_lora(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft's saved names for the LoRA tensors of a model injected by `inject_adapter_in_model`."""
    return {PREFIX + n.replace(".default.", "."): t.contiguous() for n, t in state.items() if ".lora_" in n}


def save_peft_adapter(model: nn.Module, state: dict[str, torch.Tensor], out_dir: Path, base_model: str | None) -> str | None:
    """Write adapter_config.json + adapter_model.safetensors (peft's format); None, or why not written."""
    from peft import LoraConfig

    info = model.p2d_scope
    if info.scope == "lora":
        tensors, rank, alpha, bias = peft_lora(state), info.lora_rank, info.lora_alpha, False
        targets = ["q_proj", "k_proj", "v_proj"]
    else:
        tensors, rank, bias = head_lora(model, state)
        alpha = rank
        targets = sorted(n[len(PREFIX):].rsplit(".lora_A", 1)[0] for n in tensors if n.endswith("lora_A.weight"))
        if bias and any(model.get_submodule(t).base.bias is None for t in targets):
            return "bias deltas with trained o_proj columns: peft's lora_bias cannot merge into a bias-free o_proj"
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none",
                     lora_bias=bias, task_type="CAUSAL_LM", base_model_name_or_path=base_model)
    cfg.save_pretrained(str(out_dir))
    dtype = next(iter(state.values())).dtype
    save_file({k: v.to(dtype) for k, v in tensors.items()}, str(out_dir / PEFT_WEIGHTS))
    return None
