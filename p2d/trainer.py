"""The one training loop: single process, or DeepSpeed ZeRO (any stage, any number of ranks).

Every scope trains through this loop, so the loss (mean over response tokens of the whole
accumulated batch), the schedule, the data order and checkpoint/resume are identical across
head, ALPS, LoRA and full fine-tuning runs; only the set of trainable tensors differs.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from p2d import P2DError
from p2d.config import option
from p2d.io import replace_dir, write_json
from p2d.loss import ResponseLoss
from p2d.masking import adapter_state, save_adapter
from p2d.models import default_device, default_dtype
from p2d.tokens import IGNORE, Tokenized, collate, length_batches

CHECKPOINT = "checkpoint"
LOG = "train_log.jsonl"  # one line per optimizer step: step, epoch, loss, lr, tokens, seconds


@dataclass
class TrainConfig:
    lr: float = option(1e-4, "Peak learning rate, cosine to 10% after 10% warmup.")
    weight_decay: float = option(0.1, "AdamW weight decay (frozen weights never decay: they are not parameters).")
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.1  # cosine decay ends at this fraction of the peak lr
    batch_size: int = option(4, "Micro-batch size per process.")
    grad_accum: int = option(1, "Micro-batches per optimizer step (effective batch: batch size x this x ranks).")
    epochs: int = option(1, "Epochs over the data.")
    max_steps: int | None = option(None, "Optimizer steps (overrides --epochs).")
    max_length: int = option(512, "Tokens per sample.")
    seed: int = option(0, "Seed of the data order and of anything random in the scope.")
    save_every: int = option(50, "Optimizer steps between resumable checkpoints.")
    deepspeed: str | os.PathLike | dict | None = option(None, "DeepSpeed JSON config (ZeRO-0..3); or launch with the "
                                                              "deepspeed launcher or torchrun.")
    dtype: torch.dtype | None = None  # None: p2d.models.default_dtype (fp32 CPU, bf16 GPU)
    log_every: int = 1
    tensorboard: bool = option(False, "Also log loss, lr and tokens/s to OUT/tensorboard (needs the tensorboard "
                                      "package).")
    max_grad_norm: float = 1.0


# TrainConfig fields that change how a run is checkpointed, logged or launched, never what it computes:
# left out of checkpoint keys and stage cache keys, so changing them resumes instead of starting over
NOT_IN_KEY = ("save_every", "log_every", "deepspeed", "tensorboard")


@dataclass
class TrainResult:
    steps: int
    seconds: float
    tokens: int
    tokens_per_s: float
    final_loss: float | None
    losses: list[float] = field(default_factory=list)
    resumed_from: int | None = None
    # per optimizer step: seconds and padded positions processed (what a step costs, padding included)
    step_seconds: list[float] = field(default_factory=list)
    step_positions: list[int] = field(default_factory=list)


def lr_factor(step: int, total: int, warmup_ratio: float = 0.1, min_lr_ratio: float = 0.1) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based) of `total`.

    Linear warmup reaching the peak at the last warmup step, then cosine decay that reaches
    `min_lr_ratio` exactly at the last step.
    """
    warmup = math.ceil(warmup_ratio * total)
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup - 1))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def deepspeed_config(stage: int, config: TrainConfig) -> dict:
    """A DeepSpeed config for ZeRO `stage` (0-3) matching `config`.

    p2d passes its own torch AdamW and lr schedule as client objects (no CPU-Adam extension
    build), hence no optimizer/scheduler sections and `zero_allow_untested_optimizer`.
    Stage 3 partitions the frozen base weights too; the head deltas are ordinary parameters.
    """
    if stage not in (0, 1, 2, 3):
        raise P2DError(f"ZeRO stage must be 0, 1, 2 or 3, not {stage}")
    zero: dict = {"stage": stage}
    if stage >= 2:
        zero |= {"overlap_comm": False, "contiguous_gradients": True}
    if stage == 3:
        zero |= {"stage3_gather_16bit_weights_on_model_save": True}
    return {
        "train_micro_batch_size_per_gpu": config.batch_size,
        "gradient_accumulation_steps": config.grad_accum,
        "gradient_clipping": config.max_grad_norm,
        "bf16": {"enabled": _dtype(config) == torch.bfloat16},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def launcher_env() -> None:
    """A single process started without a launcher gets the rendezvous variables one would set.

    So `p2d train --deepspeed ds.json` runs as written (DeepSpeed otherwise tries MPI discovery).
    """
    if "RANK" in os.environ:
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


@contextlib.contextmanager
def single_process() -> Iterator[None]:
    """Train in this process alone although a launcher started several (rank 0's own stages of a
    multi-rank `p2d run`: the proxy, the reference estimate)."""
    saved = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("WORLD_SIZE")
        else:
            os.environ["WORLD_SIZE"] = saved


@contextlib.contextmanager
def partitioned_loading(config: TrainConfig) -> Iterator[bool]:
    """Under ZeRO-3, models loaded inside are partitioned across the ranks as they load (transformers'
    `zero.Init` through `HfDeepSpeedConfig`), so no rank ever holds the whole model; yields whether
    that applies. Leave it before loading a model for one rank alone (the merge on rank 0)."""
    ds_config = resolve_deepspeed(config)
    if ds_config is None or ds_config.get("zero_optimization", {}).get("stage") != 3:
        yield False
        return
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    launcher_env()
    if torch.cuda.is_available():
        torch.cuda.set_device(default_device())
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    keep = HfDeepSpeedConfig(ds_config)  # transformers holds only a weak reference: this keeps it alive
    try:
        yield True
    finally:
        unset_hf_deepspeed_config()
        del keep


def _dtype(config: TrainConfig) -> torch.dtype:
    return config.dtype or default_dtype()


STALE_LOCK_S = 600  # a DeepSpeed extension builds in about a minute; a lock this old was left by a killed build


def check_extension_locks() -> None:
    """Fail with the path instead of hanging: torch waits forever on the build lock that a run killed while
    DeepSpeed compiled its CPU extension leaves behind ($TORCH_EXTENSIONS_DIR/<python>/<extension>/lock)."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    now = time.time()
    for lock in sorted(root.glob("*/*/lock")) + sorted(root.glob("*/lock")):
        age = now - lock.stat().st_mtime
        if age > STALE_LOCK_S:
            raise P2DError(f"{lock}: a build lock {age / 60:.0f} min old, left by a run killed while DeepSpeed "
                           f"compiled an extension; with no build running, delete it and run again")


def resolve_deepspeed(config: TrainConfig) -> dict | None:
    """The DeepSpeed config to run with, "auto" fields filled from `config`; None for single-process."""
    raw = config.deepspeed
    if raw is None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise P2DError("started with several processes (WORLD_SIZE > 1) but no DeepSpeed config was given")
        return None
    if not isinstance(raw, dict):
        try:
            raw = json.loads(Path(raw).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise P2DError(f"cannot read DeepSpeed config {config.deepspeed}: {e}") from e
    where = config.deepspeed if not isinstance(config.deepspeed, dict) else "DeepSpeed config"
    if not isinstance(raw, dict):
        raise P2DError(f"{where}: a DeepSpeed config is a JSON object, got {type(raw).__name__}")
    cfg = json.loads(json.dumps(raw))
    zero = cfg.get("zero_optimization", {})
    if not isinstance(zero, dict) or zero.get("stage", 0) not in (0, 1, 2, 3):
        raise P2DError(f"{where}: zero_optimization.stage must be 0, 1, 2 or 3, got "
                       f"{zero.get('stage') if isinstance(zero, dict) else zero!r}")
    for key in ("optimizer", "scheduler"):
        if key in cfg:
            raise P2DError(f"{where}: remove the {key!r} section; p2d passes its own AdamW and cosine schedule")
    for key, value in (("train_micro_batch_size_per_gpu", config.batch_size),
                       ("gradient_accumulation_steps", config.grad_accum),
                       ("gradient_clipping", config.max_grad_norm)):
        if cfg.get(key, "auto") == "auto":
            cfg[key] = value
        elif key != "gradient_clipping" and cfg[key] != value:
            raise P2DError(f"{where}: {key}={cfg[key]} disagrees with the training option ({value})")
    if cfg.get("train_batch_size") == "auto":
        del cfg["train_batch_size"]
    for half in ("bf16", "fp16"):
        if isinstance(cfg.get(half), dict) and cfg[half].get("enabled") == "auto":
            cfg[half]["enabled"] = half == "bf16" and _dtype(config) == torch.bfloat16
    if "bf16" not in cfg and "fp16" not in cfg:  # no precision named: p2d's (bf16 on GPU, fp32 master weights)
        cfg["bf16"] = {"enabled": _dtype(config) == torch.bfloat16}
    if cfg.get("fp16", {}).get("enabled") and not torch.cuda.is_available():
        raise P2DError(f"{where}: fp16 needs a GPU; use bf16 or fp32 on the CPU")
    cfg.setdefault("zero_allow_untested_optimizer", True)
    cfg.setdefault("steps_per_print", 10**9)
    return cfg


def launch_ranks(config: TrainConfig) -> tuple[int, int]:
    """(world, rank) that training with `config` runs on: the launcher's under DeepSpeed, else (1, 0)."""
    if config.deepspeed is None:
        return 1, 0
    return int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))


def step_plan(lengths: list[int], config: TrainConfig, epoch: int, world: int = 1, rank: int = 0) -> list[list[list[int]]]:
    """This rank's micro-batches (sample indices) for every optimizer step of `epoch`.

    Samples are grouped by length into effective batches (batch_size·grad_accum·world), the groups
    are shuffled with seed+epoch, and each group is dealt out across ranks (DistributedSampler
    style). The plan does not depend on how the effective batch is split into micro-batches, so
    batch 4 × accum 1 and batch 2 × accum 2 take identical steps. A last group that cannot give
    every rank the same number of samples is trimmed, so all ranks run the same collectives.
    """
    groups = length_batches(lengths, config.batch_size * config.grad_accum * world)
    random.Random(config.seed * 1_000_003 + epoch).shuffle(groups)
    plan = []
    for g in groups:
        g = g[: len(g) - len(g) % world]
        if g:
            mine = g[rank::world]
            plan.append([mine[i:i + config.batch_size] for i in range(0, len(mine), config.batch_size)])
    return plan


def _open_log(path: Path, step: int):
    """The per-step log, opened for appending after dropping lines past `step` (a resume's checkpoint)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = []
    if path.is_file() and step > 0:
        kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    return open(path, "a", encoding="utf-8")


def _latest_checkpoint(out_dir: Path) -> Path | None:
    for path in (out_dir / CHECKPOINT, out_dir / f".{CHECKPOINT}.old"):  # .old: killed mid-swap
        if (path / "state.json").is_file():
            return path
    return None


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class _Run:
    """Backend-specific pieces of the loop: plain torch, or a DeepSpeed engine."""

    def __init__(self, model: nn.Module, config: TrainConfig, total_steps: int):
        self.config = config
        model.train()
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise P2DError("nothing to train: the model has no trainable parameters (check the scope)")
        ds_config = resolve_deepspeed(config)
        self.engine = None
        self.world, self.rank = 1, 0
        dtype = _dtype(config)
        optimizer = torch.optim.AdamW(list(self.params.values()), lr=config.lr, betas=tuple(config.betas),
                                      weight_decay=config.weight_decay)

        def schedule(opt):
            return LambdaLR(opt, lambda s: lr_factor(s, total_steps, config.warmup_ratio, config.min_lr_ratio))

        if ds_config is None:
            self.device = default_device()
            model.to(device=self.device, dtype=dtype)
            if dtype != torch.float32:  # bf16 forward under autocast, fp32 trainable weights and AdamW state
                for p in self.params.values():
                    p.data = p.data.float()
            self.model, self.optimizer, self.scheduler = ResponseLoss(model), optimizer, schedule(optimizer)
            self.autocast = torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32)
        else:
            import deepspeed
            import torch.distributed as dist

            launcher_env()
            if torch.cuda.is_available():
                torch.cuda.set_device(default_device())  # each rank on its own GPU
            deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
            self.world, self.rank = dist.get_world_size(), dist.get_rank()
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=ResponseLoss(model), model_parameters=list(self.params.values()), optimizer=optimizer,
                lr_scheduler=schedule, config=ds_config)
            self.model, self.device = self.engine, self.engine.device
            self.autocast = contextlib.nullcontext()
        self.zero3 = self.engine is not None and self.engine.zero_optimization_stage() == 3
        self.base = model

    def all_sum(self, value: float) -> float:
        if self.world == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item()

    def barrier(self) -> None:
        if self.engine is not None:
            import torch.distributed as dist

            dist.barrier()

    def step(self, micro: list[dict[str, torch.Tensor]], n_tokens: float) -> float:
        """One optimizer step over `micro`; returns this rank's summed token loss."""
        scale = self.world / max(n_tokens, 1.0)  # ranks' gradients are averaged: undo it to divide by n_tokens
        total = 0.0
        for j, batch in enumerate(micro):
            batch = {k: v.to(self.device) for k, v in batch.items()}
            if self.engine is not None:
                self.engine.set_gradient_accumulation_boundary(j == len(micro) - 1)
            with self.autocast:
                loss_sum = self.model(**batch)  # summed over response tokens, fp32
            if self.engine is not None:
                self.engine.backward(loss_sum * scale, scale_wrt_gas=False)
            else:
                (loss_sum * scale).backward()
            total += loss_sum.item()
        if self.engine is not None:
            self.engine.step()
        else:
            if self.config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.config.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        return total

    def save(self, out_dir: Path, state: dict) -> None:
        """Write out_dir/checkpoint atomically: built in a temp dir, swapped in by rank 0."""
        tmp = out_dir / f".{CHECKPOINT}.tmp"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.barrier()
        if self.engine is not None:
            self.engine.save_checkpoint(str(tmp), tag=f"step{state['step']}")
        else:
            save_file({n: p.detach().contiguous().cpu() for n, p in self.params.items()},
                      str(tmp / "trainable.safetensors"))
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                       tmp / "optimizer.pt")
        torch.save(_rng_state(), tmp / f"rng_{self.rank}.pt")
        self.barrier()
        if self.rank == 0:
            write_json(tmp / "state.json", state)
            replace_dir(tmp, out_dir / CHECKPOINT)
        self.barrier()

    def load(self, ckpt: Path) -> dict:
        if self.engine is not None:
            path, _ = self.engine.load_checkpoint(str(ckpt))
            if path is None:
                raise P2DError(f"{ckpt}: DeepSpeed could not load this checkpoint")
        else:
            trained = load_file(str(ckpt / "trainable.safetensors"))
            if set(trained) != set(self.params):
                raise P2DError(f"{ckpt}: checkpoint holds other trainable tensors than this run "
                               f"(different scope or heads?); remove it or use another output directory")
            with torch.no_grad():
                for n, t in trained.items():
                    self.params[n].copy_(t)
            opt = torch.load(ckpt / "optimizer.pt", weights_only=True)
            self.optimizer.load_state_dict(opt["optimizer"])
            self.scheduler.load_state_dict(opt["scheduler"])
        rng = ckpt / f"rng_{self.rank}.pt"
        if rng.is_file():
            _set_rng_state(torch.load(rng, weights_only=True))
        return json.loads((ckpt / "state.json").read_text(encoding="utf-8"))

    def trained_state(self) -> dict[str, torch.Tensor]:
        """Full (ZeRO-3-gathered) trainable tensors and delta indices, on the CPU."""
        if not self.zero3:
            return adapter_state(self.base)
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.params.values()), modifier_rank=None):
            return adapter_state(self.base)


def _micro_batches(data: list[Tokenized], step: list[list[int]], pad_id: int) -> tuple[list[dict], float]:
    """One optimizer step's collated micro-batches and its labelled (loss) token count on this rank."""
    micro = [collate([data[i] for i in mb], pad_id) for mb in step]
    return micro, float(sum((b["labels"][:, 1:] != IGNORE).sum().item() for b in micro))


def time_steps(model: nn.Module, data: list[Tokenized], pad_id: int, config: TrainConfig,
               steps: list[list[list[int]]]) -> list[float]:
    """Seconds of each given optimizer step (micro-batches of `data` indices), run as `train` runs them.

    For cost estimates: the steps come from `step_plan`, so they are the steps a real run takes.
    The model's trainable parameters are updated; callers time on a throwaway copy.
    """
    run = _Run(model, config, max(len(steps), 1))
    out = []
    for step in steps:
        micro, n_tokens = _micro_batches(data, step, pad_id)
        t0 = time.perf_counter()
        run.step(micro, n_tokens)
        out.append(time.perf_counter() - t0)
    return out


def train(model: nn.Module, data: list[Tokenized], pad_id: int, config: TrainConfig,
          out_dir: str | os.PathLike, progress: bool = True, run_key: str | None = None,
          overwrite: bool = False) -> TrainResult:
    """Train the model's trainable parameters on `data`; resumes from out_dir/checkpoint if present.

    `run_key` names what is being trained (data, model, options): a checkpoint written under
    another key is never resumed (its weights would belong to another run); it is an error, or
    with `overwrite` it is discarded. DeepSpeed's pickled checkpoints load only under a matching key.

    The loss is the mean cross-entropy over response tokens of each whole optimizer step (all
    micro-batches and ranks). A model prepared by p2d.masking.apply_scope also gets its trained
    tensors written to out_dir/adapter (see p2d.masking.save_adapter).
    """
    if not data:
        raise P2DError("no training examples")
    out_dir = Path(out_dir)
    data = [Tokenized(t.id, t.input_ids[: config.max_length], t.labels[: config.max_length]) for t in data]
    lengths = [len(t) for t in data]
    torch.manual_seed(config.seed)
    world = launch_ranks(config)[0]
    steps_per_epoch = len(step_plan(lengths, config, 0, world))
    if steps_per_epoch == 0:
        raise P2DError(f"{len(data)} examples cannot be split across {world} ranks")
    total = config.max_steps if config.max_steps is not None else config.epochs * steps_per_epoch
    run = _Run(model, config, total)
    if run.world != world:
        raise P2DError(f"DeepSpeed reports {run.world} ranks but WORLD_SIZE says {world}")

    state = {"step": 0, "losses": [], "tokens": 0, "seconds": 0.0, "total_steps": total, "step_seconds": [],
             "step_positions": [], "run_key": run_key}
    resumed_from = None
    ckpt = _latest_checkpoint(out_dir)
    if ckpt is not None and run_key is not None:
        theirs = json.loads((ckpt / "state.json").read_text(encoding="utf-8")).get("run_key")
        if theirs != run_key:
            if not overwrite:
                raise P2DError(f"{ckpt} is a checkpoint of another run (other data, model or options); pass "
                               "--overwrite to discard it, or use another --out")
            if run.rank == 0:
                for path in (out_dir / CHECKPOINT, out_dir / f".{CHECKPOINT}.old"):
                    shutil.rmtree(path, ignore_errors=True)
            run.barrier()
            ckpt = None
    if ckpt is not None:
        state = run.load(ckpt)
        state.setdefault("step_seconds", [])  # checkpoints written before per-step records
        state.setdefault("step_positions", [])
        if state["total_steps"] != total:
            raise P2DError(f"{ckpt}: checkpoint is from a run of {state['total_steps']} steps, this one has {total}; "
                           "use the same options or another output directory")
        resumed_from = state["step"]

    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from p2d.progress import Progress

    log = _open_log(out_dir / LOG, state["step"]) if run.rank == 0 else None
    board = None
    if config.tensorboard and run.rank == 0:
        from torch.utils.tensorboard import SummaryWriter

        board = SummaryWriter(str(out_dir / "tensorboard"), purge_step=state["step"] + 1)  # a resume drops later events

    bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                   TimeRemainingColumn(), disable=not progress or run.rank != 0)
    plan, plan_epoch = None, None
    with bar:
        task = bar.add_task("train", total=total, completed=state["step"], loss="-", tps="-")
        while state["step"] < total:
            step = state["step"]
            epoch, pos = divmod(step, steps_per_epoch)
            if plan_epoch != epoch:
                plan, plan_epoch = step_plan(lengths, config, epoch, run.world, run.rank), epoch
            micro, n_tokens = _micro_batches(data, plan[pos], pad_id)
            n_tokens = run.all_sum(n_tokens)
            tokens = run.all_sum(float(sum(b["attention_mask"].sum().item() for b in micro)))
            positions = run.all_sum(float(sum(b["input_ids"].numel() for b in micro)))  # padding included
            t0 = time.perf_counter()
            loss = run.all_sum(run.step(micro, n_tokens)) / max(n_tokens, 1.0)
            dt = time.perf_counter() - t0
            state["seconds"] += dt
            state["tokens"] += int(tokens)
            state["step_seconds"].append(dt)
            state["step_positions"].append(int(positions))
            state["losses"].append(loss)
            state["step"] = step + 1
            if log is not None:
                record = {"step": state["step"], "epoch": epoch, "loss": loss, "lr": run.scheduler.get_last_lr()[0],
                          "tokens": int(tokens), "seconds": dt, "tokens_per_s": tokens / max(dt, 1e-9)}
                log.write(json.dumps(record) + "\n")
                log.flush()
                if board is not None:
                    for key in ("loss", "lr", "tokens_per_s"):
                        board.add_scalar(f"train/{key}", record[key], state["step"])
            if state["step"] % config.log_every == 0 or state["step"] == total:
                bar.update(task, completed=state["step"], loss=f"{loss:.4f}",
                           tps=f"{state['tokens'] / max(state['seconds'], 1e-9):.0f}")
            if state["step"] % config.save_every == 0 or state["step"] == total:
                run.save(out_dir, state)
    if log is not None:
        log.close()
    if board is not None:
        board.close()
    if getattr(model, "p2d_scope", None) is not None:
        trained = run.trained_state()
        if run.rank == 0:
            save_adapter(model, out_dir / "adapter", state=trained)
        run.barrier()
    return TrainResult(steps=state["step"], seconds=state["seconds"], tokens=state["tokens"],
                       tokens_per_s=state["tokens"] / max(state["seconds"], 1e-9),
                       final_loss=state["losses"][-1] if state["losses"] else None,
                       losses=list(state["losses"]), resumed_from=resumed_from,
                       step_seconds=list(state["step_seconds"]), step_positions=list(state["step_positions"]))
