"""The response loss with the LM head on labelled positions only equals the full-logits loss."""

import pytest
import torch
import torch.nn.functional as F

from conftest import random_model, random_samples
from p2d.loss import forward_token_nll, row_means
from p2d.tokens import IGNORE, collate


def full_logits_loss(model, batch):
    """The textbook computation: every position's logits, then cross-entropy ignoring unlabelled ones."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    per_token = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
    return per_token.sum(1), (labels != IGNORE).sum(1)


def gemma2_softcapped():
    """A tiny Gemma 2, whose forward soft-caps the logits (the case the head-only path must repeat)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    return Gemma2ForCausalLM(Gemma2Config(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                          final_logit_softcapping=3.0)).eval()


@pytest.mark.parametrize("make", [random_model, gemma2_softcapped], ids=["llama", "gemma2-softcap"])
def test_labelled_positions_only_equals_full_logits(make):
    model = make()
    batch = collate(random_samples(12, seed=3), pad_id=0)
    nll, rows = forward_token_nll(model, batch, chunk=7)  # a chunk smaller than the positions: several head calls
    want_sum, want_count = full_logits_loss(model, batch)
    assert len(nll) == int(want_count.sum())
    assert torch.allclose(nll.sum().double(), want_sum.sum().double(), atol=1e-5, rtol=1e-5)
    assert torch.allclose(row_means(nll, rows, len(want_sum)), (want_sum / want_count).double(), atol=1e-5)


def test_gradients_match_full_logits():
    """The trainer's loss: same gradients on every weight as the full-logits loss."""
    batch = collate(random_samples(6, seed=4), pad_id=0)
    a, b = random_model().train(), random_model().train()
    forward_token_nll(a, batch)[0].sum().backward()
    full_logits_loss(b, batch)[0].sum().backward()
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-5), name


def test_row_without_labels_is_nan():
    samples = random_samples(3, seed=5)
    samples[1] = type(samples[1])(samples[1].id, samples[1].input_ids, [IGNORE] * len(samples[1].input_ids))
    nll, rows = forward_token_nll(random_model(), collate(samples, pad_id=0))
    means = row_means(nll, rows, 3)
    assert torch.isnan(means[1]) and not torch.isnan(means[[0, 2]]).any()
