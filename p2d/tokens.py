"""Examples as token ids with response-only labels, and padded batches.

Shared by the proxy run, mining, training and evaluation, so that "response tokens" means the
same thing everywhere: the loss and the pooled head features cover exactly the labelled positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch

IGNORE = -100


@dataclass
class Example:
    """One instruction-response pair. `raw` is the record as read, kept untouched for exports."""

    id: str
    prompt: str
    response: str
    domain: str | None = None
    raw: dict = field(default_factory=dict)


@dataclass
class Tokenized:
    id: str
    input_ids: list[int]
    labels: list[int]  # IGNORE on prompt (and padding) positions

    def __len__(self) -> int:
        return len(self.input_ids)


def tokenize(examples: Iterable[Example], tokenizer, max_length: int = 512) -> list[Tokenized]:
    """Prompt + response + EOS; the loss covers response and EOS only.

    Over-long samples keep the end of the prompt (the instruction's last words and the
    "### Response:" cue) and as much of the response as fits, so none loses all its labels.
    """
    examples = list(examples)
    prompts = tokenizer([e.prompt for e in examples], add_special_tokens=True)["input_ids"]
    responses = tokenizer([e.response for e in examples], add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = []
    for ex, p, r in zip(examples, prompts, responses):
        r = r + eos
        if len(p) + len(r) > max_length:
            keep_p = min(len(p), max(max_length // 2, max_length - len(r)))
            p = p[len(p) - keep_p:]
            r = r[: max_length - len(p)]
        out.append(Tokenized(ex.id, p + r, [IGNORE] * len(p) + r))
    return out


def collate(batch: list[Tokenized], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample: input_ids, attention_mask, labels (IGNORE on padding)."""
    n = max(len(t) for t in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, t in enumerate(batch):
        ids[i, : len(t)] = torch.tensor(t.input_ids)
        labels[i, : len(t)] = torch.tensor(t.labels)
        mask[i, : len(t)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def length_batches(lengths: list[int], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), so little compute goes to padding.

    A batch holds at most `batch_size` samples and, if `max_tokens` is set, at most that many
    padded tokens. The order is deterministic (ties broken by index).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        width = lengths[cur[0]] if cur else lengths[i]
        if cur and (len(cur) >= batch_size or (max_tokens and width * (len(cur) + 1) > max_tokens)):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches
