"""Shared fixtures: a tiny random GQA Llama saved with a tokenizer trained here, so no test reaches a hub."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

TEXTS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\nWrite a Python function that adds two numbers.\n\n### Response:\ndef add(a, b):\n    return a + b",
    "A baker sells 12 cakes a day for 5 days. How many cakes? 12*5 = 60 cakes.\n#### 60",
    "Sort these words alphabetically: pear apple fig. apple fig pear",
    "def is_even(n):\n    \"\"\"Return True if n is even.\"\"\"\n    return n % 2 == 0",
]


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>", pad_token="<|eos|>")


def tiny_config(vocab_size: int, **overrides):
    from transformers import LlamaConfig

    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=2, head_dim=8, vocab_size=vocab_size, max_position_embeddings=512,
              tie_word_embeddings=True, eos_token_id=0, pad_token_id=0, bos_token_id=None)
    return LlamaConfig(**(kw | overrides))


def random_model(vocab_size: int = 256, **overrides):
    """A tiny random Llama in eval mode (seed 0), for tests that need no tokenizer."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_config(vocab_size, **overrides)).eval()


def random_samples(n: int = 10, seed: int = 0, vocab_size: int = 256):
    """Tokenized samples of random ids: a 2-8 token prompt, then a 1-8 token labelled response."""
    import numpy as np

    from p2d.tokens import IGNORE, Tokenized

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p, r = int(rng.integers(2, 9)), int(rng.integers(1, 9))
        ids = rng.integers(3, vocab_size, p + r).tolist()
        out.append(Tokenized(f"s{i:03d}", ids, [IGNORE] * p + ids[p:]))
    return out


def save_tiny(path: Path, seed: int = 0, **overrides) -> Path:
    from transformers import LlamaForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(len(tok), **overrides))
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A saved tiny Llama (4 layers, 8 heads, 2 KV heads, head_dim 8) with its tokenizer."""
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def small_pool(tmp_path_factory) -> Path:
    """48 rows of the embedded default pool (16 per domain) as Alpaca JSONL."""
    from p2d.default_pool import build_pool

    rows = build_pool()
    picked = [r for d in ("code", "math", "general") for r in [x for x in rows if x["domain"] == d][:16]]
    path = tmp_path_factory.mktemp("pool") / "pool.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in picked))
    return path


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path_factory):
    """No test reaches a hub (the model cache in $P2D_CACHE is shared, so SmolLM2 converts once), and the
    rates test runs achieve stay out of the cache's observed rates (they would steer the user's plans)."""
    observed = tmp_path_factory.getbasetemp() / "observed_rates.json"
    monkeypatch.setattr("p2d.plan._observed_path", lambda: observed)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("P2D_OFFLINE", "1")
