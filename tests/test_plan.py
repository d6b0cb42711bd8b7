"""`p2d plan`: predictions from a config alone, for any model size, with the assumptions stated."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from p2d.cli.main import main
from p2d.flops import Shape, train_step, trainable_for
from p2d.plan import Lengths, PlanConfig, make_plan, stage_flops

LLAMA_70B = {"architectures": ["LlamaForCausalLM"], "hidden_size": 8192, "intermediate_size": 28672,
             "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256}
LLAMA_8B = {"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256}


def lengths(n: int = 500, seed: int = 0) -> Lengths:
    rng = np.random.default_rng(seed)
    return Lengths(rng.integers(10, 120, n), rng.integers(5, 300, n))


@pytest.mark.parametrize("config", [LLAMA_8B, LLAMA_70B], ids=["8b", "70b"])
def test_plan_for_a_large_config_without_weights(config):
    plan = make_plan(config, lengths(), PlanConfig(hardware="h100", mfu=0.4))
    stages = plan["stages"]
    assert set(stages) == {"proxy", "localize", "mine", "train", "reference"}
    rate = 989e12 * 0.4
    assert all(s["seconds"] == pytest.approx(s["flops"] / rate) for s in stages.values())
    assert stages["train"]["flops"] < stages["reference"]["flops"]
    assert plan["speedup"] == pytest.approx(stages["reference"]["seconds"] / plan["p2d_seconds"])
    params = Shape.from_config(config).params()
    assert stages["reference"]["peak_memory_bytes"] > params * (2 + 16)  # bf16 weights + fp32 grads and AdamW
    assert any("layer 0" in a for a in plan["assumptions"])


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_reference_flops_count_the_batches_the_trainer_runs(tiny_model, small_pool, template):
    """The plan, from scanned lengths alone, counts exactly the FLOPs of the micro-batches and labelled
    positions that the trainer forms from the tokenized pool (truncation and padding included)."""
    from p2d.data import load_examples, load_tokens
    from p2d.models import load_config, load_tokenizer
    from p2d.plan import scan
    from p2d.tokens import IGNORE, collate, tokenize
    from p2d.trainer import TrainConfig, step_plan

    tok = load_tokenizer(str(tiny_model))
    if template == "chat":
        tok.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}" \
                            "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    examples = load_examples(str(small_pool))
    shape = Shape.from_config(load_config(str(tiny_model)))
    cfg = PlanConfig(epochs=1, train_max_length=48, train_batch_size=4)
    data = tokenize(examples, tok, 48, template)
    want = 0
    for step in step_plan([len(t) for t in data], TrainConfig(batch_size=4, max_length=48), epoch=0):
        for mb in step:
            batch = collate([data[i] for i in mb], 0)
            want += train_step(shape, [tuple(batch["input_ids"].shape)], int((batch["labels"][:, 1:] != IGNORE).sum()),
                               trainable_for("full", shape))
    lengths = scan(load_tokens(str(small_pool), tok, 2**31, template))
    assert stage_flops(shape, lengths, cfg)["reference"]["flops"] == want


def test_real_subset_and_heads_replace_the_assumptions():
    shape = Shape.from_config(LLAMA_8B)
    ln = lengths(200)
    cfg = PlanConfig(data_frac=0.1)
    deep = stage_flops(shape, ln, cfg, subset=np.arange(20), heads=[(31, 0)])["train"]["flops"]
    shallow = stage_flops(shape, ln, cfg, subset=np.arange(20), heads=[(0, 0)])["train"]["flops"]
    assert deep < shallow  # a head only in the last layer back-propagates through one layer


def test_the_subset_is_assumed_as_long_as_the_target_rows():
    """Mining ranks rows like the target first: before a run, the subset is planned with the target's lengths."""
    shape = Shape.from_config(LLAMA_8B)
    cfg = PlanConfig(data_frac=0.1)
    pool = Lengths(np.full(200, 60), np.full(200, 140))
    target = Lengths(np.full(16, 20), np.full(16, 30))
    short = Lengths(np.full(20, 20), np.full(20, 30))  # the 20 rows the subset is assumed to be
    planned = stage_flops(shape, pool, cfg, target=target)
    assert planned["train"]["flops"] == stage_flops(shape, short, cfg, subset=np.arange(20))["train"]["flops"]
    assert planned["train"]["flops"] < stage_flops(shape, pool, cfg)["train"]["flops"]
    assert planned["reference"] == stage_flops(shape, pool, cfg)["reference"]  # the reference trains the pool


@pytest.mark.parametrize("mine_dtype", ["auto", "float32"])
def test_mining_is_planned_at_the_rate_of_its_precision(monkeypatch, mine_dtype):
    """Where the calibration measured native bf16, auto mining is planned at that rate and in 2-byte weights."""
    rates = {"forward_flops_per_s": 1e11, "bf16_forward_flops_per_s": 2e11, "train_flops_per_s": 1e11,
             "head_train_flops_per_s": 1e11, "method": "test"}
    monkeypatch.setattr("p2d.plan.calibrate", lambda force=False: rates)
    plan = make_plan(LLAMA_8B, lengths(), PlanConfig(mine_dtype=mine_dtype))
    mine = plan["stages"]["mine"]
    fp32 = make_plan(LLAMA_8B, lengths(), PlanConfig(mine_dtype="float32"))["stages"]["mine"]
    bf16 = mine_dtype == "auto"
    assert mine["seconds"] == pytest.approx(mine["flops"] / (2e11 if bf16 else 1e11))
    assert mine["flops"] == fp32["flops"]  # the precision changes the rate, not the work
    assert (mine["peak_memory_bytes"] < fp32["peak_memory_bytes"]) == bf16
    assert any(("bf16" if bf16 else "fp32") in a for a in plan["assumptions"])
    without = {k: v for k, v in rates.items() if k != "bf16_forward_flops_per_s"}  # a CPU with no native bf16
    monkeypatch.setattr("p2d.plan.calibrate", lambda force=False: without)
    assert make_plan(LLAMA_8B, lengths(), PlanConfig(mine_dtype=mine_dtype))["stages"]["mine"] == fp32


def test_cli_plan_from_a_config_file(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(LLAMA_70B))
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"instruction": f"task {i} " * 5, "output": "x " * (i % 50 + 1)}) + "\n"
                            for i in range(60)))
    out = tmp_path / "plan.json"
    result = CliRunner().invoke(main, ["plan", "--model", str(config), "--data", str(pool), "--hardware", "h200",
                                       "--out", str(out)])
    assert result.exit_code == 0, result.output
    plan = json.loads(out.read_text())
    assert plan["lengths"].startswith("bytes / 4") and plan["pool_rows"] == 60
    bad = CliRunner().invoke(main, ["plan", "--model", str(tmp_path / "missing.json"), "--data", str(pool)])
    assert bad.exit_code == 2 and "missing.json" in bad.output


def test_a_stage_that_computed_nothing_is_no_rate(tmp_path, monkeypatch):
    """A run given a task model has no proxy FLOPs: its seconds must not become a rate of 0 for later plans."""
    from p2d.plan import observe, observed

    monkeypatch.setattr("p2d.plan._observed_path", lambda: tmp_path / "observed_rates.json")
    monkeypatch.setattr("p2d.plan.calibrate", lambda force=False: {  # a CPU with native bf16: mining in bf16
        "forward_flops_per_s": 1e11, "bf16_forward_flops_per_s": 2e11, "train_flops_per_s": 1e11,
        "head_train_flops_per_s": 1e11, "method": "test"})
    shape, cfg = Shape.from_config(LLAMA_8B), PlanConfig()
    observe(shape, cfg, True, {"proxy": ("run:a", 0, 2.0), "mine": ("run:a", 4e12, 2.0)})
    observe(shape, cfg, True, {"mine": ("run:a", 4e12, 4.0), "train": ("run:a", 1e12, 1.0)})  # run:a again
    observe(shape, cfg, True, {"mine": ("run:b", 6e12, 2.0)})
    assert observed(shape, cfg, True) == {"proxy": [], "mine": [1e12, 3e12], "train": [1e12], "reference": []}
    plan = make_plan(LLAMA_8B, lengths(), cfg)
    assert plan["stages"]["mine"]["seconds"] == pytest.approx(plan["stages"]["mine"]["flops"] / 2e12)  # the median
    assert plan["stages"]["proxy"]["seconds"] == pytest.approx(plan["stages"]["proxy"]["flops"] / 1e11)  # calibration


@pytest.mark.parametrize("others", [0.0, 0.9], ids=["quiet", "shared"])
def test_a_calibration_taken_while_others_use_the_cpu_is_not_cached(monkeypatch, tmp_path, others):
    """Rates measured while other processes held the CPUs are the machine's leftovers: the plan that
    took them says so, and the next plan measures again instead of reusing them."""
    import p2d.plan as plan_mod

    monkeypatch.setenv("P2D_CACHE", str(tmp_path))
    monkeypatch.setattr(plan_mod, "CALIBRATION_SHAPE", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                                            vocab_size=128))
    import time

    import psutil

    def fake_cpu_seconds():  # other processes keep `others` of every CPU busy; this process uses none
        return others * time.perf_counter() * psutil.cpu_count(), 0.0

    monkeypatch.setattr(plan_mod, "cpu_seconds", fake_cpu_seconds)
    rates = plan_mod.calibrate()
    cached = tmp_path / "calibration.json"
    assert rates["others_cpu_share"] == pytest.approx(others)
    assert cached.is_file() == (others == 0.0)
    assert ("not cached" in rates["method"]) == (others > 0)
