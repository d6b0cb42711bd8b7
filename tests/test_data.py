"""p2d.data: every supported format and schema, error locations, templates, response-only labels."""

import gzip
import json

import datasets
import pytest

from p2d.data import (DataError, FieldMap, detect_fields, format_prompt, load_examples, load_records, parse_fields,
                      to_examples)
from p2d.tokens import IGNORE, tokenize

ROWS = [{"instruction": "Add the numbers.", "input": "2 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "hi"}]
ALPACA_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nAdd the numbers.\n\n### Input:\n2 3\n\n### Response:\n")
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nSay hi.\n\n### Response:\n")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("P2D_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def test_alpaca_template_exact_text():
    assert format_prompt("Add the numbers.", "2 3") == ALPACA_INPUT
    assert format_prompt("Say hi.", "") == ALPACA_NO_INPUT
    assert format_prompt("Say hi.", "x", template="plain") == "Say hi.\nx\n"
    with pytest.raises(DataError, match="unknown template"):
        format_prompt("a", "", template="chatml")


@pytest.mark.parametrize("fmt", ["json", "json-data", "jsonl", "json.gz", "jsonl.gz", "parquet", "csv", "disk", "dict"])
def test_formats(tmp_path, fmt):
    if fmt == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(ROWS))
    elif fmt == "json-data":
        path = tmp_path / "d.json"
        path.write_text(json.dumps({"data": ROWS}))
    elif fmt == "jsonl":
        path = tmp_path / "d.jsonl"
        write_jsonl(path, ROWS)
    elif fmt in ("json.gz", "jsonl.gz"):
        path = tmp_path / f"d.{fmt}"
        text = json.dumps(ROWS) if fmt == "json.gz" else "".join(json.dumps(r) + "\n" for r in ROWS)
        path.write_bytes(gzip.compress(text.encode()))
    elif fmt == "parquet":
        path = tmp_path / "d.parquet"
        datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    elif fmt == "csv":
        path = tmp_path / "d.csv"
        datasets.Dataset.from_list(ROWS).to_csv(str(path), index=False)
    elif fmt == "disk":
        path = tmp_path / "d"
        datasets.Dataset.from_list(ROWS).save_to_disk(str(path))
    else:
        path = tmp_path / "dd"
        datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(path))
    examples = load_examples(str(path), domain="x")
    assert [e.prompt for e in examples] == [ALPACA_INPUT, ALPACA_NO_INPUT]
    assert [e.response for e in examples] == ["5", "hi"]
    assert [e.id for e in examples] == ["0", "1"] and examples[0].domain == "x"
    assert examples[0].raw["instruction"] == "Add the numbers."


@pytest.mark.parametrize("record, expected", [
    ({"instruction": "i", "input": "x", "output": "o"}, FieldMap("instruction", "input", "output")),
    ({"instruction": "i", "input": "x", "response": "o"}, FieldMap("instruction", "input", "response")),
    ({"instruction": "i", "output": "o"}, FieldMap("instruction", None, "output")),
    ({"question": "i", "answer": "o"}, FieldMap("question", None, "answer")),
    ({"prompt": "i", "response": "o"}, FieldMap("prompt", None, "response")),
    ({"prompt": "i", "completion": "o"}, FieldMap("prompt", None, "completion")),
    ({"query": "i", "response": "o"}, FieldMap("query", None, "response")),
    ({"messages": []}, FieldMap(messages="messages")),
    ({"conversations": []}, FieldMap(messages="conversations")),
])
def test_detect_fields(record, expected):
    assert detect_fields(record, "f.json") == expected


def test_unknown_schema_names_file_and_fields():
    with pytest.raises(DataError, match=r"f\.json.*\['a', 'b'\]"):
        detect_fields({"a": 1, "b": 2}, "f.json")


def test_messages(tmp_path):
    rows = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                      {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4"}]},
        {"messages": [{"role": "user", "content": "Name a color."}, {"role": "assistant", "content": "Red."}]},
    ]
    examples = load_examples(write_jsonl(tmp_path / "m.jsonl", rows))
    assert examples[0].response == "4"
    assert "### Instruction:\n2+2?" in examples[0].prompt
    assert "system: Be brief.\n\nuser: Hi?\n\nassistant: Hello." in examples[0].prompt
    assert examples[1].prompt == format_prompt("Name a color.") and examples[1].response == "Red."
    sharegpt = [{"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}]
    (ex,) = load_examples(write_jsonl(tmp_path / "s.jsonl", sharegpt))
    assert (ex.prompt, ex.response) == (format_prompt("Q"), "A")
    no_answer = [{"messages": [{"role": "user", "content": "Q"}]}]
    with pytest.raises(DataError, match=r"n\.jsonl:1: field 'messages' has no assistant turn"):
        load_examples(write_jsonl(tmp_path / "n.jsonl", no_answer))


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n{not json\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:3: invalid JSON"):
        load_records(str(path))
    path.write_text(json.dumps(ROWS[0]) + "\n[1, 2]\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: expected a JSON object"):
        load_records(str(path))


def test_missing_field_names_field_and_record(tmp_path):
    rows = [ROWS[0], {"instruction": "x"}]
    with pytest.raises(DataError, match=r"m\.jsonl:2: missing field 'output'"):
        load_examples(write_jsonl(tmp_path / "m.jsonl", rows))
    (tmp_path / "m.json").write_text(json.dumps([ROWS[0], {"instruction": 3, "output": "y"}]))
    with pytest.raises(DataError, match=r"m\.json: record\[1\]: field 'instruction' must be a string"):
        load_examples(str(tmp_path / "m.json"))
    (tmp_path / "m.csv").write_text("instruction,output\nx,y\n,z\n")  # empty cell: None in the CSV reader
    with pytest.raises(DataError, match=r"m\.csv:3: field 'instruction' must be a string"):
        load_examples(str(tmp_path / "m.csv"))


def test_empty_responses_are_skipped(tmp_path, caplog):
    rows = [ROWS[0], {"instruction": "x", "input": "", "output": " "}]
    examples = load_examples(write_jsonl(tmp_path / "e.jsonl", rows))
    assert [e.id for e in examples] == ["0"] and "e.jsonl:2" in caplog.text


@pytest.mark.parametrize("name, content", [("e.jsonl", ""), ("e.json", ""), ("e.json", "[]"), ("e.csv", "")])
def test_empty_file_names_file(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=rf"{name}"):
        load_records(str(tmp_path / name))


def test_explicit_field_map(tmp_path):
    rows = [{"q": "Question?", "ctx": "c", "a": "Answer.", "answer": "ignored"}]
    path = write_jsonl(tmp_path / "f.jsonl", rows)
    for fields in ("instruction=q,input=ctx,output=a", {"instruction": "q", "input": "ctx", "output": "a"}):
        (ex,) = load_examples(path, fields=fields)
        assert (ex.prompt, ex.response) == (format_prompt("Question?", "c"), "Answer.")
    with pytest.raises(DataError, match="unknown key"):
        parse_fields("question=q,output=a")
    with pytest.raises(DataError, match="f.jsonl:1: missing field 'nope'"):
        load_examples(path, fields="instruction=q,output=nope")


def test_ids_domain_limit_and_duplicates(tmp_path):
    rows = [dict(ROWS[0], id=7, domain="math"), dict(ROWS[1], id="b")]
    examples = load_examples(write_jsonl(tmp_path / "i.jsonl", rows), domain="code", limit=1)
    assert [(e.id, e.domain) for e in examples] == [("7", "math")]
    assert load_examples(str(tmp_path / "i.jsonl"), domain="code")[1].domain == "code"
    with pytest.raises(DataError, match=r"d\.jsonl:2: duplicate id '7'"):
        load_examples(write_jsonl(tmp_path / "d.jsonl", [rows[0], dict(ROWS[1], id="7")]))


def test_gsm8k_answer_kept_verbatim(tmp_path):
    answer = "She has 3*4=<<3*4=12>>12 apples.\n#### 12"
    (ex,) = load_examples(write_jsonl(tmp_path / "g.jsonl", [{"question": "How many?", "answer": answer}]))
    assert ex.response == answer


def test_missing_path_and_offline_hub(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_records(str(tmp_path / "nope.json"))
    with pytest.raises(DataError, match="offline.*local file"):
        load_records("someone/some-dataset:train")
    with pytest.raises(DataError, match="unknown embedded source"):
        load_records("p2d:nothing")


def test_labels_only_on_response_tokens():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(" ".join([ALPACA_INPUT, "5"]).replace("#", " # ").replace(":", " : ").split()))
    vocab = {w: i for i, w in enumerate(["[UNK]", "</s>", "#", ":"] + [w for w in words if w not in "#:"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", unk_token="[UNK]")
    (t,) = tokenize(to_examples([ROWS[0]], "rows"), tok, max_length=512)
    n_prompt = len(tok(ALPACA_INPUT)["input_ids"])
    assert t.labels[:n_prompt] == [IGNORE] * n_prompt
    assert t.labels[n_prompt:] == [vocab["5"], vocab["</s>"]]



def test_chunked_reading_is_the_whole_file_read(tmp_path):
    """A pool read in chunks (million-row pools) gives the examples, tokens and errors of a whole read."""
    from conftest import make_tokenizer

    from p2d.data import iter_examples, load_examples, load_tokens
    from p2d.tokens import PackedTokens

    rows = [{"instruction": f"task {i}", "input": "x" if i % 3 else "", "output": f"answer {i}"} for i in range(50)]
    rows[7]["output"] = ""  # skipped, and still counted for the default ids of later rows
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    whole = load_examples(str(path))
    chunked = [e for chunk in iter_examples(str(path), chunk_rows=8) for e in chunk]
    assert [(e.id, e.prompt, e.response, e.messages) for e in chunked] == \
           [(e.id, e.prompt, e.response, e.messages) for e in whole]
    tok = make_tokenizer()
    packed = load_tokens(str(path), tok, 24)
    assert isinstance(packed, PackedTokens) and list(packed) == tokenize(whole, tok, 24)

    rows[40]["id"] = "3"  # a duplicate in a later chunk still names both lines
    rows[3]["id"] = "3"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"pool.jsonl:41: duplicate id '3' \(also .*pool.jsonl:4\)"):
        list(iter_examples(str(path), chunk_rows=8))


def test_mining_window_reads_the_prompt_and_the_first_response_tokens():
    from conftest import make_tokenizer

    tok = make_tokenizer()
    ex = to_examples([{"instruction": "Sort these words alphabetically", "output": "apple fig pear " * 10}], "w")
    (full,) = tokenize(ex, tok, 512)
    (short,) = tokenize(ex, tok, 512, window=4)
    first = next(j for j, x in enumerate(full.labels) if x != IGNORE)
    assert short.input_ids == full.input_ids[: first + 4]  # the whole prompt, then 4 answer tokens
    assert sum(x != IGNORE for x in short.labels) == 4


def test_source_names_are_unique_and_keep_id_less_rows_apart(tmp_path):
    from p2d.data import iter_examples, source_names

    assert source_names(["x/a.jsonl", "a-2.jsonl", "y/a.json", "p2d:default"]) == ["a", "a-2", "a-3", "default"]
    for name in ("a.jsonl", "b.jsonl"):
        (tmp_path / name).write_text(json.dumps({"instruction": "i", "output": "o"}) + "\n")
    ids = [e.id for chunk in iter_examples([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]) for e in chunk]
    assert ids == ["a/0", "b/0"]
