import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from conftest import random_model, random_samples
from p2d import P2DError
from p2d.features import extract_features
from p2d.geometry import decoder_layers
from p2d.tokens import IGNORE, Tokenized


def tiny_model(attn: str = "sdpa") -> LlamaForCausalLM:
    return random_model(attn_implementation=attn)


samples = random_samples


def manual_head_feature(model, t: Tokenized, layer: int, head: int, pooling: str) -> torch.Tensor:
    """Head output recomputed from the attention probabilities and V (eager attention, no hooks)."""
    ids = torch.tensor([t.input_ids])
    with torch.no_grad():
        out = model(input_ids=ids, output_attentions=True, output_hidden_states=True)
        attn = decoder_layers(model)[layer].self_attn
        x = decoder_layers(model)[layer].input_layernorm(out.hidden_states[layer])
        v = attn.v_proj(x).view(1, len(t), model.config.num_key_value_heads, 8)
        g = head // (model.config.num_attention_heads // model.config.num_key_value_heads)
        o = out.attentions[layer][0, head] @ v[0, :, g]  # [T, hd]
    resp = torch.tensor([lab != IGNORE for lab in t.labels])
    pooled = {"mean": o[resp].mean(0), "last": o[resp][-1], "max": o[resp].max(0).values, "mean-all": o.mean(0)}[pooling]
    return F.normalize(pooled, dim=0)


@pytest.mark.parametrize("pooling", ["mean", "last", "max", "mean-all"])
def test_head_features_match_manual(pooling):
    model = tiny_model("eager")
    data = samples(6)
    heads = [(2, 5), (0, 1), (2, 0)]
    res = extract_features(model, data, heads=heads, pooling=pooling, batch_size=4, progress=False)
    assert res.features.shape == (6, 3 * 8) and res.features.dtype == np.float32
    for i, t in enumerate(data):
        want = torch.cat([manual_head_feature(model, t, l, h, pooling) for l, h in sorted(heads)])
        np.testing.assert_allclose(res.features[i], want.numpy(), atol=1e-5)


def test_early_stop_same_features_and_skips_later_layers():
    model = tiny_model()
    data = samples(9)
    calls = [0] * 4
    for i, layer in enumerate(decoder_layers(model)):
        layer.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
    heads = [(1, 3), (0, 7)]
    fast = extract_features(model, data, heads=heads, batch_size=4, progress=False)
    assert calls[2] == calls[3] == 0 and calls[0] == calls[1] == 3
    full = extract_features(model, data, heads=heads, batch_size=4, progress=False, early_stop=False)
    assert calls[3] == 3
    np.testing.assert_allclose(fast.features, full.features, atol=1e-6)
    assert fast.tokens == sum(len(t) for t in data)


def test_batching_does_not_change_features():
    model = tiny_model()
    data = samples(12)
    a = extract_features(model, data, heads=[(3, 2)], batch_size=1, progress=False)
    b = extract_features(model, data, heads=[(3, 2)], batch_size=5, max_tokens=40, progress=False)
    np.testing.assert_allclose(a.features, b.features, atol=1e-5)
    assert a.ids == [t.id for t in data]


def test_hidden_features_and_nll():
    model = tiny_model()
    data = samples(5)
    res = extract_features(model, data, kind="hidden", layers=[1, 3], quality="nll", progress=False)
    with torch.no_grad():
        for i, t in enumerate(data):
            out = model(input_ids=torch.tensor([t.input_ids]), labels=torch.tensor([t.labels]), output_hidden_states=True)
            assert res.quality[i] == pytest.approx(out.loss.item(), rel=1e-4)
            resp = torch.tensor([lab != IGNORE for lab in t.labels])
            want = torch.cat([F.normalize(out.hidden_states[l + 1][0][resp].mean(0), dim=0) for l in (1,)])
            np.testing.assert_allclose(res.features[i, :64], want.numpy(), atol=1e-5)
    assert res.features.shape == (5, 128)


class Tok:
    bos_token_id = 1
    eos_token_id = 2


def test_ifd_is_conditioned_over_response_alone_loss():
    model = tiny_model()
    data = samples(4)
    res = extract_features(model, data, heads=[(0, 0)], quality="ifd", tokenizer=Tok(), progress=False)
    with torch.no_grad():
        for i, t in enumerate(data):
            cond = model(input_ids=torch.tensor([t.input_ids]), labels=torch.tensor([t.labels])).loss
            resp = [x for x in t.labels if x != IGNORE]
            alone = model(input_ids=torch.tensor([[1] + resp]), labels=torch.tensor([[IGNORE] + resp])).loss
            assert res.quality[i] == pytest.approx((cond / alone).item(), rel=1e-4)
    with pytest.raises(P2DError, match="tokenizer"):
        extract_features(model, data, heads=[(0, 0)], quality="ifd", progress=False)


def test_no_response_tokens_gives_zero_row_and_nan_quality():
    model = tiny_model()
    data = samples(3) + [Tokenized("empty", [5, 6, 7], [IGNORE] * 3)]
    res = extract_features(model, data, heads=[(1, 1)], quality="nll", progress=False)
    assert not res.features[3].any() and np.isnan(res.quality[3])
    assert np.isfinite(res.quality[:3]).all()


class Killed(Exception):
    pass


def test_store_resume_after_kill_and_meta_mismatch(tmp_path):
    model = tiny_model()
    data = samples(23)
    kw = dict(heads=[(1, 2), (2, 6)], batch_size=2, shard_samples=4, progress=False, model_id="tiny", quality="nll")
    ref = extract_features(model, data, **kw)

    def kill(i):
        if i == 2:
            raise Killed

    with pytest.raises(Killed):
        extract_features(model, data, store_dir=tmp_path / "s", on_shard=kill, **kw)
    assert len(list((tmp_path / "s").glob("shard-*.json"))) == 3
    resumed = extract_features(model, data, store_dir=tmp_path / "s", **kw)
    assert resumed.tokens < ref.tokens  # finished shards were not recomputed
    np.testing.assert_array_equal(resumed.features, ref.features)
    np.testing.assert_array_equal(resumed.quality, ref.quality)
    again = extract_features(model, data, store_dir=tmp_path / "s", **kw)
    assert again.tokens == 0
    np.testing.assert_array_equal(again.features, ref.features)

    with pytest.raises(P2DError, match="units.*fresh --out"):
        extract_features(model, data, store_dir=tmp_path / "s", **{**kw, "heads": [(0, 0)]})
    with pytest.raises(P2DError, match="fingerprint"):
        extract_features(model, data[:-1], store_dir=tmp_path / "s", **kw)
    with pytest.raises(P2DError, match="model_id"):
        extract_features(model, data, store_dir=tmp_path / "s", **{**kw, "model_id": "other"})


def test_bad_arguments():
    model = tiny_model()
    with pytest.raises(P2DError, match="out of range"):
        extract_features(model, samples(2), heads=[(4, 0)], progress=False)
    with pytest.raises(P2DError, match="pooling"):
        extract_features(model, samples(2), heads=[(0, 0)], pooling="median", progress=False)
    with pytest.raises(P2DError, match="no heads"):
        extract_features(model, samples(2), heads=[], progress=False)


def test_a_store_of_many_shards_holds_no_file_per_shard(tmp_path):
    """A million-row pool makes thousands of shards: holding a memory map (a file descriptor) for each
    would exhaust a default limit of 1,024 open files."""
    import os

    model = tiny_model()
    data = samples(40)
    kw = dict(heads=[(1, 2)], batch_size=1, shard_samples=1, progress=False, model_id="tiny")
    before, peak = len(os.listdir("/proc/self/fd")), []
    res = extract_features(model, data, store_dir=tmp_path / "s",
                           on_shard=lambda i: peak.append(len(os.listdir("/proc/self/fd"))), **kw)
    assert len(list((tmp_path / "s").glob("shard-*.npy"))) == 40
    assert max(peak) - before <= 2  # while extracting: not one open map per finished shard
    np.testing.assert_array_equal(res.features, extract_features(model, data, **kw).features)
