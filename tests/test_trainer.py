"""The training loop: response-only loss, schedule, data plan, resume and accumulation equivalence."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from p2d import P2DError
from p2d.geometry import AttentionGeometry
from p2d.loss import ResponseLoss
from p2d.masking import apply_scope
from p2d.tokens import IGNORE, Tokenized
from p2d.trainer import TrainConfig, resolve_deepspeed, _Run, deepspeed_config, lr_factor, \
    step_plan, train

HEADS = [(0, 1), (1, 5), (2, 7)]


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                        num_attention_heads=8, num_key_value_heads=2, head_dim=8, vocab_size=128))


def heads_model() -> LlamaForCausalLM:
    model = tiny_model()
    apply_scope(model, AttentionGeometry.from_config(model.config), "heads", HEADS, train_o=True)
    return model


def data(n: int = 8, lengths=None, seed: int = 0) -> list[Tokenized]:
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or [12] * n
    out = []
    for i, length in enumerate(lengths):
        ids = torch.randint(1, 128, (length,), generator=g).tolist()
        out.append(Tokenized(str(i), ids, [IGNORE] * (length // 3) + ids[length // 3:]))
    return out


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_loss_covers_only_labelled_tokens():
    model = tiny_model().eval()
    ids = torch.randint(1, 128, (1, 10), generator=torch.Generator().manual_seed(1))
    labels = torch.full_like(ids, IGNORE)
    labels[0, [4, 7, 9]] = ids[0, [4, 7, 9]]
    with torch.no_grad():
        got = ResponseLoss(model)(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
        logits = model(ids).logits[0]
        manual = sum(F.cross_entropy(logits[p - 1], ids[0, p]) for p in (4, 7, 9))
    assert torch.allclose(got, manual, atol=1e-5)


def test_step_loss_is_mean_over_response_tokens_of_the_whole_step(tmp_path):
    """Padded samples of different lengths, two micro-batches: the logged loss is Σ token CE / Σ tokens."""
    samples = data(lengths=[5, 9, 12, 7])
    model = tiny_model()
    with torch.no_grad():
        ce, n = 0.0, 0
        for t in samples:
            logits = model(torch.tensor([t.input_ids])).logits[0, :-1]
            labels = torch.tensor(t.labels[1:])
            ce += F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum").item()
            n += int((labels != IGNORE).sum())
    cfg = TrainConfig(batch_size=2, grad_accum=2, max_steps=1, save_every=100)
    result = train(model, samples, pad_id=0, config=cfg, out_dir=tmp_path, progress=False)
    assert result.losses[0] == pytest.approx(ce / n, rel=1e-5)
    assert result.tokens == sum(len(t) for t in samples)


def test_cosine_schedule():
    total = 100
    f = [lr_factor(s, total, 0.1, 0.1) for s in range(total)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # linear warmup to the peak
    assert f[10] == pytest.approx(1.0) and f[-1] == pytest.approx(0.1)  # cosine down to 10 % at the last step
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert f[10 + 89 // 2] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 44 / 89)))


def test_step_plan_is_deterministic_and_splits_ranks():
    lengths = [5, 9, 12, 7, 8, 8, 3, 10, 11]
    cfg = TrainConfig(batch_size=2, grad_accum=1, seed=3)
    assert step_plan(lengths, cfg, 0) == step_plan(lengths, cfg, 0)
    assert step_plan(lengths, cfg, 0) != step_plan(lengths, cfg, 1)
    r0, r1 = step_plan(lengths, cfg, 0, world=2, rank=0), step_plan(lengths, cfg, 0, world=2, rank=1)
    assert len(r0) == len(r1) and [len(s) for s in r0] == [len(s) for s in r1]
    seen = [i for plan in (r0, r1) for step in plan for mb in step for i in mb]
    assert len(seen) == len(set(seen)) == 8  # 9 samples, one trimmed so both ranks get equal work


def test_resume_gives_the_same_weights(tmp_path, monkeypatch):
    cfg = TrainConfig(lr=1e-2, batch_size=2, max_steps=6, save_every=2, seed=1)  # 4 steps per epoch: crosses one
    samples = data(lengths=[12, 12, 9, 9, 7, 7, 11, 5])
    straight = heads_model()
    full = train(straight, samples, 0, cfg, tmp_path / "a", progress=False)

    save = _Run.save

    def crash_after_step_4(self, out_dir, state):
        save(self, out_dir, state)
        if state["step"] == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(_Run, "save", crash_after_step_4)
    with pytest.raises(KeyboardInterrupt):
        train(heads_model(), samples, 0, cfg, tmp_path / "b", progress=False)
    monkeypatch.setattr(_Run, "save", save)
    resumed_model = heads_model()
    resumed = train(resumed_model, samples, 0, cfg, tmp_path / "b", progress=False)

    assert resumed.resumed_from == 4 and resumed.steps == 6
    assert resumed.losses == full.losses
    a, b = trainable(straight), trainable(resumed_model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(P2DError, match="6 steps"):  # a different run in the same directory is refused
        train(heads_model(), samples, 0, TrainConfig(max_steps=8, batch_size=2), tmp_path / "b", progress=False)


def test_grad_accumulation_matches_a_big_batch(tmp_path):
    samples = data(8)
    one, two = heads_model(), heads_model()
    r1 = train(one, samples, 0, TrainConfig(lr=1e-2, batch_size=4, grad_accum=1), tmp_path / "a", progress=False)
    r2 = train(two, samples, 0, TrainConfig(lr=1e-2, batch_size=2, grad_accum=2), tmp_path / "b", progress=False)
    assert r1.steps == r2.steps == 2
    assert r1.losses == pytest.approx(r2.losses, rel=1e-6)
    a, b = trainable(one), trainable(two)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_deepspeed_config_auto_fields(tmp_path):
    cfg = TrainConfig(batch_size=3, grad_accum=2, max_grad_norm=0.5, dtype=torch.float32)
    generated = deepspeed_config(3, cfg)
    assert generated["zero_optimization"]["stage"] == 3 and generated["bf16"]["enabled"] is False
    user = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "bf16": {"enabled": "auto"},
            "zero_optimization": {"stage": 2}}
    resolved = resolve_deepspeed(TrainConfig(batch_size=3, grad_accum=2, max_grad_norm=0.5, dtype=torch.float32,
                                              deepspeed=user))
    assert resolved["train_micro_batch_size_per_gpu"] == 3 and resolved["gradient_accumulation_steps"] == 2
    assert resolved["gradient_clipping"] == 0.5 and "train_batch_size" not in resolved
    assert resolved["bf16"]["enabled"] is False and resolved["zero_allow_untested_optimizer"] is True
    with pytest.raises(P2DError, match="optimizer"):
        resolve_deepspeed(TrainConfig(deepspeed={"optimizer": {"type": "AdamW"}}))
    with pytest.raises(P2DError, match="disagrees"):
        resolve_deepspeed(TrainConfig(batch_size=4, deepspeed={"train_micro_batch_size_per_gpu": 8}))
    with pytest.raises(P2DError, match="cannot read"):
        resolve_deepspeed(TrainConfig(deepspeed=tmp_path / "missing.json"))
