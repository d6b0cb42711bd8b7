"""Structural masking: frozen weights stay bit-identical under AdamW weight decay, selected slices move."""

import copy

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from p2d.geometry import AttentionGeometry
from p2d.masking import HeadDeltaLinear, apply_scope, load_adapter, merge_adapter, merge_deltas, save_adapter
from p2d.tokens import IGNORE, Tokenized
from p2d.trainer import TrainConfig, train

# Layer 1 heads 5 and 6 share KV group 1: k/v rows are counted once.
HEADS = [(0, 1), (1, 5), (1, 6), (2, 7)]
HD, D = 8, 64
LORA_RANK = 4


def tiny_config(tie: bool = False) -> LlamaConfig:
    return LlamaConfig(hidden_size=D, intermediate_size=128, num_hidden_layers=3, num_attention_heads=8,
                       num_key_value_heads=2, head_dim=HD, vocab_size=128, tie_word_embeddings=tie)


def tiny_model(tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config(tie))


def random_data(n: int = 8, length: int = 12, prompt: int = 4, seed: int = 0) -> list[Tokenized]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(1, 128, (length,), generator=g).tolist()
        out.append(Tokenized(str(i), ids, [IGNORE] * prompt + ids[prompt:]))
    return out


def quick_train(model, out_dir, steps: int = 3):
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1, batch_size=4, max_steps=steps, save_every=100, warmup_ratio=0.0,
                      dtype=torch.float32)
    return train(model, random_data(), pad_id=0, config=cfg, out_dir=out_dir, progress=False)


def slices(geom: AttentionGeometry, heads, train_o: bool, kv: str = "shared") -> dict[str, list[tuple[int, slice]]]:
    """state_dict key -> [(dim, slice)] blocks that the heads scope trains."""
    out: dict[str, list[tuple[int, slice]]] = {}
    for layer, h in heads:
        pre = f"model.layers.{layer}.self_attn."
        g = geom.kv_group(h)
        out.setdefault(pre + "q_proj.weight", []).append((0, geom.q_rows(h)))
        if kv == "shared":
            out.setdefault(pre + "k_proj.weight", []).append((0, geom.kv_rows(g)))
            out.setdefault(pre + "v_proj.weight", []).append((0, geom.kv_rows(g)))
        if train_o:
            out.setdefault(pre + "o_proj.weight", []).append((1, geom.q_rows(h)))
    return out


def may_change(key: str, shape, scope: str, blocks) -> torch.Tensor:
    """Boolean mask of the elements of `key` that the scope is allowed to train."""
    attn = ".self_attn." in key
    qkv = any(f".{p}." in key for p in ("q_proj", "k_proj", "v_proj"))
    full = {"full": True, "no-attn": not attn, "alps": not attn, "qkv": qkv, "lora": qkv, "heads": False}[scope]
    mask = torch.full(shape, full, dtype=torch.bool)
    if scope in ("heads", "alps"):
        for dim, s in blocks.get(key, []):
            if dim == 0:
                mask[s] = True
            else:
                mask[:, s] = True
    return mask


def expected_trainable(scope: str, train_o: bool, total: int, kv: str = "shared") -> int:
    n_groups = len({(layer, h // 4) for layer, h in HEADS}) if kv == "shared" else 0
    heads = len(HEADS) * HD * D + n_groups * 2 * HD * D + (len(HEADS) * HD * D if train_o else 0)
    attn = 3 * (D * D + 2 * 16 * D + D * D)
    return {"heads": heads, "full": total, "no-attn": total - attn, "alps": total - attn + heads,
            "qkv": 3 * (D * D + 2 * 16 * D), "lora": 3 * LORA_RANK * ((D + D) + 2 * (D + 16))}[scope]


CASES = [("heads", False, "shared"), ("heads", True, "shared"), ("heads", True, "none"), ("alps", False, "shared"),
         ("full", False, "shared"), ("no-attn", False, "shared"), ("qkv", False, "shared"), ("lora", False, "shared")]


@pytest.mark.parametrize("scope,train_o,kv", CASES,
                         ids=[s + ("+o" if o else "") + ("-kv" if kv == "none" else "") for s, o, kv in CASES])
def test_scope_trains_exactly_its_slices(tmp_path, scope, train_o, kv):
    model = tiny_model()
    geom = AttentionGeometry.from_config(model.config)
    before = copy.deepcopy(model.state_dict())
    info = apply_scope(model, geom, scope, HEADS, train_o=train_o, lora_rank=LORA_RANK, kv_scope=kv)

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert info.trainable_params == sum(p.numel() for p in trainable.values())
    assert info.trainable_params == expected_trainable(scope, train_o, info.total_params, kv)

    quick_train(model, tmp_path)

    # every frozen tensor, base weights inside HeadDeltaLinear / LoRA included, is bit-identical
    for name, p in model.named_parameters():
        if not p.requires_grad:
            orig = name.replace(".base_layer.", ".").replace(".base.", ".")
            assert torch.equal(p.detach(), before[orig]), name
    # optimizer state exists for the trainable tensors only
    opt = torch.load(tmp_path / "checkpoint" / "optimizer.pt", weights_only=True)["optimizer"]
    assert sorted(tuple(s["exp_avg"].shape) for s in opt["state"].values()) == \
        sorted(tuple(p.shape) for p in trainable.values())

    # the effective weights changed exactly where the scope allows, and everywhere it trains
    blocks = slices(geom, HEADS, train_o, kv)
    merged = merge_deltas(copy.deepcopy(model)).state_dict()
    assert set(merged) == set(before)
    for key, w0 in before.items():
        w1 = merged[key]
        mask = may_change(key, w0.shape, scope, blocks)
        assert torch.equal(w1[~mask], w0[~mask]), f"{key}: frozen elements moved"
        if scope in ("heads", "alps") and key in blocks:
            for dim, s in blocks[key]:
                part = (w1[s], w0[s]) if dim == 0 else (w1[:, s], w0[:, s])
                assert not torch.equal(*part), f"{key}[{s}] did not train"
        elif mask.all():
            assert not torch.equal(w1, w0), f"{key} did not train"


def test_heads_scope_wraps_only_selected_layers():
    model = tiny_model()
    geom = AttentionGeometry.from_config(model.config)
    info = apply_scope(model, geom, "lc", [(1, 5), (1, 6)])
    assert info.scope == "lc" and info.per_projection == {"q_proj": 2 * HD * D, "k_proj": HD * D,
                                                          "v_proj": HD * D, "o_proj": 0}
    assert not isinstance(model.model.layers[0].self_attn.q_proj, HeadDeltaLinear)
    k = model.model.layers[1].self_attn.k_proj
    assert isinstance(k, HeadDeltaLinear) and k.index.tolist() == list(range(8, 16))


@pytest.mark.parametrize("scope,train_o", [("heads", True), ("alps", False), ("lora", False)])
def test_merged_checkpoint_loads_without_p2d(tmp_path, scope, train_o):
    model = tiny_model(tie=True)
    apply_scope(model, AttentionGeometry.from_config(model.config), scope, HEADS, train_o=train_o,
                lora_rank=LORA_RANK)
    quick_train(model, tmp_path / "run")
    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])
    model.eval()
    with torch.no_grad():
        expected = model(ids).logits
        merge_deltas(model)
        assert torch.allclose(model(ids).logits, expected, atol=1e-5)
    model.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, expected, atol=1e-5)


@pytest.mark.parametrize("scope", ["heads", "alps", "lora"])
def test_adapter_round_trip(tmp_path, scope):
    base = tiny_model()
    base.save_pretrained(tmp_path / "base")
    model = copy.deepcopy(base)
    apply_scope(model, AttentionGeometry.from_config(model.config), scope, HEADS, train_o=True, lora_rank=LORA_RANK)
    quick_train(model, tmp_path / "run")
    (tmp_path / "heads.json").write_text('{"heads": []}')
    save_adapter(model, tmp_path / "adapter", heads_json_path=tmp_path / "heads.json")
    state = load_file(tmp_path / "adapter" / "p2d_adapter.safetensors")
    assert (tmp_path / "adapter" / "heads.json").is_file()
    if scope == "heads":
        assert state["model.layers.1.self_attn.q_proj.index"].tolist() == list(range(40, 56))
        assert "model.layers.1.self_attn.o_proj.delta" in state
    # the trainer's own adapter holds the same tensors
    trainer_state = load_file(tmp_path / "run" / "adapter" / "p2d_adapter.safetensors")
    assert set(trainer_state) == set(state) and all(torch.equal(trainer_state[k], v) for k, v in state.items())

    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])
    with torch.no_grad():
        expected = model.eval()(ids).logits
        fresh = copy.deepcopy(base)
        load_adapter(fresh, tmp_path / "adapter")
        assert torch.allclose(fresh.eval()(ids).logits, expected, atol=1e-5)
    merge_adapter(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    assert (tmp_path / "merged" / "heads.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, expected, atol=1e-5)
