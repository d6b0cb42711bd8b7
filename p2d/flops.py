"""FLOPs of what p2d actually runs, from a model's config alone (no weights), for AER and `p2d plan`.

Counted as torch's FLOP counter counts them: 2·m·n·k per matmul (attention's two batched matmuls
over the full padded width, as eager and SDPA math kernels compute them; the embedding gather,
norms, RoPE and softmax are not matmuls). What is counted follows what autograd runs:

- forward: every linear of the layers read (mining may stop early), attention, and the LM head
  only on the positions that need logits (labelled positions, p2d.loss);
- backward: nothing below the lowest layer whose input needs a gradient; a matmul's input gradient
  only where its input depends on a trainable tensor, its weight gradient only where the weight
  (or the head delta / LoRA factor on it) trains. A frozen model with head deltas in layer 12
  computes no backward at all in layers 0-11, and in layer 12 no input gradient for q/k/v.

Rows are (rows, width) micro-batches: compute runs on padding too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def from_config(cls, config) -> "Shape":
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        heads = get("num_attention_heads")
        hidden = get("hidden_size")
        return cls(layers=get("num_hidden_layers"), hidden=hidden, heads=heads,
                   kv_heads=get("num_key_value_heads") or heads, head_dim=get("head_dim") or hidden // heads,
                   intermediate=get("intermediate_size"), vocab=get("vocab_size"))

    def linear(self, name: str) -> tuple[int, int]:
        """(in, out) features of one projection."""
        d, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
                "gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d)}[name]

    def params(self) -> int:
        """Parameters of the linears, embeddings and LM head (norms are negligible and left out)."""
        per_layer = sum(a * b for a, b in map(self.linear, LINEARS))
        return self.layers * per_layer + 2 * self.vocab * self.hidden


@dataclass
class Trainable:
    """What trains: whole weights per layer, head deltas / LoRA factors (rank per linear), embeddings, LM head."""

    weights: dict[int, set[str]] = field(default_factory=dict)  # layer -> linears trained whole
    extra: dict[int, dict[str, tuple[str, int]]] = field(default_factory=dict)  # layer -> linear -> (kind, rank)
    embeddings: bool = False
    lm_head: bool = False

    def lowest(self, layers: int) -> int | None:
        """The lowest layer whose computation needs a backward pass (0 when the embeddings train)."""
        if self.embeddings:
            return 0
        trained = [l for l in range(layers) if self.weights.get(l) or self.extra.get(l)]
        return min(trained) if trained else (layers if self.lm_head else None)


def trainable_for(scope: str, shape: Shape, heads: list[tuple[int, int]] = (), train_o: bool = False,
                  lora_rank: int = 128, kv_scope: str = "shared") -> Trainable:
    """The Trainable of a p2d scope (p2d.masking.apply_scope), from the config and head list alone."""
    mlp = {"gate_proj", "up_proj", "down_proj"}
    every = range(shape.layers)
    t = Trainable()
    if scope in ("full", "no-attn", "alps"):
        t.embeddings = t.lm_head = True
        t.weights = {l: set(LINEARS) if scope == "full" else set(mlp) for l in every}
    if scope == "qkv":
        t.weights = {l: {"q_proj", "k_proj", "v_proj"} for l in every}
    if scope == "lora":
        t.extra = {l: {n: ("lora", lora_rank) for n in ("q_proj", "k_proj", "v_proj")} for l in every}
    if scope in ("heads", "alps", "random", "lc"):
        group = shape.heads // shape.kv_heads
        by_layer: dict[int, set[int]] = {}
        for layer, h in heads:
            by_layer.setdefault(int(layer), set()).add(int(h))
        for layer, hs in by_layer.items():
            q = len(hs) * shape.head_dim
            kv = len({h // group for h in hs}) * shape.head_dim
            spec = {"q_proj": ("rows", q)}
            if kv_scope == "shared":
                spec |= {"k_proj": ("rows", kv), "v_proj": ("rows", kv)}
            if train_o:
                spec["o_proj"] = ("cols", q)
            t.extra[layer] = spec
    return t


def _tokens(batches: list[tuple[int, int]]) -> int:
    return sum(r * w for r, w in batches)


def _attention(shape: Shape, batches: list[tuple[int, int]]) -> int:
    """QKᵀ and PV over the full padded width, every head."""
    return sum(r * 2 * 2 * w * w * shape.heads * shape.head_dim for r, w in batches)


def _extra_forward(shape: Shape, name: str, kind: str, rank: int) -> int:
    """Per-token forward FLOPs of a delta or LoRA on one linear."""
    n_in, n_out = shape.linear(name)
    return {"rows": 2 * n_in * rank, "cols": 2 * rank * n_out, "lora": 2 * n_in * rank + 2 * rank * n_out}[kind]


def forward(shape: Shape, batches: list[tuple[int, int]], logit_positions: int, layers: int | None = None,
            trainable: Trainable | None = None) -> int:
    """One forward: `layers` decoder layers (default all), and the LM head on `logit_positions` positions."""
    layers = shape.layers if layers is None else layers
    tokens = _tokens(batches)
    per_layer = tokens * sum(2 * a * b for a, b in map(shape.linear, LINEARS)) + _attention(shape, batches)
    extra = sum(tokens * _extra_forward(shape, n, k, r) for l, spec in (trainable.extra if trainable else {}).items()
                if l < layers for n, (k, r) in spec.items())
    return layers * per_layer + extra + 2 * shape.hidden * shape.vocab * logit_positions


def backward(shape: Shape, batches: list[tuple[int, int]], logit_positions: int, trainable: Trainable) -> int:
    """The backward autograd runs for `trainable` (see the module docstring)."""
    low = trainable.lowest(shape.layers)
    if low is None:
        return 0
    tokens = _tokens(batches)
    head = 2 * shape.hidden * shape.vocab * logit_positions
    total = head * trainable.lm_head + (head if low < shape.layers else 0)  # weight grad; input grad to the body
    for layer in range(low, shape.layers):
        whole, extra = trainable.weights.get(layer, set()), trainable.extra.get(layer, {})
        # inputs that need a gradient: everything above the lowest layer; in it, what trainable work feeds
        body_grad = layer > low or trainable.embeddings
        attn_grad = body_grad or bool(whole & {"q_proj", "k_proj", "v_proj"}) or any(
            n in extra for n in ("q_proj", "k_proj", "v_proj"))
        o_in_grad = attn_grad
        mlp_in_grad = attn_grad or "o_proj" in whole or "o_proj" in extra
        needs_input = {"q_proj": body_grad, "k_proj": body_grad, "v_proj": body_grad, "o_proj": o_in_grad,
                       "gate_proj": mlp_in_grad, "up_proj": mlp_in_grad,
                       "down_proj": mlp_in_grad or bool(whole & {"gate_proj", "up_proj"})}
        for name in LINEARS:
            n_in, n_out = shape.linear(name)
            mm = tokens * 2 * n_in * n_out
            total += mm * needs_input[name] + mm * (name in whole)
            if name in extra:
                kind, rank = extra[name]
                total += tokens * _extra_backward(n_in, n_out, kind, rank, needs_input[name])
        # QKᵀ gives dQ and dK, PV gives dP and dV, each as costly as one of the two forward matmuls,
        # and each only where that side depends on something trainable
        q, k, v = (body_grad or n in whole or n in extra for n in ("q_proj", "k_proj", "v_proj"))
        total += _attention(shape, batches) // 2 * (q + k + (q or k) + v)
    return total


def _extra_backward(n_in: int, n_out: int, kind: str, rank: int, input_grad: bool) -> int:
    """Per-token backward FLOPs of a delta or LoRA: its weight gradient(s), and its input gradient if needed."""
    if kind == "rows":  # out[rows] += x @ Δᵀ, Δ: rank x in
        return 2 * n_in * rank * (1 + input_grad)
    if kind == "cols":  # out += x[cols] @ Δᵀ, Δ: out x rank
        return 2 * rank * n_out * (1 + input_grad)
    # LoRA: h = x @ Aᵀ (rank x in), out += h @ Bᵀ (out x rank): B's weight and input grads, A's weight grad
    return 2 * rank * n_out * 2 + 2 * n_in * rank * (1 + input_grad)


def train_step(shape: Shape, batches: list[tuple[int, int]], logit_positions: int, trainable: Trainable) -> int:
    """Forward + backward of one optimizer step (the optimizer's elementwise update is not a matmul)."""
    return forward(shape, batches, logit_positions, trainable=trainable) + backward(shape, batches, logit_positions,
                                                                                    trainable)
