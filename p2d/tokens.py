"""Examples as token ids with response-only labels, and padded batches.

Shared by the proxy run, mining, training and evaluation, so that "response tokens" means the
same thing everywhere: the loss and the pooled head features cover exactly the labelled positions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch

from p2d import P2DError

IGNORE = -100
# auto: the tokenizer's chat template when it has one, else Alpaca. chat: that template (every
# assistant turn trained). alpaca/plain: p2d.data's text prompt, the last assistant turn trained.
TEMPLATES = ("auto", "chat", "alpaca", "plain")
TEMPLATE_HELP = ("Prompt format: auto (the tokenizer's chat template if it has one, else alpaca), chat (every "
                 "assistant turn trained), alpaca (the ALPS paper's), plain.")


@dataclass
class Example:
    """One example, in both forms a template needs. `raw` is the record as read, kept untouched for exports.

    `prompt`/`response`: the text prompt (Alpaca or plain) and the last assistant turn. `messages`:
    the conversation as (role, content) pairs with roles system/user/assistant, ending on an
    assistant turn, which the chat template renders.
    """

    id: str
    prompt: str
    response: str
    domain: str | None = None
    raw: dict = field(default_factory=dict)
    messages: tuple[tuple[str, str], ...] = ()


@dataclass
class Tokenized:
    id: str
    input_ids: list[int]
    labels: list[int]  # IGNORE on prompt (and padding) positions

    def __len__(self) -> int:
        return len(self.input_ids)


class PackedTokens(Sequence):
    """Tokenized samples in flat arrays (ids, a trained-position mask, offsets): a pool costs 3 bytes a
    token (uint16 ids, for vocabularies up to 65,536 such as SmolLM2's and Llama 2's; else 5) instead
    of two Python lists, so a million rows fit in memory. Indexing gives a `Tokenized`, so everything
    that reads samples reads these too."""

    def __init__(self, names: list[str], ids: np.ndarray, trained: np.ndarray, offsets: np.ndarray):
        self.names, self.ids, self.trained, self.offsets = names, ids, trained, offsets

    @classmethod
    def pack(cls, chunks: Iterable[list[Tokenized]], vocab_size: int | None = None) -> "PackedTokens":
        dtype = np.uint16 if vocab_size is not None and vocab_size <= 1 << 16 else np.int32
        names, ids, labels, lengths = [], [], [], []
        for chunk in chunks:  # flattened chunk by chunk: only one chunk is ever held as Python lists
            names += [t.id for t in chunk]
            lengths.append(np.fromiter((len(t) for t in chunk), dtype=np.int64, count=len(chunk)))
            ids.append(np.fromiter((x for t in chunk for x in t.input_ids), dtype=dtype))
            labels.append(np.fromiter((x != IGNORE for t in chunk for x in t.labels), dtype=bool))
        offsets = np.zeros(len(names) + 1, dtype=np.int64)
        if names:
            np.cumsum(np.concatenate(lengths), out=offsets[1:])
        return cls(names, np.concatenate(ids or [np.zeros(0, dtype)]),
                   np.concatenate(labels or [np.zeros(0, bool)]), offsets)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} of {len(self)}")
        i = i % len(self)
        a, b = self.offsets[i], self.offsets[i + 1]
        ids = self.ids[a:b].astype(np.int64)
        return Tokenized(self.names[i], ids.tolist(), np.where(self.trained[a:b], ids, IGNORE).tolist())

    def lengths(self) -> list[int]:
        return np.diff(self.offsets).tolist()


class Rows(Sequence):
    """`make(i)` for each i of `index`, built when read: a shortlist of a million-row pool is never held
    as Python lists at once (hundreds of MB at 300k rows)."""

    def __init__(self, index: Sequence[int], make: Callable[[int], Tokenized]):
        self.index, self.make = index, make

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, j: int) -> Tokenized:
        return self.make(int(self.index[j]))


def token_lengths(tokenized: Sequence[Tokenized]) -> list[int]:
    """Each sample's length, without building every sample of a packed pool."""
    return tokenized.lengths() if isinstance(tokenized, PackedTokens) else [len(t) for t in tokenized]


def sample_ids(tokenized: Sequence[Tokenized]) -> list[str]:
    return list(tokenized.names) if isinstance(tokenized, PackedTokens) else [t.id for t in tokenized]


def resolve_template(template: str, tokenizer) -> str:
    """`auto` made concrete for this tokenizer: "chat" if it has a chat template, else "alpaca"."""
    if template not in TEMPLATES:
        raise P2DError(f"--template must be one of {', '.join(TEMPLATES)}, got {template!r}")
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "chat" and not has_chat:
        raise P2DError("--template chat: this model's tokenizer has no chat template; use --template alpaca")
    if template == "auto":
        return "chat" if has_chat else "alpaca"
    return template


def check_template(template: str, model_spec: str) -> None:
    """`resolve_template` before any model loads: the name always, the tokenizer (only it) for `chat`."""
    from p2d.models import load_tokenizer

    resolve_template(template, load_tokenizer(model_spec) if template == "chat" else None)


def _chat(tokenizer, messages, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in messages], tokenize=False,
                                         add_generation_prompt=generation_prompt)


def chat_segments(example: Example, tokenizer) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, trained) pieces: every assistant turn (with its end-of-turn
    marker) is trained, everything else is context.

    Pieces come from rendering ever longer prefixes of the conversation. A template that rewrites
    earlier turns (some drop past reasoning) breaks that prefix property; then only the last
    assistant turn is trained, as its own prefix always holds.
    """
    msgs = example.messages
    turns = [i for i, (role, _) in enumerate(msgs) if role == "assistant" and i > 0]  # an opening greeting is context
    if not turns:
        raise P2DError(f"example {example.id!r}: no assistant turn to train")
    try:
        pieces, done = [], ""
        for i in turns:
            head, full = _chat(tokenizer, msgs[:i], True), _chat(tokenizer, msgs[: i + 1], False)
            if not (head.startswith(done) and full.startswith(head)):
                head, full = _chat(tokenizer, msgs[: turns[-1]], True), _chat(tokenizer, msgs[: turns[-1] + 1], False)
                if not full.startswith(head):
                    raise P2DError(f"example {example.id!r}: the chat template does not render the prompt as a "
                                   f"prefix of the conversation; use --template alpaca")
                return [(head, False), (full[len(head):], True)]
            pieces += [(head[len(done):], False), (full[len(head):], True)]
            done = full
    except P2DError:
        raise
    except Exception as e:  # jinja raises its own errors (e.g. roles a template rejects)
        raise P2DError(f"example {example.id!r}: the chat template failed ({type(e).__name__}: {e}); "
                       f"use --template alpaca") from e
    return pieces


def end_of_turn_ids(tokenizer) -> list[int]:
    """The token(s) a chat template closes an assistant turn with (`<|im_end|>`, `<|eot_id|>`, ...), which a
    model trained under it learns to emit: generation must stop there, not only at the tokenizer's EOS."""
    probe = Example("probe", "", "x", messages=(("user", "q"), ("assistant", "x")))
    (_, _), (answer, _) = chat_segments(probe, tokenizer)
    marker = answer[answer.index("x") + 1:]
    ids = tokenizer(marker, add_special_tokens=False)["input_ids"][:1] if marker.strip() else []
    return sorted(set(ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])))


def prompt_text(example: Example, tokenizer, template: str) -> str:
    """What the model is shown before it answers: the text prompt, or the chat up to the last
    assistant turn with the template's generation cue."""
    if template != "chat":
        return example.prompt
    last = max(i for i, (role, _) in enumerate(example.messages) if role == "assistant")
    return _chat(tokenizer, example.messages[:last], True)


def kept_span(first: int, n: int, max_length: int) -> tuple[int, int]:
    """[start, end) of the tokens a sample of `n` tokens (first label at `first`) keeps.

    Over-long samples keep the end of the prompt (the instruction's last words and the response
    cue) and as much of the response as fits, so none loses all its labels. `p2d plan` predicts
    lengths with this same rule.
    """
    if n <= max_length:
        return 0, n
    start = first - min(first, max(max_length // 2, max_length - (n - first)))
    return start, start + max_length


def _truncate(ids: list[int], labels: list[int], max_length: int,
              window: int | None = None) -> tuple[list[int], list[int]]:
    first = next((j for j, x in enumerate(labels) if x != IGNORE), len(labels))
    if window is not None:
        ids, labels = ids[: first + window], labels[: first + window]
    start, end = kept_span(first, len(ids), max_length)
    return ids[start:end], labels[start:end]


def tokenize(examples: Iterable[Example], tokenizer, max_length: int = 512, template: str = "alpaca",
             window: int | None = None) -> list[Tokenized]:
    """Token ids with labels on the trained positions only.

    Text templates: prompt (with the tokenizer's special tokens) + response + EOS, the loss on
    response and EOS. The chat template: the rendered conversation (its own special tokens), the
    loss on every assistant turn and its end-of-turn marker. `window`: keep only the first `window`
    tokens from the first trained one (mining reads a sample's prompt and the start of its answer).
    """
    examples = list(examples)
    template = resolve_template(template, tokenizer)
    out = []
    if not examples:  # a chunk whose rows were all skipped
        return out
    if template == "chat":
        segments = [chat_segments(e, tokenizer) for e in examples]
        flat = tokenizer([text for seg in segments for text, _ in seg], add_special_tokens=False)["input_ids"]
        n = 0
        for ex, seg in zip(examples, segments):
            ids, labels = [], []
            for (_, trained), piece in zip(seg, flat[n: n + len(seg)]):
                ids += piece
                labels += piece if trained else [IGNORE] * len(piece)
            n += len(seg)
            out.append(Tokenized(ex.id, *_truncate(ids, labels, max_length, window)))
        return out
    prompts = tokenizer([e.prompt for e in examples], add_special_tokens=True)["input_ids"]
    responses = tokenizer([e.response for e in examples], add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for ex, p, r in zip(examples, prompts, responses):
        r = r + eos
        out.append(Tokenized(ex.id, *_truncate(p + r, [IGNORE] * len(p) + r, max_length, window)))
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
