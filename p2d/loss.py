"""Response loss with the LM head run only where a label is: the one place p2d computes it.

Training, the proxy run, mining's quality signal and evaluation all score the same thing, the
next-token loss on response (labelled) positions. The vocabulary projection is the largest single
matmul of a small model's forward, and usually under half the positions carry a label, so the
head runs on the labelled positions only (gathered from the decoder's last hidden state) and the
[batch, length, vocab] logits tensor is never built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from p2d.tokens import IGNORE

CHUNK = 2048  # labelled positions per LM-head call: bounds the logits in memory to CHUNK x vocab


def token_nll(model, hidden: torch.Tensor, labels: torch.Tensor, chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 next-token loss of every labelled position, the batch row of each) from last hidden states.

    hidden: [B, T, d], the decoder's output; labels: [B, T] with IGNORE on unlabelled positions.
    """
    target = labels[:, 1:]
    rows, cols = (target != IGNORE).nonzero(as_tuple=True)
    h, y = hidden[:, :-1][rows, cols], target[rows, cols]
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    losses = []
    for s in range(0, len(y), chunk):
        logits = head(h[s: s + chunk]).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        losses.append(F.cross_entropy(logits, y[s: s + chunk], reduction="none"))
    return (torch.cat(losses) if losses else hidden.new_zeros(0, dtype=torch.float32)), rows


def forward_token_nll(model, batch: dict[str, torch.Tensor], chunk: int = CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_nll` of a collated batch: the decoder forward, then the head on labelled positions only."""
    hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 use_cache=False).last_hidden_state
    return token_nll(model, hidden, batch["labels"], chunk)


def per_row(nll: torch.Tensor, rows: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, labelled-token count) of each of `n_rows` rows, in float64."""
    total = torch.zeros(n_rows, dtype=torch.float64, device=nll.device).index_add_(0, rows, nll.double())
    count = torch.zeros(n_rows, dtype=torch.float64, device=nll.device).index_add_(0, rows, torch.ones_like(nll, dtype=torch.float64))
    return total, count


def row_means(nll: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Mean loss of each row in float64; NaN for a row with no labelled token."""
    total, count = per_row(nll, rows, n_rows)
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))


class ResponseLoss(nn.Module):
    """The model with its summed response loss as the forward: what the trainer (and DeepSpeed) wraps.

    ZeRO-3 gathers and releases parameters from hooks on the module it was given, so the whole
    loss, head included, must run inside that module's forward.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        return forward_token_nll(self.model, batch)[0].sum()
