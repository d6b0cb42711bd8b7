"""`p2d run` on a tiny model: the AER contract, stage reuse, resume after a kill, and intact stages on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from p2d import P2DError
from p2d.pipelines.run import RunConfig, run_pipeline

HUMANEVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval" / "humaneval.jsonl.gz"


def config(tiny_model, data, **kw) -> RunConfig:
    base = dict(model=str(tiny_model), pool=str(data), proxy_data=str(data), data_frac=0.25, head_frac=0.1,
                proxy_samples=8, proxy_steps=2, reference_steps=2, lr=1e-2, max_steps=4, max_length=128, save_every=1)
    return RunConfig.from_options(**(base | kw))


def stage_state(run, name):
    return json.loads((run / name / ".p2d-stage.json").read_text())


@pytest.fixture(scope="module")
def finished(tiny_model, small_pool, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    report = run_pipeline(config(tiny_model, small_pool), run, progress=False)
    return run, report


def test_report_contract(finished):
    run, report = finished
    aer = json.loads((run / "aer.json").read_text())
    assert set(aer["stages"]) == {"proxy", "localize", "mine", "train"}
    assert all(aer["stages"][s]["seconds"] > 0 for s in aer["stages"])
    assert aer["total_seconds"] == pytest.approx(sum(s["seconds"] for s in aer["stages"].values()))
    assert aer["reference"]["seconds"] > 0 and "timed steps of the real plan" in aer["reference"]["method"]
    assert aer["aer"] == pytest.approx(aer["total_seconds"] / aer["reference"]["seconds"])
    assert aer["speedup"] == pytest.approx(1 / aer["aer"])
    assert all(aer["stages"][s]["flops"] > 0 and aer["stages"][s]["planned_seconds"] > 0 for s in aer["stages"])
    assert aer["stages"]["train"]["flops"] < aer["reference"]["flops"]  # heads on a quarter of the pool
    assert aer["aer_flops"] == pytest.approx(aer["total_flops"] / aer["reference"]["flops"])
    assert set(json.loads((run / "plan.json").read_text())["stages"]) == set(aer["stages"]) | {"reference"}
    log = [json.loads(line) for line in (run / "train" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 5)) and all(r["lr"] > 0 for r in log)
    assert (run / "train" / "loss.png").is_file()
    assert all(Path(p).exists() for p in aer["outputs"].values())
    lo, hi = aer["reference"]["interval"]
    assert lo <= aer["reference"]["seconds"] <= hi and aer["reference"]["timed_steps"] == 2
    assert (run / "aer.png").stat().st_size > 1000
    md = (run / "report.md").read_text()
    assert "## Outputs" in md and "loss.png" in md
    assert "AER" in md and "heads.png" in md and f"{aer['subset']['selected']} of 48" in md
    assert (run / "train" / "model" / "config.json").is_file()


def test_second_run_reuses_every_stage(finished, tiny_model, small_pool):
    run, report = finished
    before = {s: (run / s / ".p2d-stage.json").stat().st_mtime_ns for s in ("proxy", "localize", "mine", "train", "reference")}
    heads = (run / "localize" / "heads.json").read_bytes()
    again = run_pipeline(config(tiny_model, small_pool), run, progress=False)
    after = {s: (run / s / ".p2d-stage.json").stat().st_mtime_ns for s in before}
    assert after == before
    assert (run / "localize" / "heads.json").read_bytes() == heads
    # reused stages keep the cost they had when they ran (the new plan's prediction may differ: it has their rates)
    def cost(stages):
        return {name: {k: v for k, v in s.items() if k != "planned_seconds"} for name, s in stages.items()}

    assert cost(again["stages"]) == cost(report["stages"])


def test_a_run_sets_the_rates_of_the_next_plan(tiny_model, small_pool, tmp_path, monkeypatch):
    """After a run, a plan of the same model on this machine predicts each stage at the rate that run
    achieved (its FLOPs over its seconds), where the first plan had only the calibration."""
    monkeypatch.setattr("p2d.plan._observed_path", lambda: tmp_path / "observed_rates.json")  # this test's alone
    run = tmp_path / "run"
    epochs = dict(max_steps=None, epochs=1)  # under --max-steps training's FLOPs are not an epoch's: no rate kept
    first = run_pipeline(config(tiny_model, small_pool, **epochs), run, progress=False)
    assert not any("observed" in a for a in json.loads((run / "plan.json").read_text())["assumptions"])
    run_pipeline(config(tiny_model, small_pool, **epochs), run, progress=False)  # every stage reused, a new plan
    plan = json.loads((run / "plan.json").read_text())
    ran = {name: first["stages"][name] for name in ("proxy", "mine", "train")} | {"reference": first["reference"]}
    for name, stage in ran.items():
        rate = stage["flops"] / stage["seconds"]
        assert plan["stages"][name]["seconds"] == pytest.approx(plan["stages"][name]["flops"] / rate), name
    assert any("observed in earlier runs" in a for a in plan["assumptions"])
    # a reused stage is the same observation: the history still holds one rate per stage
    assert all(len(v) == 1 for v in json.loads((tmp_path / "observed_rates.json").read_text()).values())


def test_changed_option_reruns_from_that_stage(finished, tiny_model, small_pool):
    run, _ = finished
    mine_before = stage_state(run, "mine")
    run_pipeline(config(tiny_model, small_pool, scope="alps"), run, progress=False)
    assert stage_state(run, "mine") == mine_before
    assert json.loads((run / "train" / "train.json").read_text())["scope"] == "alps"


def test_pool_edited_in_place_reruns_mining(tiny_model, small_pool, tmp_path, monkeypatch):
    """Same options, other bytes: the cache key holds the pool's content, so mining and later stages rerun;
    the proxy (another input) is reused, also from another working directory."""
    import shutil

    pool = tmp_path / "pool.jsonl"
    shutil.copyfile(small_pool, pool)
    run = tmp_path / "run"
    cfg = config(tiny_model, pool, proxy_data=str(small_pool))
    run_pipeline(cfg, run, progress=False)
    proxy, mine = stage_state(run, "proxy"), stage_state(run, "mine")
    rows = pool.read_text().splitlines()
    pool.write_text("\n".join(rows[1:] + rows[:1]) + "\n")  # same rows, another order: another selection input
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run_pipeline(cfg, run, progress=False)
    assert stage_state(run, "proxy") == proxy
    assert stage_state(run, "mine")["fingerprint"] != mine["fingerprint"]


def test_base_model_replaced_in_place_reruns_every_stage(small_pool, tmp_path):
    """The same --model path with other weights (a re-download, a re-conversion) is another base: nothing is reused."""
    from conftest import save_tiny

    model = save_tiny(tmp_path / "model", seed=0)
    run = tmp_path / "run"
    cfg = config(model, small_pool)
    run_pipeline(cfg, run, progress=False)
    before = {s: stage_state(run, s)["fingerprint"] for s in ("proxy", "localize", "mine", "train", "reference")}
    save_tiny(model, seed=1)
    run_pipeline(cfg, run, progress=False)
    after = {s: stage_state(run, s)["fingerprint"] for s in before}
    assert all(after[s] != before[s] for s in before)


def test_killed_training_resumes(tiny_model, small_pool, tmp_path, monkeypatch):
    from p2d import trainer

    real_save = trainer._Run.save
    calls = {"n": 0}

    def dying_save(self, out_dir, state):
        real_save(self, out_dir, state)
        calls["n"] += out_dir == tmp_path / "train"
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(trainer._Run, "save", dying_save)
    cfg = config(tiny_model, small_pool)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(cfg, tmp_path, progress=False)
    assert stage_state(tmp_path, "mine")["done"] and not stage_state(tmp_path, "train")["done"]
    monkeypatch.setattr(trainer._Run, "save", real_save)
    run_pipeline(cfg, tmp_path, progress=False)
    summary = json.loads((tmp_path / "train" / "train.json").read_text())
    assert summary["resumed_from"] == 2 and summary["steps"] == 4


def test_bad_pool_fails_at_mine_and_keeps_earlier_stages(finished, tiny_model, small_pool, tmp_path):
    run, _ = finished
    heads = (run / "localize" / "heads.json").read_bytes()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\nnot json\n')
    with pytest.raises(P2DError, match=r"bad\.jsonl:2"):
        run_pipeline(config(tiny_model, small_pool, pool=str(bad)), run, progress=False)
    assert stage_state(run, "proxy")["done"] and stage_state(run, "localize")["done"]
    assert (run / "localize" / "heads.json").read_bytes() == heads


@pytest.mark.parametrize("stage, change", [("mine", {"mine": {"index": "flat"}}), ("mine", {"mine": {"batch_size": 3}}),
                                           ("localize", {"localize": {"tau": 2.0}}),
                                           ("localize", {"localize": {"variant": "qkv-concat"}}),
                                           ("proxy", {"localize": {"proxy": {"lr": 1e-3}}}),
                                           ("train", {"train": {"kv_scope": "none"}}),
                                           ("train reference", {"train": {"train": {"warmup_ratio": 0.2}}}),
                                           ("reference", {"reference": {"measure": True}}),
                                           ("", {"train": {"train": {"save_every": 7, "tensorboard": True}}})])
def test_every_field_of_a_stage_config_is_in_its_cache_key(tiny_model, small_pool, stage, change):
    """Options that run.py never names (most here: ones `p2d run` has no flag for) still change their
    stage's key; the training loop's change the reference's too, which trains with the same loop; how
    often a run checkpoints, or whether it logs to TensorBoard, changes none."""
    from dataclasses import replace

    from p2d.pipelines.run import _stage_options

    def apply(obj, diff):
        return replace(obj, **{k: apply(getattr(obj, k), v) if isinstance(v, dict) else v for k, v in diff.items()})

    cfg = config(tiny_model, small_pool)
    before, after = _stage_options(cfg), _stage_options(apply(cfg, change))
    assert [s for s in before if before[s] != after[s]] == stage.split()


@pytest.mark.parametrize("name", ["data_fraction", "heads", "data", "train", "proxy"])
def test_run_rejects_what_is_not_an_option(name):
    with pytest.raises(P2DError, match=f"no option '{name}'"):
        RunConfig.from_options(**{name: 0.1})


def test_run_json_of_another_layout_is_a_clear_error(tiny_model, small_pool):
    from dataclasses import asdict

    recorded = asdict(config(tiny_model, small_pool)) | {"data_frac": 0.1}
    with pytest.raises(P2DError, match="no field data_frac"):
        RunConfig.from_json(recorded)


@pytest.mark.parametrize("kw, match", [({"data_frac": 0.0}, "data-frac"), ({"head_frac": 2.0}, "head-frac"),
                                       ({"domain": "poetry"}, "poetry"), ({"scope": "everything"}, "scope"),
                                       ({"pooling": "median"}, "--pooling"), ({"dedup": 1.5}, "--dedup"),
                                       ({"template": "chatml"}, "--template")])
def test_bad_options_fail_before_any_stage(tiny_model, small_pool, tmp_path, kw, match):
    with pytest.raises(P2DError, match=match):
        run_pipeline(config(tiny_model, small_pool, **kw), tmp_path / "r", progress=False)
    assert not (tmp_path / "r" / "proxy").exists()


def test_eval_scores_base_and_trained_without_redoing_stages(finished, tiny_model, small_pool):
    if not HUMANEVAL.exists():
        pytest.skip("needs ../shared/data/eval/humaneval.jsonl.gz for the code card")
    run, _ = finished
    run_pipeline(config(tiny_model, small_pool), run, progress=False)  # stages as this config makes them
    before = {s: stage_state(run, s) for s in ("proxy", "localize", "mine", "train", "reference")}
    report = run_pipeline(config(tiny_model, small_pool, evaluate=True, eval_limit=2), run, progress=False)
    assert {s: stage_state(run, s) for s in before} == before  # --eval adds an evaluation, it retrains nothing
    for name in ("base", "trained"):
        res = report["eval"][name]
        assert res["eval_task"] == "humaneval" and res["task_samples"] == 2 and 0 <= res["humaneval_pass@1"] <= 1
        saved = json.loads((run / f"eval-{name}.json").read_text())
        assert saved["nll"] == pytest.approx(res["nll"]) and len(saved["task_results"]) == 2
    assert report["eval"]["trained"]["nll"] != report["eval"]["base"]["nll"]  # the trained model, not the base twice
    assert json.loads((run / "aer.json").read_text())["eval"] == report["eval"]
    assert "## Evaluation" in (run / "report.md").read_text()


def test_a_pool_with_its_own_field_names_runs_every_stage(tiny_model, small_pool, tmp_path):
    """--fields reaches mining, training and the reference alike (the subset keeps the pool's own fields)."""
    rows = [json.loads(line) for line in small_pool.read_text().splitlines()]
    pool = tmp_path / "renamed.jsonl"
    pool.write_text("".join(json.dumps({"ask": r["instruction"], "reply": r["output"]}) + "\n" for r in rows))
    report = run_pipeline(config(tiny_model, small_pool, pool=str(pool), fields="instruction=ask,output=reply"),
                          tmp_path / "r", progress=False)
    selected = [json.loads(line) for line in Path(report["subset"]["path"]).read_text().splitlines()]
    assert set(selected[0]) == {"ask", "reply"}
    info = json.loads((Path(report["subset"]["path"]).parent / "dataset_info.json").read_text())
    assert info["p2d_selected"]["columns"] == {"prompt": "ask", "response": "reply"}  # LLaMA-Factory reads it as is
    trained = json.loads((tmp_path / "r" / "train" / "train.json").read_text())
    assert trained["samples"] == len(selected) == report["subset"]["selected"]


def test_a_pool_of_two_sources_in_their_own_schemas_runs_every_stage(tiny_model, small_pool, tmp_path):
    """--data a --data b: one pool, each source read in its own schema; rows keep their source in
    scores.csv, and each source's selected rows are exported (and trained on) in its own schema."""
    import csv

    rows = [json.loads(line) for line in small_pool.read_text().splitlines()]
    alpaca, qa = tmp_path / "alpaca.jsonl", tmp_path / "qa.json"
    alpaca.write_text("".join(json.dumps(r) + "\n" for r in rows[0::2]))
    qa.write_text(json.dumps([{"question": r["instruction"], "answer": r["output"]} for r in rows[1::2]]))  # no ids
    report = run_pipeline(config(tiny_model, small_pool, pool=[str(alpaca), str(qa)], data_frac=0.5),
                          tmp_path / "r", progress=False)
    mined = Path(report["subset"]["path"]).parent
    with open(mined / "scores.csv", encoding="utf-8") as f:
        scores = list(csv.DictReader(f))
    assert [r["source"] for r in scores] == ["alpaca"] * 24 + ["qa"] * 24
    assert [r["id"] for r in scores[24:]] == [f"qa/{i}" for i in range(24)]  # id-less rows kept apart by source
    chosen = {name: sum(r["selected"] == "1" for r in scores if r["source"] == name) for name in ("alpaca", "qa")}
    assert all(chosen.values())
    for name, keys in (("alpaca", set(rows[0])), ("qa", {"question", "answer"})):
        part = [json.loads(line) for line in (mined / "selected" / f"{name}.jsonl").read_text().splitlines()]
        assert len(part) == chosen[name] and all(set(r) == keys for r in part)
    info = json.loads((mined / "dataset_info.json").read_text())
    assert info["p2d_selected_qa"] == {"file_name": "selected/qa.jsonl",
                                       "columns": {"prompt": "question", "response": "answer"}}
    assert info["p2d_selected_alpaca"]["file_name"] == "selected/alpaca.jsonl"
    trl = [json.loads(line) for line in (mined / "trl.jsonl").read_text().splitlines()]
    assert len(trl) == sum(chosen.values()) and all(set(r) == {"prompt", "completion"} for r in trl)
    trained = json.loads((tmp_path / "r" / "train" / "train.json").read_text())
    assert trained["samples"] == sum(chosen.values())
    assert json.loads((tmp_path / "r" / "run.json").read_text())["config"]["pool"] == [str(alpaca), str(qa)]


def test_run_json_reads_back_as_the_config_that_ran(finished):
    from dataclasses import asdict

    run, _ = finished  # whichever configuration ran there last (other tests rerun it with their own)
    recorded = json.loads((run / "run.json").read_text())["config"]
    assert json.loads(json.dumps(asdict(RunConfig.from_json(recorded)))) == recorded


def test_a_moved_run_directory_reuses_every_stage(tiny_model, small_pool, tmp_path):
    """Stage summaries name the run's files relative to it: a copied or moved run resumes where it now is."""
    import shutil

    run = tmp_path / "run"
    run_pipeline(config(tiny_model, small_pool), run, progress=False)
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    before = {s: (moved / s / ".p2d-stage.json").read_bytes() for s in ("proxy", "localize", "mine", "train", "reference")}
    assert all(str(run) not in b.decode() for b in before.values())
    report = run_pipeline(config(tiny_model, small_pool), moved, progress=False)
    assert {s: (moved / s / ".p2d-stage.json").read_bytes() for s in before} == before
    assert report["subset"]["path"] == str(moved.resolve() / "mine" / "selected.jsonl")
    assert Path(report["outputs"]["heads"]).is_relative_to(moved.resolve())
