"""DeepSpeed ZeRO on the CPU (gloo; one process, and two under torchrun): head deltas train, frozen weights
stay bit-identical, and the losses equal the single-process loop's.

Each case runs this file as a script in a fresh process, because DeepSpeed's distributed state is
process-global; the test then checks the tensors the worker saved.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

HEADS = [(0, 1), (1, 5), (1, 6), (2, 7)]


def base_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                        num_attention_heads=8, num_key_value_heads=2, head_dim=8, vocab_size=128))


def setup(world: int = 1, model=None):
    """The heads-scope model (`model`, else the seed-0 base), data and config shared by the DeepSpeed
    worker and the reference run."""
    from p2d.geometry import AttentionGeometry
    from p2d.masking import apply_scope
    from p2d.tokens import IGNORE, Tokenized
    from p2d.trainer import TrainConfig

    model = model if model is not None else base_model()
    apply_scope(model, AttentionGeometry.from_config(model.config), "heads", HEADS, train_o=True)
    g = torch.Generator().manual_seed(0)
    data = []
    for i, length in enumerate([12, 12, 9, 9, 12, 7, 7, 12]):
        ids = torch.randint(1, 128, (length,), generator=g).tolist()
        data.append(Tokenized(str(i), ids, [IGNORE] * 4 + ids[4:]))
    # the effective batch is 4 for every world size: 2 x 2 micro-batches, or 2 per rank on 2 ranks
    cfg = TrainConfig(lr=1e-2, weight_decay=0.1, batch_size=2, grad_accum=2 // world, max_steps=3, save_every=2,
                      warmup_ratio=0.0, dtype=torch.float32, max_grad_norm=0.05)  # low: clipping is exercised
    return model, data, cfg


def worker(stage: int, out: Path) -> None:
    """Load the saved model as `p2d train` does (ZeRO-3: partitioned as it loads), train, save the weights."""
    import deepspeed
    from transformers import AutoModelForCausalLM

    from p2d.trainer import TrainConfig, deepspeed_config, partitioned_loading, train

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    with partitioned_loading(TrainConfig(deepspeed=deepspeed_config(stage, TrainConfig()))) as partitioned:
        loaded = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32)
        whole_here = sum(p.numel() for p in loaded.parameters())
        model, data, cfg = setup(world, loaded)
        cfg.deepspeed = deepspeed_config(stage, cfg)
        result = train(model, data, pad_id=0, config=cfg, out_dir=out / "run", progress=False)
    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=stage == 3):
        state = {n: p.detach().clone().contiguous() for n, p in model.named_parameters()}
    if rank == 0:
        save_file(state, str(out / "after.safetensors"))
        (out / "losses.txt").write_text(" ".join(map(str, result.losses)))
        (out / "loaded.txt").write_text(f"{partitioned} {whole_here}")
    # a second run in the same directory resumes from the DeepSpeed checkpoint (done: no steps left)
    # and rewrites run/adapter from the reloaded weights, which the test compares with the trained ones
    fresh, _, _ = setup(world)
    resumed = train(fresh, data, pad_id=0, config=cfg, out_dir=out / "run", progress=False)
    assert resumed.resumed_from == 3 and resumed.losses == result.losses


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.deepspeed
@pytest.mark.parametrize("stage,world", [(2, 1), (3, 1), (2, 2), (3, 2)])
def test_zero_heads_scope_on_cpu(tmp_path, stage, world):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env |= dict(OMP_NUM_THREADS="1", TORCH_EXTENSIONS_DIR=str(Path.home() / ".cache" / "torch_extensions"))
    if world == 1:  # no launcher variables: p2d fills them, as for `p2d train --deepspeed` run as written
        cmd = [sys.executable, __file__]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
               "--master-port", str(free_port()), __file__]
    base = base_model()  # saved as the checkpoint the workers load
    base.save_pretrained(tmp_path / "base")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    proc = subprocess.run(cmd + [str(stage), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # ZeRO-3 loads each rank's partition only: no rank held the whole model
    partitioned, whole_here = (tmp_path / "loaded.txt").read_text().split()
    assert partitioned == str(stage == 3)
    assert (int(whole_here) == 0) == (stage == 3)
    after = load_file(tmp_path / "after.safetensors")
    deltas = {n: t for n, t in after.items() if n.endswith("delta")}
    frozen = {n: t for n, t in after.items() if not n.endswith("delta")}
    assert len(deltas) == 3 * 4  # q, k, v, o in each of the 3 layers holding a selected head
    for name, t in frozen.items():  # base weights (inside HeadDeltaLinear or not) are bit-identical
        assert torch.equal(t, before[name.replace(".base.", ".")]), name
    for name, d in deltas.items():  # every selected head's block trained
        blocks = d.split(8, dim=1 if ".o_proj." in name else 0)
        assert all(b.abs().sum() > 0 for b in blocks), name
    losses = [float(x) for x in (tmp_path / "losses.txt").read_text().split()]
    assert len(losses) == 3 and all(map(torch.isfinite, torch.tensor(losses)))
    assert (tmp_path / "run" / "checkpoint" / "latest").is_file()
    adapter = load_file(tmp_path / "run" / "adapter" / "p2d_adapter.safetensors")
    assert all(torch.equal(adapter[n], deltas[n]) for n in deltas)

    # same loss and deltas as the single-process loop (loss scaling, accumulation, clipping agree)
    from p2d.trainer import train

    model, data, cfg = setup()
    reference = train(model, data, pad_id=0, config=cfg, out_dir=tmp_path / "reference", progress=False)
    assert losses == pytest.approx(reference.losses, rel=1e-5)
    ref = dict(model.named_parameters())
    assert all(torch.allclose(deltas[n], ref[n].detach(), atol=1e-6) for n in deltas)


if __name__ == "__main__":
    worker(int(sys.argv[1]), Path(sys.argv[2]))
