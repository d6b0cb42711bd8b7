"""p2d's FLOP model equals torch's FLOP counter on what really runs (tiny Llama, eager attention)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import random_model, random_samples
from p2d.flops import Shape, forward, train_step, trainable_for
from p2d.geometry import AttentionGeometry
from p2d.loss import ResponseLoss, forward_token_nll
from p2d.masking import apply_scope
from p2d.tokens import IGNORE, collate

HEADS = [(1, 2), (1, 3), (3, 7)]  # lowest trainable layer 1: layer 0 runs no backward


def batch_and_counts():
    batch = collate(random_samples(6, seed=7), pad_id=0)
    rows, width = batch["input_ids"].shape
    labelled = int((batch["labels"][:, 1:] != IGNORE).sum())
    return batch, [(rows, width)], labelled


def counted(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def test_forward_with_logits_on_labelled_positions():
    model = random_model(attn_implementation="eager")
    batch, batches, labelled = batch_and_counts()
    with torch.no_grad():
        got = counted(lambda: forward_token_nll(model, batch))
    assert got == forward(Shape.from_config(model.config), batches, labelled)


def test_forward_stopping_after_some_layers():
    model = random_model(attn_implementation="eager")
    batch, batches, _ = batch_and_counts()
    model.model.layers = model.model.layers[:2]  # what an early-stopped mining pass runs
    with torch.no_grad():
        got = counted(lambda: model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]))
    assert got == forward(Shape.from_config(random_model().config), batches, 0, layers=2)


@pytest.mark.parametrize("scope,train_o,kv", [("heads", False, "shared"), ("heads", True, "shared"),
                                              ("heads", True, "none"), ("full", False, "shared"),
                                              ("qkv", False, "shared"), ("lora", False, "shared"),
                                              ("alps", False, "shared"), ("no-attn", False, "shared")])
def test_training_step(scope, train_o, kv):
    model = random_model(attn_implementation="eager").train()
    shape = Shape.from_config(model.config)
    apply_scope(model, AttentionGeometry.from_config(model.config), scope, HEADS, train_o=train_o, lora_rank=4,
                kv_scope=kv)
    batch, batches, labelled = batch_and_counts()
    got = counted(lambda: ResponseLoss(model)(**batch).backward())
    assert got == train_step(shape, batches, labelled,
                             trainable_for(scope, shape, HEADS, train_o, lora_rank=4, kv_scope=kv))


def test_heads_step_cost_grows_with_the_depth_of_backward():
    """Heads in a higher layer need backward through fewer layers; all are cheaper than full training."""
    shape = Shape.from_config(random_model().config)
    _, batches, labelled = batch_and_counts()
    cost = {h: train_step(shape, batches, labelled, trainable_for("heads", shape, [h])) for h in [(0, 0), (1, 0), (3, 0)]}
    full = train_step(shape, batches, labelled, trainable_for("full", shape))
    assert cost[(3, 0)] < cost[(1, 0)] < cost[(0, 0)] < full
