"""`p2d train`: fine-tune one model in a given scope and save it merged (plain HF) and as a delta adapter."""

from __future__ import annotations

import importlib.util
import math
import shutil
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path

from rich.console import Console

from p2d import P2DError
from p2d.config import check_choices, option
from p2d.data import FIELDS_HELP
from p2d.geometry import AttentionGeometry
from p2d.io import write_json, write_text
from p2d.masking import HEAD_SCOPES, KV_SCOPES, SCOPES, scope_help
from p2d.models import DEFAULT_MODEL, MODEL_HELP, load_model
from p2d.tokens import TEMPLATE_HELP, TEMPLATES
from p2d.trainer import NOT_IN_KEY, TrainConfig

console = Console(stderr=True)
# Defaults that the selection benchmark trains with (docs/BENCHMARKS.md#selection): scopes with few
# trainable parameters take a 20x larger peak lr than those that train whole matrices, and one epoch
# (30 steps on 120 rows) was too short for the choice of data to show in held-out loss.
DEFAULT_LR = {"heads": 1e-3, "random": 1e-3, "lc": 1e-3, "lora": 1e-3,
              "alps": 5e-5, "full": 5e-5, "no-attn": 5e-5, "qkv": 5e-5}
DEFAULT_EPOCHS = 2
DEFAULT_MAX_LENGTH = 256  # tokens per training sample


LR_HELP = ("Peak learning rate, cosine to 10% after 10% warmup (default: the scope's, "
           + "; ".join(f"{lr:g} for {', '.join(s for s in DEFAULT_LR if DEFAULT_LR[s] == lr)}"
                       for lr in sorted(set(DEFAULT_LR.values()), reverse=True)) + ").")


def default_lr(scope: str) -> float:
    return DEFAULT_LR.get(scope, DEFAULT_LR["full"])


def default_loop(**options) -> TrainConfig:
    """The training loop `p2d train` and `p2d run` start from: the benchmark's epochs and length, the heads
    scope's lr (a caller that picks another scope passes its `default_lr`)."""
    return TrainConfig(**({"lr": default_lr("heads"), "epochs": DEFAULT_EPOCHS, "max_length": DEFAULT_MAX_LENGTH}
                          | options))


@dataclass
class TrainRunConfig:
    data: str | list[str] = option(MISSING, "Training data (e.g. a mined selected.jsonl).")  # several sources: one set
    model: str = option(DEFAULT_MODEL, MODEL_HELP)
    heads: str | None = option(None, "heads.json (head scopes).")
    scope: str = option("heads", scope_help(SCOPES), choices=SCOPES)
    train_o: bool = option(False, "Also train the selected heads' o_proj columns.")
    kv_scope: str = option("shared", "shared: also train the heads' KV groups (k/v rows other query heads read "
                                     "too); none: query rows only, so 10% of heads stays 10% under heavy GQA.",
                           choices=KV_SCOPES)
    overwrite: bool = option(False, "Discard a checkpoint in --out that another run (other data or options) wrote.")
    lora_rank: int = option(128, "Rank of --scope lora.")
    fields: str | None = option(None, FIELDS_HELP)
    # the merged model is served with the template it was trained in
    template: str = option("auto", TEMPLATE_HELP, choices=TEMPLATES)
    train: TrainConfig = field(default_factory=TrainConfig)  # the CLI starts from default_loop()

    def __post_init__(self) -> None:
        from p2d.data import pool_spec

        self.data = pool_spec(self.data)

    def validate(self) -> None:
        from p2d.tokens import check_template

        self.validate_options()
        check_template(self.template, self.model)
        if self.scope in HEAD_SCOPES and not self.heads:
            raise P2DError(f"--scope {self.scope} trains selected heads: pass --heads heads.json")
        if self.heads and not Path(self.heads).is_file():
            raise P2DError(f"--heads: file not found: {self.heads}")

    def validate_options(self) -> None:
        """Options that are wrong whatever the data: checked before any stage runs (the template: `check_template`)."""
        check_choices(self)
        check_loop(self.train)


def check_loop(t: TrainConfig) -> None:
    """The training loop's options, named as the CLI spells them."""
    if t.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise P2DError("--tensorboard needs the tensorboard package: pip install tensorboard")
    if t.max_steps is None and t.epochs <= 0:
        raise P2DError(f"--epochs must be positive, got {t.epochs}")
    if t.max_steps is not None and t.max_steps <= 0:
        raise P2DError(f"--max-steps must be positive, got {t.max_steps}")
    if not (math.isfinite(t.lr) and t.lr > 0):
        raise P2DError(f"--lr must be a positive number, got {t.lr}")
    if not (math.isfinite(t.weight_decay) and t.weight_decay >= 0):
        raise P2DError(f"--weight-decay must be a non-negative number, got {t.weight_decay}")
    if t.batch_size <= 0 or t.grad_accum <= 0:
        raise P2DError("--batch-size and --grad-accum must be positive")
    if t.max_length < 2:
        raise P2DError(f"--max-length must be at least 2 tokens, got {t.max_length}")
    if t.save_every <= 0:
        raise P2DError(f"--save-every must be positive, got {t.save_every}")
    if t.deepspeed is not None:
        from p2d.trainer import check_extension_locks, resolve_deepspeed

        resolve_deepspeed(t)  # its file, JSON and stage, before any model loads
        check_extension_locks()


def run_key(cfg: TrainRunConfig, heads, data) -> str:
    """What a checkpoint must have been trained on to be resumed: model, tokenized data, heads and options."""
    import hashlib
    import json

    from p2d.features import fingerprint
    from p2d.models import model_digest

    options = {k: v for k, v in asdict(cfg.train).items() if k not in NOT_IN_KEY}
    blob = {"model": model_digest(cfg.model), "data": fingerprint(data), "heads": heads, "scope": cfg.scope,
            "kv_scope": cfg.kv_scope, "train_o": cfg.train_o, "lora_rank": cfg.lora_rank, "train": options,
            "template": cfg.template,
            "deepspeed": cfg.train.deepspeed is not None}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


TEMPLATE_NOTE = {
    "chat": "the model's chat template (`tokenizer.apply_chat_template`), loss on every assistant turn; "
            "the tokenizer here carries that template",
    "alpaca": "Alpaca (`### Instruction:` / `### Input:` / `### Response:`), loss on the response; the "
              "tokenizer's chat template here renders that prompt, so chat APIs (vLLM, transformers) prompt "
              "the model as it was trained",
    "plain": "plain (`instruction` then `input`, one per line), loss on the response",
}


def model_card(cfg: TrainRunConfig, summary: dict, heads) -> str:
    """README.md of the merged model: base, heads, data, template and how it was trained."""
    import yaml

    from p2d.models import resolve_model

    meta = {"base_model": resolve_model(cfg.model), "library_name": "transformers", "tags": ["p2d", cfg.scope]}
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "",
             f"# {cfg.scope} fine-tune of `{cfg.model}` by p2d", "",
             f"- **Trained**: scope `{cfg.scope}` (kv scope `{cfg.kv_scope}`, o columns {'yes' if cfg.train_o else 'no'}), "
             f"{summary['trainable_params']:,} of {summary['total_params']:,} parameters, "
             f"{summary['steps']} steps, lr {cfg.train.lr:g}, {cfg.train.epochs} epochs, final loss "
             f"{summary['final_loss']:.4f}.",
             f"- **Data**: `{cfg.data}` ({summary['samples']} samples), loss on response tokens only.",
             f"- **Prompt template**: {TEMPLATE_NOTE[summary['template']]}.",
             f"- **Heads** ({len(heads or [])}): " + (", ".join(f"L{l}H{h}" for l, h in heads) if heads else "none"),
             "", "Loads with plain `transformers` (`AutoModelForCausalLM.from_pretrained`); the adapter beside it "
             "(`../adapter`) loads with peft."]
    return "\n".join(lines) + "\n"


def train_model(cfg: TrainRunConfig, out_dir: str | Path, progress: bool = True) -> dict:
    """Train, then write out_dir/model (merged), out_dir/adapter (head scopes) and out_dir/train.json."""
    from p2d.data import load_examples
    from p2d.masking import apply_scope, merge_adapter
    from p2d.selection import read_heads_json
    from p2d.tokens import resolve_template, tokenize
    from p2d.trainer import partitioned_loading, train

    cfg.validate()
    out_dir = Path(out_dir)
    examples = load_examples(cfg.data, fields=cfg.fields, template=cfg.template)
    with partitioned_loading(cfg.train) as partitioned:  # ZeRO-3: each rank loads only its part of the model
        model, tok = load_model(cfg.model)
        template = resolve_template(cfg.template, tok)
        geom = AttentionGeometry.from_config(model.config)
        heads = read_heads_json(cfg.heads, geom).heads if cfg.heads else None
        info = apply_scope(model, geom, cfg.scope, heads, train_o=cfg.train_o, kv_scope=cfg.kv_scope,
                           lora_rank=cfg.lora_rank)
        console.print(f"[bold]train[/] scope {cfg.scope}: {info.trainable_params:,} of {info.total_params:,} "
                      f"parameters trainable ({info.trainable_params / info.total_params:.2%}), {len(examples)} samples")
        data = tokenize(examples, tok, cfg.train.max_length, template)
        result = train(model, data, tok.pad_token_id, cfg.train, out_dir, progress=progress,  # adapter -> out_dir/adapter
                       run_key=run_key(cfg, heads, data), overwrite=cfg.overwrite)
    if cfg.heads and (out_dir / "adapter").is_dir():
        shutil.copyfile(cfg.heads, out_dir / "adapter" / "heads.json")
    if _rank() == 0:  # one path for every backend: the base (fp32) plus the trained tensors, saved in the base's dtype
        from p2d.data import text_chat_template

        merge_adapter(cfg.model, out_dir / "adapter", out_dir / "model",
                      chat_template=None if template == "chat" else text_chat_template(tok, template))
    summary = {"model": cfg.model, "data": cfg.data, "samples": len(data), "scope": cfg.scope, "template": template,
               "heads": cfg.heads, "trainable_params": info.trainable_params, "total_params": info.total_params,
               "config": asdict(cfg.train), "steps": result.steps, "seconds": result.seconds,
               "tokens": result.tokens, "tokens_per_s": result.tokens_per_s, "final_loss": result.final_loss,
               "resumed_from": result.resumed_from, "partitioned_load": partitioned}
    if _rank() == 0:
        import json

        from p2d.plots import plot_losses
        from p2d.trainer import LOG

        log = [json.loads(line) for line in (out_dir / LOG).read_text(encoding="utf-8").splitlines() if line.strip()]
        if log:
            plot_losses(log, out_dir / "loss.png", f"{cfg.scope} on {len(data)} samples")
        write_text(out_dir / "model" / "README.md", model_card(cfg, summary, heads))
        names = [name for name in ("model", "adapter", LOG, "loss.png") if (out_dir / name).exists()]
        summary["outputs"] = {name: str(out_dir / name) for name in names}
        write_json(out_dir / "train.json", summary | {"outputs": {name: name for name in names}})  # movable: relative
    return summary


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
