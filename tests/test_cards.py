"""p2d.cards: every card parses and resolves; real shared data loads when present."""

from pathlib import Path

import pytest

from p2d import P2DError
from p2d.cards import available_domains, load_card
from p2d.data import load_examples, load_records
from p2d.default_pool import DOMAINS

SHARED = next((p for p in (Path("shared/data"), Path("../shared/data")) if p.is_dir()), None)
needs_shared = pytest.mark.skipif(SHARED is None, reason="no shared/data next to the repository")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("P2D_OFFLINE", "1")


def test_cards_load():
    assert available_domains() == sorted(DOMAINS)
    for domain in available_domains():
        card = load_card(domain)
        assert card.domain == domain and card.template == "alpaca" and card.license and card.description
        assert card.seed == f"p2d:seed/{domain}" and card.train[-1] == card.seed
        assert "## Sources" in card.text
    assert load_card("code").eval_task == "humaneval" and load_card("math").eval_task == "gsm8k"
    assert load_card("general").eval_task is None
    with pytest.raises(P2DError, match="available: code, general, math"):
        load_card("poetry")


def test_train_source_falls_back_to_embedded(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no shared/data here
    monkeypatch.delenv("P2D_DATA_DIR", raising=False)
    for domain in available_domains():
        card = load_card(domain)
        assert card.train_source() == f"p2d:seed/{domain}"
        assert card.eval_source() is None
        assert card.train_source(prefer_hub=True) == f"p2d:seed/{domain}"  # P2D_OFFLINE wins
    monkeypatch.delenv("P2D_OFFLINE")
    assert load_card("math").train_source(prefer_hub=True) == "openai/gsm8k@main:train"


def test_data_dir_env(monkeypatch, tmp_path):
    (tmp_path / "math").mkdir()
    (tmp_path / "math" / "gsm8k_train.jsonl").write_text('{"question": "1+1?", "answer": "2\\n#### 2"}\n')
    monkeypatch.setenv("P2D_DATA_DIR", str(tmp_path))
    card = load_card("math")
    assert card.train_source() == str((tmp_path / "math" / "gsm8k_train.jsonl").resolve())
    assert load_examples(card.train_source())[0].response.endswith("#### 2")


@needs_shared
def test_shared_data_loads(monkeypatch):
    monkeypatch.delenv("P2D_DATA_DIR", raising=False)
    code, math = load_card("code"), load_card("math")
    assert code.train_source().endswith("code/code_alpaca_2k.json")
    assert len(load_records(code.train_source())) == 2017
    assert len(load_examples(code.train_source())) == 2015  # two rows have an empty output
    gsm8k = load_examples(math.train_source())
    assert len(gsm8k) == 7473 and gsm8k[0].response.split("\n")[-1].startswith("#### ")
    assert len(load_examples(math.eval_source())) == 1319
    humaneval = load_examples(code.eval_source())
    assert len(humaneval) == 164 and humaneval[0].raw["task_id"] == "HumanEval/0"
    assert len(load_examples(load_card("general").train_source())) == 999
