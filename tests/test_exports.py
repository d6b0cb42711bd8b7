import csv
import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from p2d import P2DError
from p2d.exports import export_subset
from p2d.mining import MineResult, mine
from p2d.tokens import IGNORE, Example, Tokenized


def result_for(ids: list[str], selected: list[bool]) -> MineResult:
    n = len(ids)
    score = np.linspace(1, 0, n)
    return MineResult(ids, score.astype(np.float32), np.full(n, np.nan), score, np.arange(1, n + 1), np.array(selected))


ALPACA = [{"instruction": f"do {i}", "input": "" if i % 2 else "ctx", "output": f"done {i}", "extra": {"k": [i, i + 1], "s": "é"}}
          for i in range(5)]
CHAT = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}], "source": "x"}
        for i in range(4)]
QA = [{"question": f"q{i}", "answer": f"a{i}", "id": i} for i in range(4)]


def chosen(ex: list[Example], result: MineResult) -> list[Example]:
    """The selected examples, as `p2d mine` hands them to the export (read back from the pool by id)."""
    return [e for e, keep in zip(ex, result.selected) if keep]


def examples(records: list[dict]) -> list[Example]:
    return [Example(f"e{i}", "p", "r", raw=r) for i, r in enumerate(records)]


def test_selected_jsonl_keeps_records_in_pool_order(tmp_path):
    ex = examples(ALPACA)
    res = result_for([e.id for e in ex], [False, True, False, True, True])
    res.rank = np.array([5, 3, 4, 1, 2])
    paths = export_subset(tmp_path, chosen(ex, res), res, "alpaca", parquet=True)
    rows = [json.loads(l) for l in (tmp_path / "selected.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rows == [ALPACA[1], ALPACA[3], ALPACA[4]]  # pool order, every field, nothing added
    assert pq.read_table(paths["selected.parquet"]).to_pylist() == rows
    with open(tmp_path / "scores.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["id"] for r in table] == ["e0", "e1", "e2", "e3", "e4"]
    assert [r["selected"] for r in table] == ["0", "1", "0", "1", "1"] and table[0]["quality"] == ""
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    assert info == {"p2d_selected": {"file_name": "selected.jsonl",
                                     "columns": {"prompt": "instruction", "response": "output", "query": "input"}}}
    ds = yaml.safe_load((tmp_path / "axolotl.yaml").read_text())["datasets"][0]
    assert ds["type"] == "alpaca" and ds["ds_type"] == "json" and ds["path"] == "selected.jsonl"


def test_chat_and_question_answer_schemas(tmp_path):
    export_subset(tmp_path / "chat", examples(CHAT), result_for([f"e{i}" for i in range(4)], [True] * 4))
    info = json.loads((tmp_path / "chat" / "dataset_info.json").read_text())["p2d_selected"]
    assert info["formatting"] == "sharegpt" and info["columns"] == {"messages": "messages"}
    assert info["tags"]["role_tag"] == "role"
    ds = yaml.safe_load((tmp_path / "chat" / "axolotl.yaml").read_text())["datasets"][0]
    assert ds["type"] == "chat_template" and ds["field_messages"] == "messages"

    qa = result_for([f"e{i}" for i in range(4)], [True, False, True, False])
    export_subset(tmp_path / "qa", chosen(examples(QA), qa), qa)
    info = json.loads((tmp_path / "qa" / "dataset_info.json").read_text())["p2d_selected"]
    assert info["columns"] == {"prompt": "question", "response": "answer"}
    ds = yaml.safe_load((tmp_path / "qa" / "axolotl.yaml").read_text())["datasets"][0]
    assert ds["type"]["field_instruction"] == "question" and ds["type"]["field_output"] == "answer"


def test_two_conversation_sources_of_other_schemas_export_one_trl_format(tmp_path):
    """ShareGPT (conversations/from/value) and OpenAI (messages/role/content) sources: each source's rows keep
    their schema in selected/NAME.jsonl, and trl.jsonl reads each row with its own source's schema."""
    from p2d.data import iter_examples

    share = tmp_path / "share.json"
    share.write_text(json.dumps([{"conversations": [{"from": "human", "value": f"h{i}"}, {"from": "gpt", "value": f"g{i}"}]}
                                 for i in range(3)]))
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps(r) + "\n" for r in CHAT))
    ex = [e for chunk in iter_examples([str(share), str(chat)]) for e in chunk]
    assert [e.id for e in ex] == ["share/0", "share/1", "share/2", "chat/0", "chat/1", "chat/2", "chat/3"]
    res = result_for([e.id for e in ex], [True] * len(ex))
    export_subset(tmp_path / "out", ex, res, sources=["share", "chat"])
    trl = [json.loads(line) for line in (tmp_path / "out" / "trl.jsonl").read_text().splitlines()]
    assert trl[0] == {"messages": [{"role": "user", "content": "h0"}, {"role": "assistant", "content": "g0"}]}
    assert trl[3] == {"messages": CHAT[0]["messages"]}
    info = json.loads((tmp_path / "out" / "dataset_info.json").read_text())
    assert info["p2d_selected_share"]["columns"] == {"messages": "conversations"}
    assert info["p2d_selected_chat"]["columns"] == {"messages": "messages"}
    with open(tmp_path / "out" / "scores.csv", encoding="utf-8") as f:
        assert [r["source"] for r in csv.DictReader(f)] == ["share"] * 3 + ["chat"] * 4


def test_export_errors(tmp_path):
    ex = examples([{"foo": 1}, {"foo": 2}])
    with pytest.raises(P2DError, match="foo"):
        export_subset(tmp_path, ex, result_for(["e0", "e1"], [True, True]), "jsonl")
    mixed = examples([{"question": "a", "answer": [1, "x"]}])
    with pytest.raises(P2DError, match="Parquet"):
        export_subset(tmp_path, mixed, result_for(["e0"], [True]), parquet=True)
    with pytest.raises(P2DError, match="ids differ"):
        export_subset(tmp_path, ex, result_for(["e1", "e0"], [True, True]))


class Killed(Exception):
    pass


def test_resumed_mining_gives_byte_identical_selection(tmp_path, monkeypatch):
    """Kill the pool extraction after two shards, rerun on the same store: same selected.jsonl bytes."""
    import p2d.features as features

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                         num_attention_heads=8, num_key_value_heads=2, head_dim=8,
                                         vocab_size=256)).eval()
    rng = np.random.default_rng(0)
    recs, toks = [], []
    for i in range(30):
        ids = rng.integers(3, 256, int(rng.integers(4, 12))).tolist()
        recs.append({"instruction": f"task {i}", "input": "", "output": f"answer {i}"})
        toks.append(Tokenized(f"r{i:02d}", ids, [IGNORE] * 3 + ids[3:]))
    pool, target = toks[:24], toks[24:]
    ex = [Example(t.id, "p", "r", raw=r) for t, r in zip(pool, recs)]
    kw = dict(data_frac=0.3, heads=[(1, 1), (2, 4)], quality="nll", progress=False, batch_size=2)

    ref = mine(model, pool, target, **kw)
    export_subset(tmp_path / "ref", chosen(ex, ref), ref, "alpaca")

    real = features.extract_features
    def killing(*a, **k):
        if k.get("store_dir"):
            k["shard_samples"], k["on_shard"] = 4, lambda i: (_ for _ in ()).throw(Killed) if i == 1 else None
        return real(*a, **k)
    monkeypatch.setattr("p2d.mining.extract_features", killing)
    with pytest.raises(Killed):
        mine(model, pool, target, **kw, store_dir=tmp_path / "store")
    monkeypatch.setattr("p2d.mining.extract_features",
                        lambda *a, **k: real(*a, **{**k, "shard_samples": 4} if k.get("store_dir") else k))
    resumed = mine(model, pool, target, **kw, store_dir=tmp_path / "store")
    export_subset(tmp_path / "resumed", chosen(ex, resumed), resumed, "alpaca")
    for name in ("selected.jsonl", "scores.csv"):
        assert (tmp_path / "ref" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes()


def trl_one_step(model_dir, data_file, out_dir, chat_template: str | None = None) -> float:
    """One SFTTrainer step on `data_file` as TRL reads it; returns the logged training loss."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if chat_template:
        tok.chat_template = chat_template
    cfg = SFTConfig(output_dir=str(out_dir), max_steps=1, per_device_train_batch_size=2, report_to=[],
                    use_cpu=True, logging_steps=1, save_strategy="no", max_length=128)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=cfg, processing_class=tok,
                         train_dataset=load_dataset("json", data_files=str(data_file), split="train"))
    return trainer.train().training_loss


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_trl_trains_on_the_export(tmp_path, tiny_model):
    from p2d.data import to_examples

    ex = to_examples(ALPACA, "alpaca")
    pair = result_for([e.id for e in ex], [True, True, False, True, False])
    export_subset(tmp_path / "pair", chosen(ex, pair), pair)
    rows = [json.loads(l) for l in (tmp_path / "pair" / "trl.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rows[0] == {"prompt": ex[0].prompt, "completion": ex[0].response}  # the text p2d trains on
    assert math.isfinite(trl_one_step(tiny_model, tmp_path / "pair" / "trl.jsonl", tmp_path / "trl-pair"))

    sharegpt = [{"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}],
                 "system": "be brief"} for i in range(4)]
    ex = to_examples(sharegpt, "sharegpt")
    export_subset(tmp_path / "chat", ex, result_for([e.id for e in ex], [True] * 4))
    rows = [json.loads(l) for l in (tmp_path / "chat" / "trl.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rows[0] == {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q0"},
                                    {"role": "assistant", "content": "a0"}]}
    assert math.isfinite(trl_one_step(tiny_model, tmp_path / "chat" / "trl.jsonl", tmp_path / "trl-chat", CHATML))


def test_axolotl_unfrozen_rows_are_the_heads_scope_rows():
    """Read as axolotl reads them (`^name$[start:stop]`, dots literal), the patterns unfreeze exactly the
    rows p2d's heads scope trains, in q/k/v weights and biases."""
    import copy
    import re

    from transformers import Qwen2Config, Qwen2ForCausalLM

    from p2d.exports import axolotl_unfrozen
    from p2d.geometry import AttentionGeometry
    from p2d.masking import HeadDeltaLinear, apply_scope

    model = Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                         num_attention_heads=8, num_key_value_heads=2, vocab_size=128))
    heads = [(0, 1), (1, 5), (1, 6), (2, 0), (2, 7)]
    patterns = axolotl_unfrozen(model, heads)
    unfrozen: dict[str, set[int]] = {}
    for p in patterns:
        base, a, b = re.match(r"^(.+)\[([0-9]+):([0-9]+)\]$", p).groups()
        regex = re.compile(re.sub(r"\.(?!\+)", r"\\.", base))
        for name, _ in model.named_parameters():
            if regex.match(name):
                unfrozen.setdefault(name, set()).update(range(int(a), int(b)))
    scoped = copy.deepcopy(model)
    apply_scope(scoped, AttentionGeometry.from_config(model.config), "heads", heads)
    want = {}
    for name, m in scoped.named_modules():
        if isinstance(m, HeadDeltaLinear):
            for param in ("weight", "bias"):
                want[f"{name}.{param}"] = set(m.index.tolist())
    assert unfrozen == want
