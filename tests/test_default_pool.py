"""p2d.default_pool: size, determinism, seed/pool disjointness, correct math, parseable code."""

import ast
import json
import re

import pytest

from p2d import P2DError
from p2d.data import load_examples
from p2d.default_pool import DOMAINS, build_pool, build_seeds, pool_path


@pytest.fixture(scope="module")
def pool():
    return build_pool()


def test_size_and_fields(pool):
    assert len(pool) >= 3000
    for domain in DOMAINS:
        assert sum(r["domain"] == domain for r in pool) >= 1000
    assert all(set(r) == {"id", "domain", "instruction", "input", "output"} for r in pool)
    assert all(r["instruction"].strip() and r["output"].strip() for r in pool)
    assert len({r["id"] for r in pool}) == len(pool)


def test_deterministic(pool):
    from p2d import default_pool

    default_pool._build.cache_clear()
    assert build_pool() == pool


def test_seeds_disjoint_from_pool(pool):
    ids = {r["id"] for r in pool}
    contents = {(r["instruction"], r["input"]) for r in pool}
    for domain in DOMAINS:
        seeds = build_seeds(domain)
        assert len(seeds) == 64 and {r["domain"] for r in seeds} == {domain}
        assert not ids & {r["id"] for r in seeds}
        assert not contents & {(r["instruction"], r["input"]) for r in seeds}
        assert build_seeds(domain, 10) == seeds[:10]
    with pytest.raises(P2DError, match="available: code, math, general"):
        build_seeds("poetry")


def test_math_answers_are_correct(pool):
    for r in (r for r in pool if r["domain"] == "math"):
        *steps, final = r["output"].split("\n")
        answer = re.fullmatch(r"#### (\d+)", final)
        assert answer, r["output"]
        values = []
        for expr, value in re.findall(r"<<([\d+\-*/]+)=(\d+)>>", r["output"]):
            assert eval(expr) == int(value), (expr, value)  # the generator's own arithmetic, re-checked
            values.append(int(value))
        assert len(values) == len(steps) and values[-1] == int(answer[1])


def test_code_outputs_parse(pool):
    for r in (r for r in pool if r["domain"] == "code"):
        tree = ast.parse(r["output"])
        name = r["instruction"].split("`")[1].split("(")[0]
        assert isinstance(tree.body[0], ast.FunctionDef) and tree.body[0].name == name
        assert ast.get_docstring(tree.body[0])
    assert len({r["output"] for r in pool if r["domain"] == "code"}) == sum(r["domain"] == "code" for r in pool)


def test_general_answers_spot_check(pool):
    general = [r for r in pool if r["domain"] == "general"]
    for r in general:
        if r["instruction"] == "How many words are in the following sentence?":
            assert int(r["output"]) == len(r["input"].split())
        if r["instruction"] == "Convert this sentence to upper case.":
            assert r["output"] == r["input"].upper()
    assert any(r["input"] == "" for r in general) and any(r["input"] for r in general)


def test_pool_path_cached_and_loadable(tmp_path, monkeypatch, pool):
    monkeypatch.setenv("P2D_CACHE", str(tmp_path))
    path = pool_path()
    assert path.parent == tmp_path / "data" and path.name.startswith("default-pool-v1-py")
    assert [json.loads(line) for line in path.read_text().splitlines()] == pool
    mtime = path.stat().st_mtime_ns
    assert pool_path().stat().st_mtime_ns == mtime
    examples = load_examples("p2d:default")
    assert len(examples) == len(pool) and examples[0].id == pool[0]["id"] and examples[0].domain == pool[0]["domain"]
    seeds = load_examples("p2d:seed/math")
    assert len(seeds) == 64 and seeds[0].response.split("\n")[-1].startswith("####")
