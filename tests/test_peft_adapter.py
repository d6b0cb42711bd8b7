"""The adapter directory is a real peft LoRA adapter: peft loads it, and it equals p2d's own model."""

import copy
import json

import pytest
import torch
from peft import PeftModel
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from p2d.geometry import AttentionGeometry
from p2d.masking import apply_scope, merge_deltas, save_adapter

HEADS = [(0, 1), (1, 5), (1, 6), (2, 7)]  # layer 1 heads 5 and 6 share a KV group


def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                        num_attention_heads=8, num_key_value_heads=2, head_dim=8, vocab_size=128)).eval()


def qwen2():
    """q/k/v with biases: the bias deltas become the LoRA B bias."""
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                        num_attention_heads=8, num_key_value_heads=2, vocab_size=128)).eval()


def randomize_trainable(model, seed: int = 1) -> None:
    """Stand-in for training: every trainable tensor random (the zero init would hide a wrong layout)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("make", [llama, qwen2], ids=["llama", "qwen2-bias"])
@pytest.mark.parametrize("scope,train_o", [("heads", True), ("heads", False), ("lora", False)])
def test_peft_loads_the_adapter_and_matches_p2d(tmp_path, make, scope, train_o):
    base = make()
    trained = copy.deepcopy(base)
    apply_scope(trained, AttentionGeometry.from_config(trained.config), scope, HEADS, train_o=train_o, lora_rank=4)
    randomize_trainable(trained)
    save_adapter(trained, tmp_path / "adapter", base_model="tiny")
    if make is qwen2 and train_o:  # peft cannot merge a bias into the bias-free o_proj: no peft adapter
        assert not (tmp_path / "adapter" / "adapter_config.json").exists()
        assert "o_proj" in json.loads((tmp_path / "adapter" / "p2d_adapter.json").read_text())["peft_adapter_missing_because"]
        return
    ids = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79]])
    with torch.no_grad():
        expected = trained(ids).logits
        assert not torch.allclose(expected, base(ids).logits, atol=1e-3)  # the adapter changes the model
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
        assert torch.allclose(peft_model(ids).logits, expected, atol=1e-4)
        merged = peft_model.merge_and_unload()
        assert torch.allclose(merged(ids).logits, expected, atol=1e-4)
        assert torch.allclose(merged(ids).logits, merge_deltas(trained)(ids).logits, atol=1e-4)


def test_whole_matrix_scopes_write_no_peft_adapter(tmp_path):
    model = llama()
    apply_scope(model, AttentionGeometry.from_config(model.config), "alps", HEADS)
    save_adapter(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "p2d_adapter.json").is_file()
    assert not (tmp_path / "adapter" / "adapter_config.json").exists()
