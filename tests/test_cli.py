"""The p2d commands end to end on a tiny model: outputs, contracts, and clear errors on bad input."""

from __future__ import annotations

import csv
import json
import os
import math
import shutil
import zipfile
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest
import yaml
import torch
from click.testing import CliRunner

from conftest import save_tiny
from p2d.cli.main import main


def p2d(*args: str, ok: bool = True):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def perturbed_task_model(base, out, heads, scale=0.5):
    """A copy of `base` whose chosen heads' q rows moved: ALPS must rank exactly these first."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base)
    hd = model.config.head_dim
    torch.manual_seed(1)
    for layer, head in heads:
        w = model.model.layers[layer].self_attn.q_proj.weight
        with torch.no_grad():
            w[head * hd:(head + 1) * hd] += scale * torch.randn_like(w[head * hd:(head + 1) * hd])
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def localized(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("loc")
    task = perturbed_task_model(tiny_model, out / "task", [(1, 3), (3, 6)])
    p2d("localize", "--model", tiny_model, "--task-model", task, "--head-frac", 2 / 32, "--out", out / "run")
    return out / "run"


def test_localize_contract_and_ranking(localized):
    info = json.loads((localized / "heads.json").read_text())
    for key in ("model", "task_model", "metric", "tau", "head_frac", "num_layers", "num_heads", "num_kv_heads", "selected"):
        assert key in info
    assert (info["num_layers"], info["num_heads"], info["num_kv_heads"]) == (4, 8, 2)
    sel = info["selected"]
    assert {(s["layer"], s["head"]) for s in sel} == {(1, 3), (3, 6)}
    assert [s["rank"] for s in sel] == [1, 2] and sel[0]["score"] >= sel[1]["score"]
    assert [s["kv_group"] for s in sel] == [s["head"] // 4 for s in sel]
    scores = np.load(localized / "head_scores.npy")
    assert scores.dtype == np.float64 and scores.shape == (4, 8)
    assert (localized / "heads.png").stat().st_size > 1000


def test_localize_with_proxy_run(tiny_model, small_pool, tmp_path):
    p2d("localize", "--model", tiny_model, "--proxy-data", small_pool, "--proxy-samples", 8, "--proxy-steps", 2,
        "--head-frac", 0.1, "--out", tmp_path)
    info = json.loads((tmp_path / "heads.json").read_text())
    assert len(info["selected"]) == math.ceil(0.1 * 32)
    assert (tmp_path / "proxy" / "task_model" / "config.json").is_file()
    timings = json.loads((tmp_path / "localize.json").read_text())
    assert timings["proxy_seconds"] > 0 and timings["localize_seconds"] > 0
    assert info["template"] == "alpaca"  # the tiny tokenizer has no chat template: auto resolves to alpaca


def test_localize_reuses_the_proxy_only_while_its_inputs_hold(tiny_model, small_pool, tmp_path):
    """The cached proxy task model is reused for the same base, data and options, and remade when any changes."""
    common = ("localize", "--model", tiny_model, "--proxy-samples", 8, "--head-frac", 0.1, "--out", tmp_path)
    record = tmp_path / "proxy" / "proxy.json"
    p2d(*common, "--proxy-data", small_pool, "--proxy-steps", 2)
    first = record.read_bytes()
    p2d(*common, "--proxy-data", small_pool, "--proxy-steps", 2)
    assert record.read_bytes() == first  # reused
    p2d(*common, "--proxy-data", small_pool, "--proxy-steps", 3)
    assert json.loads(record.read_text())["steps"] == 3
    edited = tmp_path / "pool.jsonl"
    edited.write_text(small_pool.read_text().replace("def ", "def  "))
    before = record.read_bytes()
    p2d(*common, "--proxy-data", edited, "--proxy-steps", 3)
    assert record.read_bytes() != before  # other data content, same options: remade
    other_base = save_tiny(tmp_path / "other-base", seed=5)
    before = record.read_bytes()
    p2d("localize", "--model", other_base, "--proxy-samples", 8, "--head-frac", 0.1, "--out", tmp_path,
        "--proxy-data", edited, "--proxy-steps", 3)
    assert record.read_bytes() != before  # another base model: remade


@pytest.mark.parametrize("frac", ["0", "1.5", "-0.1"])
def test_localize_rejects_head_frac(tiny_model, tmp_path, frac):
    r = p2d("localize", "--model", tiny_model, "--task-model", tiny_model, "--head-frac", frac, "--out", tmp_path, ok=False)
    assert r.exit_code == 2 and "head-frac" in r.output and "(0, 1]" in r.output
    assert not (tmp_path / "heads.json").exists()


def test_localize_rejects_unknown_architecture(tiny_model, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    r = p2d("localize", "--model", tmp_path / "gpt2", "--task-model", tmp_path / "gpt2", "--out", tmp_path / "o", ok=False)
    assert r.exit_code == 2 and "unsupported architecture 'gpt2'" in r.output


def test_localize_rejects_mismatched_models(tiny_model, tmp_path):
    other = save_tiny(tmp_path / "other", num_key_value_heads=4)
    r = p2d("localize", "--model", tiny_model, "--task-model", other, "--out", tmp_path / "o", ok=False)
    assert r.exit_code == 2 and "does not match the base model" in r.output and "num_kv_heads" in r.output


def test_localize_rejects_malformed_proxy_data(tiny_model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n')
    r = p2d("localize", "--model", tiny_model, "--proxy-data", bad, "--out", tmp_path / "o", ok=False)
    assert r.exit_code == 2 and f"{bad}:2" in r.output


@pytest.fixture(scope="module")
def mined(tiny_model, small_pool, localized, tmp_path_factory):
    out = tmp_path_factory.mktemp("mine")
    p2d("mine", "--model", tiny_model, "--heads", localized / "heads.json", "--data", small_pool, "--domain", "code",
        "--data-frac", 0.25, "--head-report", "--out", out)
    return out


def test_mine_exports_pool_rows_unchanged(mined, small_pool):
    pool = [json.loads(line) for line in small_pool.read_text().splitlines()]
    selected = [json.loads(line) for line in (mined / "selected.jsonl").read_text().splitlines()]
    assert len(selected) == math.ceil(0.25 * len(pool))
    assert all(row in pool for row in selected)  # every original field kept, nothing added
    with open(mined / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(pool) and sum(int(r["selected"]) for r in rows) == len(selected)
    info = json.loads((mined / "dataset_info.json").read_text())
    assert next(iter(info.values()))["file_name"] == "selected.jsonl"
    summary = json.loads((mined / "mine.json").read_text())
    assert summary["counts"] == {"pool": 48, "target": summary["counts"]["target"], "selected": 12}
    assert set(summary["head_sets"]) >= {"alps", "random", "discriminative"}
    assert {"extract_s", "index_s", "select_s"} <= set(summary["timings"])
    axolotl = yaml.safe_load((mined / "axolotl.yaml").read_text())
    assert axolotl["base_model"] and axolotl["unfrozen_parameters"] and axolotl["weight_decay"] == 0.0
    assert len((mined / "trl.jsonl").read_text().splitlines()) == len(selected)


def test_mined_directory_can_be_moved(mined, tmp_path):
    """mine.json and axolotl.yaml name the outputs relative to their directory, so a copy elsewhere still holds."""
    moved = tmp_path / "elsewhere"
    shutil.copytree(mined, moved)
    outputs = json.loads((moved / "mine.json").read_text())["outputs"]
    assert outputs and all((moved / path).is_file() and not Path(path).is_absolute() for path in outputs.values())
    datasets = yaml.safe_load((moved / "axolotl.yaml").read_text())["datasets"]
    assert all((moved / d["path"]).is_file() and not Path(d["path"]).is_absolute() for d in datasets)


@pytest.mark.parametrize("selector", ["p2d", "p2d-paper", "rds", "ifd", "random"])
def test_mine_every_selector(tiny_model, small_pool, localized, tmp_path, selector):
    p2d("mine", "--model", tiny_model, "--heads", localized / "heads.json", "--data", small_pool, "--domain", "code",
        "--data-frac", 0.25, "--selector", selector, "--out", tmp_path)
    summary = json.loads((tmp_path / "mine.json").read_text())
    assert summary["selector"] == selector and summary["counts"]["selected"] == 12
    assert len((tmp_path / "selected.jsonl").read_text().splitlines()) == 12
    # p2d folds in its default quality signal (the base model's IFD on the affinity shortlist); baselines none
    assert summary["quality"] == ("ifd-rank" if selector == "p2d" else "none")
    assert summary["task_model"] is None
    if selector == "p2d":
        assert summary["shortlist"] == 36 and summary["quality_weight"] == 1.0
        # the default diversity for p2d: facility-quality over the top 2x; baselines select as published
        assert summary["diversity"]["kind"] == "facility-quality"
    else:
        assert "diversity" not in summary


def test_mining_window_reads_fewer_tokens(tiny_model, small_pool, localized, tmp_path):
    common = ("mine", "--model", tiny_model, "--heads", localized / "heads.json", "--data", small_pool, "--domain",
              "code", "--data-frac", 0.25)
    p2d(*common, "--out", tmp_path / "full")
    p2d(*common, "--mining-window", 4, "--out", tmp_path / "w4")
    full, w4 = (json.loads((tmp_path / d / "mine.json").read_text()) for d in ("full", "w4"))
    assert w4["window"] == 4 and full["window"] is None
    assert w4["pool_tokens"] < full["pool_tokens"] and w4["counts"] == full["counts"]


def test_float16_features_halve_the_store_and_keep_affinities(tiny_model, small_pool, localized, tmp_path):
    common = ("mine", "--model", tiny_model, "--heads", localized / "heads.json", "--data", small_pool, "--domain",
              "code", "--data-frac", 0.25)
    p2d(*common, "--out", tmp_path / "f32")
    p2d(*common, "--feature-dtype", "float16", "--out", tmp_path / "f16")
    f32, f16 = (np.load(tmp_path / d / "store" / "features.npy", mmap_mode="r") for d in ("f32", "f16"))
    assert f16.dtype == np.float16 and f16.nbytes * 2 == f32.nbytes
    np.testing.assert_allclose(np.asarray(f16, dtype=np.float32), f32, atol=1e-3)
    (a, b) = ([row for row in csv.DictReader(open(tmp_path / d / "scores.csv", encoding="utf-8"))] for d in ("f32", "f16"))
    assert [r["quality"] for r in a] == [r["quality"] for r in b]  # the quality pass does not read stored features
    np.testing.assert_allclose([float(r["affinity"]) for r in b], [float(r["affinity"]) for r in a], atol=1e-3)
    r = p2d(*common, "--out", tmp_path / "f32", "--feature-dtype", "float16", ok=False)  # the store holds float32
    assert r.exit_code == 2 and "dtype" in r.output


def test_bf16_mining_records_its_precision_and_keeps_the_ranking(tiny_model, small_pool, localized, tmp_path):
    common = ("mine", "--model", tiny_model, "--heads", localized / "heads.json", "--data", small_pool, "--domain",
              "code", "--data-frac", 0.25)
    p2d(*common, "--mining-dtype", "float32", "--out", tmp_path / "f32")
    p2d(*common, "--mining-dtype", "bfloat16", "--out", tmp_path / "bf16")
    f32, bf16 = (json.loads((tmp_path / d / "mine.json").read_text()) for d in ("f32", "bf16"))
    assert f32["mining_dtype"] == "float32" and bf16["mining_dtype"] == "bfloat16"
    assert json.loads((tmp_path / "bf16" / "store" / "meta.json").read_text())["compute_dtype"] == "bfloat16"
    (a, b) = ([row for row in csv.DictReader(open(tmp_path / d / "scores.csv", encoding="utf-8"))] for d in ("f32", "bf16"))
    aff_a, aff_b = (np.array([float(r["affinity"]) for r in rows]) for rows in (a, b))
    assert np.corrcoef(aff_a, aff_b)[0, 1] > 0.95  # bf16 rounding moves affinities a little, not the ranking
    r = p2d(*common, "--mining-dtype", "bfloat16", "--out", tmp_path / "f32", ok=False)  # the store holds fp32 features
    assert r.exit_code == 2 and "compute_dtype" in r.output


def test_auto_mining_dtype_is_bf16_only_where_the_hardware_has_it(monkeypatch):
    import torch

    from p2d.models import compute_dtype

    for native in (True, False):
        monkeypatch.setattr("p2d.models.native_bf16", lambda device=None, native=native: native)
        assert compute_dtype("auto") == (torch.bfloat16 if native else torch.float32)
        assert compute_dtype("float32") == torch.float32 and compute_dtype("bfloat16") == torch.bfloat16


@pytest.mark.parametrize("case", ["unknown selector", "no task model"])
def test_mine_selector_errors_name_the_option(tiny_model, small_pool, localized, tmp_path, case):
    heads = localized / "heads.json"
    args = ["--selector", "less"]
    if case == "no task model":
        info = json.loads(heads.read_text())
        heads = tmp_path / "heads.json"
        heads.write_text(json.dumps(info | {"task_model": str(tmp_path / "gone")}))
        args = ["--quality", "reducible"]
    r = p2d("mine", "--model", tiny_model, "--heads", heads, "--data", small_pool, "--domain", "code",
            *args, "--out", tmp_path / "m", ok=False)
    assert r.exit_code == 2 and ("--selector" if case == "unknown selector" else "--task-model") in r.output
    assert "Traceback" not in r.output and not (tmp_path / "m").exists()


def test_mine_rejects_heads_of_another_model(tiny_model, small_pool, tmp_path):
    other = save_tiny(tmp_path / "other", num_hidden_layers=2)
    p2d("localize", "--model", other, "--task-model", other, "--out", tmp_path / "loc")
    r = p2d("mine", "--model", tiny_model, "--heads", tmp_path / "loc" / "heads.json", "--data", small_pool,
            "--domain", "code", "--out", tmp_path / "m", ok=False)
    assert r.exit_code == 2 and "heads.json" in r.output and "layers" in r.output


@pytest.mark.parametrize("case", ["empty pool", "data-frac", "empty target"])
def test_mine_bad_input(tiny_model, small_pool, localized, tmp_path, case):
    args = ["mine", "--model", tiny_model, "--heads", localized / "heads.json", "--data", small_pool,
            "--domain", "code", "--out", tmp_path / "m"]
    if case == "empty pool":
        (tmp_path / "empty.jsonl").write_text("")
        args[6], expected = tmp_path / "empty.jsonl", "empty.jsonl"
    elif case == "data-frac":
        args += ["--data-frac", "1.5"]
        expected = "data-frac"
    else:
        (tmp_path / "t.jsonl").write_text(json.dumps({"instruction": "x", "output": ""}) + "\n")
        args += ["--target", tmp_path / "t.jsonl"]
        expected = "t.jsonl"
    r = p2d(*args, ok=False)
    assert r.exit_code == 2 and expected in r.output, r.output
    assert not (tmp_path / "m" / "selected.jsonl").exists()


@pytest.mark.parametrize("option,value", [("--save-every", "0"), ("--max-length", "0"), ("--lr", "nan"),
                                          ("--weight-decay", "-1"), ("--epochs", "0")])
def test_train_rejects_bad_numbers_before_loading(tiny_model, localized, tmp_path, option, value):
    (tmp_path / "d.jsonl").write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
    r = p2d("train", "--model", tiny_model, "--heads", localized / "heads.json", "--data", tmp_path / "d.jsonl",
            option, value, "--out", tmp_path / "o", ok=False)
    assert r.exit_code == 2 and option in r.output and "Traceback" not in r.output
    assert not (tmp_path / "o").exists()


def test_tensorboard_holds_the_logged_losses(tiny_model, localized, mined, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    p2d("train", "--model", tiny_model, "--heads", localized / "heads.json", "--data", mined / "selected.jsonl",
        "--max-steps", 3, "--lr", 1e-2, "--tensorboard", "--out", tmp_path)
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == \
        [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in log]
    assert [e.step for e in events.Scalars("train/lr")] == [1, 2, 3]


def test_train_merged_checkpoint_loads_without_p2d(tiny_model, localized, mined, tmp_path):
    p2d("train", "--model", tiny_model, "--heads", localized / "heads.json", "--data", mined / "selected.jsonl",
        "--scope", "heads", "--max-steps", 3, "--lr", 1e-2, "--out", tmp_path)
    summary = json.loads((tmp_path / "train.json").read_text())
    card = (tmp_path / "model" / "README.md").read_text()
    assert "base_model:" in card and "L1H3" in card and "Alpaca" in card
    tok_cfg = json.loads((tmp_path / "model" / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"  # transformers 4.x loads it too
    hd, d = 8, 64
    assert summary["trainable_params"] == 2 * hd * d + 2 * 2 * hd * d  # 2 q heads, 2 distinct KV groups (k and v)
    code = ("import sys, torch; from transformers import AutoModelForCausalLM as M; "
            "m = M.from_pretrained(sys.argv[1]); print(m(torch.tensor([[1, 2, 3]])).logits.sum().item())")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "model")], capture_output=True, text=True,
                         check=True, cwd=tmp_path)
    from transformers import AutoModelForCausalLM

    from p2d.masking import merge_adapter

    merge_adapter(tiny_model, tmp_path / "adapter", tmp_path / "remerged")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "remerged")
    assert abs(float(out.stdout) - again(torch.tensor([[1, 2, 3]])).logits.sum().item()) < 1e-3
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    changed = {n for n, p in trained.state_dict().items() if not torch.equal(p, base.state_dict()[n])}
    assert changed == {"model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
                       "model.layers.1.self_attn.v_proj.weight", "model.layers.3.self_attn.q_proj.weight",
                       "model.layers.3.self_attn.k_proj.weight", "model.layers.3.self_attn.v_proj.weight"}


def test_train_never_resumes_another_runs_checkpoint(tiny_model, localized, mined, small_pool, tmp_path):
    """Same --out, other data or lr: not the old model under the new train.json, but an error or a fresh run."""
    common = ("train", "--model", tiny_model, "--heads", localized / "heads.json", "--scope", "heads",
              "--max-steps", 2, "--out", tmp_path)
    p2d(*common, "--data", mined / "selected.jsonl", "--lr", 1e-2)
    first = (tmp_path / "model" / "model.safetensors").read_bytes()
    for change in (("--data", small_pool, "--lr", 1e-2), ("--data", mined / "selected.jsonl", "--lr", 5e-3)):
        r = p2d(*common, *change, ok=False)
        assert r.exit_code == 2 and "another run" in r.output and "--overwrite" in r.output
        assert (tmp_path / "model" / "model.safetensors").read_bytes() == first  # nothing already written is lost
    p2d(*common, "--data", small_pool, "--lr", 1e-2, "--overwrite")
    assert (tmp_path / "model" / "model.safetensors").read_bytes() != first
    assert json.loads((tmp_path / "train.json").read_text())["data"] == str(small_pool)
    p2d(*common, "--data", small_pool, "--lr", 1e-2)  # the same run again: resumes its own checkpoint


def test_busy_output_directory_is_refused(tiny_model, localized, small_pool, tmp_path):
    from p2d.io import locked_dir

    with locked_dir(tmp_path):
        (tmp_path / "sub").mkdir()
        stale = tmp_path / "sub" / ".selected.jsonl.abcd_123.tmp"  # as a killed atomic write leaves it
        stale.write_text("half a file")
        r = p2d("mine", "--model", tiny_model, "--heads", localized / "heads.json", "--data", small_pool,
                "--domain", "code", "--out", tmp_path, ok=False)
        assert r.exit_code == 2 and "in use by another p2d command" in r.output and f"pid {os.getpid()}" in r.output
    assert stale.exists()
    p2d("mine", "--model", tiny_model, "--heads", localized / "heads.json", "--data", small_pool, "--domain", "code",
        "--parquet", "--out", tmp_path)
    assert not stale.exists() and (tmp_path / "selected.parquet").is_file()  # a killed write's temp file is gone
    p2d("mine", "--model", tiny_model, "--heads", localized / "heads.json", "--data", small_pool, "--domain", "code",
        "--out", tmp_path)
    assert not (tmp_path / "selected.parquet").exists()  # not this run's output: removed, not left stale


KILL_IN_WRITE = """
import os, signal, sys
import p2d.io
real = p2d.io.os.replace
def replace(src, dst):  # SIGKILL the process in the middle of writing this one output: the temp file is full
    if os.path.basename(str(dst)) == sys.argv[1]:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst)
p2d.io.os.replace = replace
from p2d.cli.main import main
main(sys.argv[2:])
"""


@pytest.mark.parametrize("victim", ["selected.jsonl", "mine.json"])
def test_kill_during_an_atomic_write_resumes_to_identical_outputs(tiny_model, localized, small_pool, tmp_path, victim):
    """kill -9 lands while an output is being written: nothing half-written, and a rerun gives the same bytes."""
    args = ["mine", "--model", str(tiny_model), "--heads", str(localized / "heads.json"), "--data", str(small_pool),
            "--domain", "code", "--data-frac", "0.25"]
    p2d(*args, "--out", tmp_path / "ref")
    killed = subprocess.run([sys.executable, "-c", KILL_IN_WRITE, victim, *args, "--out", str(tmp_path / "k")],
                            capture_output=True, text=True, cwd=tmp_path)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (tmp_path / "k" / victim).exists()  # never a partial file under the real name
    assert any(p.name.startswith(f".{victim}.") for p in (tmp_path / "k").iterdir())  # the killed write's temp file
    p2d(*args, "--out", tmp_path / "k")
    for name in ("selected.jsonl", "scores.csv", "trl.jsonl", "dataset_info.json"):
        assert (tmp_path / "k" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes()
    assert not [p.name for p in (tmp_path / "k").iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]


def test_out_that_cannot_be_written_fails_first(tiny_model, localized, small_pool, tmp_path):
    (tmp_path / "file").write_text("x")
    r = p2d("mine", "--model", tiny_model, "--heads", localized / "heads.json", "--data", small_pool,
            "--domain", "code", "--out", tmp_path / "file" / "out", ok=False)
    assert r.exit_code == 2 and "--out" in r.output and "cannot write" in r.output


def test_train_needs_heads_for_head_scope(tiny_model, small_pool, tmp_path):
    r = p2d("train", "--model", tiny_model, "--data", small_pool, "--scope", "heads", "--out", tmp_path, ok=False)
    assert r.exit_code == 2 and "--heads" in r.output


def test_wheel_installs_only_the_p2d_package(tmp_path):
    """No top-level `cli` (or pipelines, data_cards) module in site-packages: everything lives under p2d."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(root)],
                   check=True, capture_output=True)
    (wheel,) = tmp_path.glob("p2d-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    name, version = wheel.name.split("-")[:2]
    assert tops == {"p2d", f"{name}-{version}.dist-info"}
    names = zipfile.ZipFile(wheel).namelist()
    assert {"p2d/cli/main.py", "p2d/pipelines/run.py", "p2d/data_cards/code.md"} <= set(names)


def test_eval_command_writes_metrics(tiny_model, tmp_path):
    rows = [{"question": f"Tom has {a} apples and buys {b} more. How many now?",
             "answer": f"{a}+{b} = {a + b}\n#### {a + b}"} for a, b in ((2, 3), (4, 5), (7, 1))]
    data = tmp_path / "gsm.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    p2d("eval", tiny_model, "--domain", "math", "--eval-data", data, "--limit", 2, "--out", tmp_path / "eval.json")
    res = json.loads((tmp_path / "eval.json").read_text())
    assert res["nll"] > 0 and res["nll_samples"] == 3
    assert 0 <= res["gsm8k_em"] <= 1 and res["task_samples"] == 2


def test_config_file_reproduces_the_command_line(tmp_path, monkeypatch):
    """`p2d run --config run.yaml` builds the same configuration as the flags; flags given as well win."""
    import dataclasses

    import p2d.pipelines.run as run_module

    seen = []
    monkeypatch.setattr(run_module, "run_pipeline", lambda cfg, out, *a, **k: seen.append((cfg, out)))
    flags = ["--domain", "math", "--data-frac", "0.2", "--head-frac", "0.05", "--quality", "nll", "--epochs", "3",
             "--lr", "0.002", "--scope", "alps", "--kv-scope", "none", "--diversity", "facility", "--head-report",
             "--data", "a.jsonl", "--data", "b.json", "--out", str(tmp_path / "a")]
    p2d("run", *flags)
    (tmp_path / "run.yaml").write_text(
        "domain: math\ndata-frac: 0.2\nhead_frac: 0.05\nquality: nll\nepochs: 3\nlr: 0.002\nscope: alps\n"
        f"kv-scope: none\ndiversity: facility\nhead-report: true\ndata: [a.jsonl, b.json]\nout: {tmp_path / 'a'}\n")
    p2d("run", "--config", tmp_path / "run.yaml")
    assert dataclasses.asdict(seen[0][0]) == dataclasses.asdict(seen[1][0]) and seen[0][1] == seen[1][1]
    assert seen[0][0].pool == ["a.jsonl", "b.json"]
    p2d("run", "--config", tmp_path / "run.yaml", "--data-frac", "0.3", "--data", "c.csv")
    assert seen[2][0].mine.data_frac == 0.3 and seen[2][0].train.scope == "alps" and seen[2][0].pool == "c.csv"
    (tmp_path / "bad.yaml").write_text("data-frac: 0.2\nnot-an-option: 1\n")
    r = p2d("run", "--config", tmp_path / "bad.yaml", ok=False)
    assert r.exit_code == 2 and "not-an-option" in r.output and "bad.yaml" in r.output


def test_stale_deepspeed_build_lock_is_named_not_waited_on(tiny_model, localized, small_pool, tmp_path, monkeypatch):
    """A run killed while DeepSpeed compiled its extension leaves a lock torch would wait on forever."""
    lock = tmp_path / "ext" / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    os.utime(lock, (0, 0))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 2}}')
    args = ("train", "--model", tiny_model, "--heads", localized / "heads.json", "--data", small_pool,
            "--deepspeed", ds, "--max-steps", 1, "--out", tmp_path / "o")
    r = p2d(*args, ok=False)
    assert r.exit_code == 2 and str(lock) in r.output and "delete it" in r.output
    lock.touch()  # a build running right now: its fresh lock is left alone
    from p2d.trainer import check_extension_locks

    check_extension_locks()
