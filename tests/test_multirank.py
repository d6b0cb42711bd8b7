"""`torchrun --nproc-per-node 2 p2d mine` (gloo, CPU): the same selection, byte for byte, as one process."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from p2d.default_pool import build_pool

from test_cli import localized, p2d, perturbed_task_model  # noqa: F401  (module fixture and helpers)


def no_launcher_env() -> dict:
    """This environment without a launcher's rank variables (the test process may run under one)."""
    return {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pool_600(tmp_path_factory):
    """600 rows: three feature-store shards of 256, so both ranks get work and one gets two."""
    rows = build_pool()
    picked = [r for d in ("code", "math", "general") for r in [x for x in rows if x["domain"] == d][:200]]
    path = tmp_path_factory.mktemp("pool600") / "pool.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in picked))
    return path


@pytest.mark.parametrize("pool_kind", ["three-shards", "one-shard"])
def test_two_rank_mining_equals_one_process(tiny_model, localized, small_pool, pool_600, tmp_path, pool_kind):  # noqa: F811
    pool = pool_600 if pool_kind == "three-shards" else small_pool  # one shard: rank 1 has nothing to do
    args = ["mine", "--model", str(tiny_model), "--heads", str(localized / "heads.json"), "--data", str(pool),
            "--domain", "code", "--data-frac", "0.1"]
    p2d(*args, "--out", tmp_path / "one")
    env = no_launcher_env()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(free_port()), "-m", "p2d.cli.main", *args, "--out", str(tmp_path / "two")],
                          env=env | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("selected.jsonl", "scores.csv", "trl.jsonl"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    shards = sorted((tmp_path / "two" / "store").glob("shard-*.json"))
    assert len(shards) == (3 if pool_kind == "three-shards" else 1)


def test_a_killed_two_rank_mining_resumes_to_the_same_selection(tiny_model, localized, pool_600, tmp_path):  # noqa: F811
    """SIGKILL the whole torchrun job once a first shard is written: the rerun keeps the finished shards and
    ends with the one-process selection, byte for byte."""
    import signal
    import time

    args = ["mine", "--model", str(tiny_model), "--heads", str(localized / "heads.json"), "--data", str(pool_600),
            "--domain", "code", "--data-frac", "0.1", "--batch-size", "1"]  # one row per forward: shards take a while
    env = no_launcher_env() | {"OMP_NUM_THREADS": "1"}
    # the one-process reference with the ranks' thread count: another count sums matmuls in another order
    one = subprocess.run([sys.executable, "-m", "p2d.cli.main", *args, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = tmp_path / "two"

    def launch():
        return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                                 str(free_port()), "-m", "p2d.cli.main", *args, "--out", str(two)],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)

    proc = launch()
    deadline = time.monotonic() + 300
    while not list((two / "store").glob("shard-*.json")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in (two / "store").glob("shard-*.json"))
    assert 1 <= len(done) < 3, done  # killed with work left
    stamps = {name: (two / "store" / name).stat().st_mtime_ns for name in done}
    proc = launch()
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert {name: (two / "store" / name).stat().st_mtime_ns for name in done} == stamps  # finished shards were kept
    for name in ("selected.jsonl", "scores.csv", "trl.jsonl"):
        assert (two / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name


def test_ranks_launched_with_other_feature_options_fail_naming_the_option(tiny_model, localized, pool_600, tmp_path):  # noqa: F811
    """Ranks must mine the same features; one launched with another --pooling is stopped with the store's
    clear error naming the option, not left to write shards the others would misread."""
    wrapper = tmp_path / "p2d_rank.py"  # rank 1 gets one more option than rank 0
    wrapper.write_text("import os, sys\nfrom p2d.cli.main import main\n"
                       "extra = ['--pooling', 'max'] if os.environ['RANK'] == '1' else []\n"
                       "sys.argv = ['p2d', *sys.argv[1:], *extra]\nmain()\n")
    env = no_launcher_env() | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(free_port()), str(wrapper), "mine", "--model", str(tiny_model), "--heads",
                           str(localized / "heads.json"), "--data", str(pool_600), "--domain", "code", "--out",
                           str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "made from other inputs" in out and "pooling" in out, out[-3000:]
    assert not (tmp_path / "two" / "selected.jsonl").exists()


def one_thread_env(tmp_path) -> dict:
    """The ranks' environment: one thread each, and a plan calibration already cached for that thread count
    (the plan's predicted seconds are not what these tests check; calibrating costs minutes on one thread)."""
    env = no_launcher_env()
    env |= {"OMP_NUM_THREADS": "1", "P2D_CACHE": str(tmp_path / "cache")}
    key = subprocess.run([sys.executable, "-c", "from p2d.plan import CALIBRATION_VERSION, machine; "
                          "print(f'{machine()}; calibration {CALIBRATION_VERSION}')"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    rates = {"forward_flops_per_s": 1e10, "train_flops_per_s": 1e10, "head_train_flops_per_s": 1e10, "method": "test"}
    (tmp_path / "cache").mkdir(exist_ok=True)
    (tmp_path / "cache" / "calibration.json").write_text(json.dumps({key: rates}))
    return env


def zero(stage: int) -> dict:
    return {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto"}


def test_two_rank_run_selects_as_one_process_and_reuses_its_stages(tiny_model, small_pool, tmp_path):
    """`torchrun p2d run --deepspeed` (ZeRO-3): rank 0 runs the proxy, localize and reference stages, both ranks
    mine and train, each loading only its partition of the model; the subset is the one process's byte for
    byte, the merged model keeps every frozen weight, the reference says it was divided by the ranks, and a
    second launch reuses every stage."""
    from safetensors.torch import load_file

    ds = tmp_path / "zero3.json"
    ds.write_text(json.dumps(zero(3)))
    args = ["run", "--model", str(tiny_model), "--pool", str(small_pool), "--proxy-data", str(small_pool),
            "--domain", "code", "--data-frac", "0.25", "--proxy-samples", "8", "--proxy-steps", "2",
            "--reference-steps", "2", "--max-steps", "2", "--max-length", "128", "--deepspeed", str(ds)]
    env = one_thread_env(tmp_path)
    one = subprocess.run([sys.executable, "-m", "p2d.cli.main", *args, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]

    def two():
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                               str(free_port()), "-m", "p2d.cli.main", *args, "--out", str(tmp_path / "two")],
                              env=env, capture_output=True, text=True, timeout=600)

    proc = two()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    heads = [json.loads((tmp_path / d / "localize" / "heads.json").read_text())["selected"] for d in ("one", "two")]
    assert heads[0] == heads[1]
    for name in ("mine/selected.jsonl", "mine/scores.csv"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
    aer = json.loads((tmp_path / "two" / "aer.json").read_text())
    single = json.loads((tmp_path / "one" / "aer.json").read_text())
    # each rank timed its share of the 2-rank plan: half the steps of one process's plan (the batch doubles)
    assert aer["reference"]["ranks"] == 2 and single["reference"]["ranks"] == 1
    assert aer["reference"]["steps_per_epoch"] == single["reference"]["steps_per_epoch"] // 2
    train = json.loads((tmp_path / "two" / "train" / "train.json").read_text())
    assert train["steps"] == 2 and train["partitioned_load"] is True
    # parameters are counted whole although each rank held only its partition
    from p2d.geometry import AttentionGeometry
    from p2d.masking import apply_scope
    from p2d.models import load_model
    from p2d.selection import read_heads_json

    model = load_model(str(tiny_model), device="cpu")[0]
    selected = read_heads_json(tmp_path / "two" / "localize" / "heads.json").heads
    info = apply_scope(model, AttentionGeometry.from_config(model.config), "heads", selected)
    assert (train["trainable_params"], train["total_params"]) == (info.trainable_params, info.total_params)
    base, merged = load_file(tiny_model / "model.safetensors"), load_file(tmp_path / "two" / "train" / "model" / "model.safetensors")
    frozen = [n for n in base if ".self_attn." not in n]  # the heads scope trains only q/k/v rows of its heads
    assert frozen and all(torch.equal(merged[n], base[n]) for n in frozen)
    markers = {p: p.stat().st_mtime_ns for p in (tmp_path / "two").glob("*/.p2d-stage.json")}
    again = two()
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in markers} == markers  # every stage reused, on both ranks


def test_ranks_launched_with_other_run_options_fail_naming_them(tiny_model, small_pool, tmp_path):
    wrapper = tmp_path / "p2d_rank.py"  # rank 1 gets another --data-frac
    wrapper.write_text("import os, sys\nfrom p2d.cli.main import main\n"
                       "extra = ['--data-frac', '0.5'] if os.environ['RANK'] == '1' else []\n"
                       "sys.argv = ['p2d', *sys.argv[1:], *extra]\nmain()\n")
    ds = tmp_path / "zero2.json"
    ds.write_text(json.dumps(zero(2)))
    env = one_thread_env(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(free_port()), str(wrapper), "run", "--model", str(tiny_model), "--pool", str(small_pool),
                           "--domain", "code", "--deepspeed", str(ds), "--out", str(tmp_path / "two")],
                          env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "rank 1 was launched with other options" in out and "mine.data_frac" in out, out[-3000:]
    assert not (tmp_path / "two" / "proxy").exists()  # stopped before any stage


def test_multi_rank_run_without_deepspeed_is_a_clear_error(tiny_model, small_pool, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    r = p2d("run", "--model", tiny_model, "--pool", small_pool, "--domain", "code", "--out", tmp_path / "r", ok=False)
    assert r.exit_code == 2 and "--deepspeed" in r.output and "Traceback" not in r.output
