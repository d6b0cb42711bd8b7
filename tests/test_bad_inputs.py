"""A battery of bad inputs across the commands: each exits 2 with one line naming the culprit, no traceback,
before any model work, and leaves what an earlier run wrote in --out byte-identical."""

import json

import pytest
from click.testing import CliRunner

from p2d.cli.main import main

from test_cli import localized, perturbed_task_model  # noqa: F401  (module fixture and its helper)

KEEP = "earlier output, must survive\n"


@pytest.fixture(scope="module")
def files(tmp_path_factory, localized):  # noqa: F811
    d = tmp_path_factory.mktemp("bad")

    def w(name, data):
        (d / name).write_bytes(data if isinstance(data, bytes) else data.encode())
        return d / name

    heads = json.loads((localized / "heads.json").read_text())
    other = dict(heads, num_layers=30, num_heads=9, num_kv_heads=3)
    return {
        "bad_json_line": w("bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n'),
        "not_utf8": w("latin1.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "\xe9t\xe9", "output": "c"}\n'),
        "empty": w("empty.json", ""),
        "scalar": w("scalar.json", "42"),
        "rows_not_objects": w("rows.jsonl", "[1, 2]\n"),
        "no_fields": w("nofields.jsonl", '{"foo": "a", "bar": "b"}\n'),
        "dir": d,
        "heads_not_json": w("heads_bad.json", "{not json"),
        "heads_missing_key": w("heads_missing.json", json.dumps({k: v for k, v in heads.items() if k != "selected"})),
        "heads_other_model": w("heads_other.json", json.dumps(other)),
        "heads_list": w("heads_list.json", "[]"),
        "ds_list": w("ds_list.json", "[1, 2]"),
        "ds_stage7": w("ds7.json", '{"zero_optimization": {"stage": 7}}'),
        "ds_optimizer": w("ds_opt.json", '{"optimizer": {"type": "Adam"}}'),
        "ds_fp16": w("ds_fp16.json", '{"fp16": {"enabled": true}}'),
        "ds_not_json": w("ds_bad.json", "{"),
        "cfg_unknown": w("unknown.yaml", "data-frac: 0.1\nbogus: 1\n"),
        "cfg_list": w("list.yaml", "- 1\n- 2\n"),
        "cfg_bad_yaml": w("bad.yaml", "a: [1, 2\n"),
        "plan_cfg_bad": w("config.json", "{"),
        "a_file": w("a_file", "x"),
        "heads": localized / "heads.json",
    }


def cases():
    """(id, args builder, text the message must contain)."""
    m = lambda *a: lambda f, t, p: ["mine", "--model", t, "--heads", f["heads"], "--data", p, "--domain", "code", *a]  # noqa: E731
    tr = lambda *a: lambda f, t, p: ["train", "--model", t, "--heads", f["heads"], "--data", p, *a]  # noqa: E731
    run = lambda *a: lambda f, t, p: ["run", "--model", t, "--pool", p, *a]  # noqa: E731
    loc = lambda *a: lambda f, t, p: ["localize", "--model", t, "--domain", "code", *a]  # noqa: E731
    out = []
    # data files
    for key, text in [("bad_json_line", "bad.jsonl:2"), ("not_utf8", "latin1.jsonl:2"), ("empty", "empty file"),
                      ("scalar", "scalar.json"), ("rows_not_objects", "rows.jsonl:1"), ("no_fields", "nofields.jsonl"),
                      ("dir", "bad")]:
        out.append((f"mine-data-{key}", lambda f, t, p, k=key: m()(f, t, f[k]), text))
        out.append((f"train-data-{key}", lambda f, t, p, k=key: tr()(f, t, f[k]), text))
    out += [("mine-data-missing", lambda f, t, p: m()(f, t, "/nonexistent/pool.jsonl"), "pool.jsonl"),
            ("mine-target-bad", lambda f, t, p: m("--target", f["bad_json_line"])(f, t, p), "bad.jsonl:2"),
            ("mine-target-utf8", lambda f, t, p: m("--target", f["not_utf8"])(f, t, p), "latin1.jsonl:2"),
            ("mine-fields-bad", m("--fields", "instruction"), "--fields"),
            ("mine-fields-unknown", m("--fields", "instruction=nope,output=zip"), "nope")]
    # heads files
    for key, text in [("heads_not_json", "heads_bad.json"), ("heads_missing_key", "selected"),
                      ("heads_other_model", "heads_other.json"), ("heads_list", "heads_list.json")]:
        out.append((f"mine-{key}", lambda f, t, p, k=key: ["mine", "--model", t, "--heads", f[k], "--data", p,
                                                          "--domain", "code"], text))
        out.append((f"train-{key}", lambda f, t, p, k=key: ["train", "--model", t, "--heads", f[k], "--data", p], text))
    out.append(("mine-heads-missing", lambda f, t, p: ["mine", "--model", t, "--heads", "/no/heads.json", "--data", p,
                                                      "--domain", "code"], "heads.json"))
    # numeric and choice options of mine
    for opt, val in [("--data-frac", "0"), ("--data-frac", "1.5"), ("--data-frac", "nan"), ("--data-frac", "-0.1"),
                     ("--quality-weight", "nan"), ("--quality-weight", "inf"), ("--max-length", "0"),
                     ("--batch-size", "0"), ("--selector", "best"), ("--quality", "great"), ("--diversity", "dpp"),
                     ("--index", "hnsw"), ("--pooling", "sum"), ("--mining-heads", "best"),
                     ("--mining-max-layer", "-1"), ("--data-frac", "abc"), ("--mining-window", "0"),
                     ("--template", "chat"), ("--template", "chatml"), ("--mining-dtype", "fp8")]:
        out.append((f"mine{opt}={val}", m(opt, val), opt))
    out += [("mine-facility-quality-nll", m("--diversity", "facility-quality", "--quality", "nll"), "--diversity"),
            ("mine-reducible-no-task", lambda f, t, p: ["mine", "--model", t, "--heads", f["heads_other_model"],
                                                        "--data", p, "--domain", "code", "--quality", "reducible"],
             "heads_other.json"),
            ("mine-alps-without-heads", lambda f, t, p: ["mine", "--model", t, "--data", p, "--domain", "code"],
             "--heads"),
            ("mine-no-target", lambda f, t, p: ["mine", "--model", t, "--heads", f["heads"], "--data", p], "target"),
            ("mine-model-missing", lambda f, t, p: ["mine", "--model", "/no/model", "--heads", f["heads"], "--data",
                                                    p, "--domain", "code"], "/no/model")]
    # numeric and choice options of train
    for opt, val in [("--lr", "0"), ("--lr", "-1"), ("--lr", "nan"), ("--lr", "inf"), ("--epochs", "0"),
                     ("--max-steps", "0"), ("--weight-decay", "-0.1"), ("--weight-decay", "nan"),
                     ("--save-every", "0"), ("--max-length", "0"), ("--max-length", "1"), ("--batch-size", "0"),
                     ("--grad-accum", "0"), ("--scope", "everything"), ("--kv-scope", "some"), ("--epochs", "x"),
                     ("--template", "chat")]:
        out.append((f"train{opt}={val}", tr(opt, val), opt))
    for key, text in [("ds_list", "JSON object"), ("ds_stage7", "stage"), ("ds_optimizer", "optimizer"),
                      ("ds_fp16", "fp16"), ("ds_not_json", "ds_bad.json")]:
        out.append((f"train-deepspeed-{key}", lambda f, t, p, k=key: tr("--deepspeed", f[k])(f, t, p), text))
    out.append(("train-heads-scope-without-heads", lambda f, t, p: ["train", "--model", t, "--data", p], "--heads"))
    # run and localize
    for opt, val in [("--data-frac", "0"), ("--head-frac", "0"), ("--head-frac", "1.5"), ("--head-frac", "nan"),
                     ("--lr", "0"), ("--epochs", "0"), ("--reference-steps", "0"), ("--eval-limit", "-1"),
                     ("--proxy-steps", "0"), ("--proxy-samples", "0"), ("--quality-weight", "nan"),
                     ("--scope", "qkv-all"), ("--from-stage", "report"), ("--domain", "poetry"), ("--kv-scope", "x"),
                     ("--mining-window", "0"), ("--dedup", "2"), ("--template", "chat"), ("--pooling", "sum"),
                     ("--mining-dtype", "half")]:
        out.append((f"run{opt}={val}", run(opt, val), opt))
    for opt, val in [("--head-frac", "0"), ("--head-frac", "2"), ("--proxy-steps", "0"), ("--metric", "l2"),
                     ("--head-method", "best")]:
        out.append((f"localize{opt}={val}", loc(opt, val), opt))
    out.append(("localize-no-task", lambda f, t, p: ["localize", "--model", t], "--task-model"))
    # config files
    for key, text in [("cfg_unknown", "bogus"), ("cfg_list", "mapping"), ("cfg_bad_yaml", "bad.yaml")]:
        out.append((f"run-config-{key}", lambda f, t, p, k=key: ["run", "--config", f[k]], text))
        out.append((f"mine-config-{key}", lambda f, t, p, k=key: ["mine", "--config", f[k]], text))
    out.append(("run-config-missing", lambda f, t, p: ["run", "--config", "/no/run.yaml"], "run.yaml"))
    # plan and eval
    out += [("plan-config-bad", lambda f, t, p: ["plan", "--model", f["plan_cfg_bad"], "--data", p], "config.json"),
            ("plan-config-missing", lambda f, t, p: ["plan", "--model", "/no/config.json", "--data", p], "config.json"),
            ("plan-data-frac", lambda f, t, p: ["plan", "--model", t, "--data", p, "--data-frac", "2"], "--data-frac"),
            ("plan-mfu", lambda f, t, p: ["plan", "--model", t, "--data", p, "--mfu", "0"], "--mfu"),
            ("plan-hardware", lambda f, t, p: ["plan", "--model", t, "--hardware", "tpu"], "--hardware"),
            ("plan-data-utf8", lambda f, t, p: ["plan", "--model", t, "--data", f["not_utf8"]], "latin1.jsonl:2"),
            ("eval-domain", lambda f, t, p: ["eval", t, "--domain", "poetry"], "--domain"),
            ("eval-model-missing", lambda f, t, p: ["eval", "/no/model", "--domain", "code", "--no-tasks"], "/no/model")]
    return out


CASES = cases()


def test_the_battery_is_large_enough():
    assert len(CASES) >= 80 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("build,culprit", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_error(files, tiny_model, small_pool, tmp_path, build, culprit):
    out = tmp_path / "out"
    out.mkdir()
    (out / "selected.jsonl").write_text(KEEP)
    args = [str(a) for a in build(files, tiny_model, small_pool)]
    if args[0] in ("mine", "train", "run", "localize"):
        args += ["--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert culprit in result.output, result.output
    assert (out / "selected.jsonl").read_text() == KEEP
