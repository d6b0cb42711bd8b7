"""Prompt templates: chat conversations train every assistant turn, `auto` follows the tokenizer, and a
trained model is served (its tokenizer's chat template) in exactly the format it was trained in."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from conftest import make_tokenizer, save_tiny
from p2d import P2DError
from p2d.cli.main import main
from p2d.data import text_chat_template, to_examples
from p2d.tokens import IGNORE, Example, prompt_text, resolve_template, tokenize

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CONVERSATION = {"id": "c1", "conversations": [
    {"from": "system", "value": "Answer briefly."},
    {"from": "human", "value": "Add 2 and 3."}, {"from": "gpt", "value": "5"},
    {"from": "human", "value": "Now double it."}, {"from": "gpt", "value": "10"},
    {"from": "human", "value": "Thanks"}]}  # a trailing user turn has nothing to train


def chat_tokenizer(template: str = CHATML):
    tok = make_tokenizer()
    tok.chat_template = template
    return tok


def trained_texts(t, tok) -> list[str]:
    """The labelled spans of a tokenized sample, decoded run by run."""
    runs, cur = [], []
    for i, lab in zip(t.input_ids, t.labels):
        if lab != IGNORE:
            cur.append(i)
        elif cur:
            runs, cur = runs + [cur], []
    return [tok.decode(r) for r in runs + ([cur] if cur else [])]


def test_sharegpt_conversation_keeps_roles_and_system_turn():
    ex = to_examples([CONVERSATION], "conv.jsonl")[0]
    assert ex.messages == (("system", "Answer briefly."), ("user", "Add 2 and 3."), ("assistant", "5"),
                           ("user", "Now double it."), ("assistant", "10"))
    assert ex.response == "10" and "Now double it." in ex.prompt  # the text form: last turn only, as before


def test_chat_template_trains_every_assistant_turn_and_only_those():
    tok = chat_tokenizer()
    t = tokenize(to_examples([CONVERSATION], "conv.jsonl"), tok, 512, "chat")[0]
    assert trained_texts(t, tok) == ["5<|im_end|>\n", "10<|im_end|>\n"]
    assert tok.decode(t.input_ids).startswith("<|im_start|>system\nAnswer briefly.<|im_end|>")


def test_template_that_rewrites_earlier_turns_trains_the_last_turn():
    """A template that hides past answers (as some reasoning templates do) breaks the prefix property."""
    hiding = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
              "{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    tok = chat_tokenizer(hiding)
    t = tokenize(to_examples([CONVERSATION], "conv.jsonl"), tok, 512, "chat")[0]
    assert trained_texts(t, tok) == ["10\n"]


def test_auto_follows_the_tokenizer_and_chat_needs_a_template():
    assert resolve_template("auto", make_tokenizer()) == "alpaca"
    assert resolve_template("auto", chat_tokenizer()) == "chat"
    assert resolve_template("plain", chat_tokenizer()) == "plain"
    with pytest.raises(P2DError, match="no chat template"):
        resolve_template("chat", make_tokenizer())
    with pytest.raises(P2DError, match="--template must be one of"):
        resolve_template("chatml", make_tokenizer())


def test_truncation_keeps_the_cue_and_some_answer():
    tok = chat_tokenizer()
    ex = to_examples([{"instruction": "word " * 200, "output": "yes " * 50}], "long.jsonl")
    t = tokenize(ex, tok, 64, "chat")[0]
    assert len(t) == 64 and sum(x != IGNORE for x in t.labels) > 0
    assert "<|im_start|>assistant\n" in tok.decode(t.input_ids)


def test_generation_prompt_ends_with_the_assistant_cue():
    tok = chat_tokenizer()
    ex = to_examples([{"instruction": "Say hi.", "output": "hi"}], "x.jsonl")[0]
    assert prompt_text(ex, tok, "chat") == "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n"
    assert prompt_text(ex, tok, "alpaca") == ex.prompt


@pytest.mark.parametrize("template", ["alpaca", "plain"])
def test_text_chat_template_renders_the_training_tokens(template):
    """Serving through the chat API (vLLM, pipelines) shows the model the tokens it was trained on."""
    tok = make_tokenizer()
    examples = to_examples([{"instruction": "Add 2 and 3.", "input": "", "output": "5"}], "x.jsonl",
                           template=template)
    trained = tokenize(examples, tok, 512, template)[0]
    tok.chat_template = text_chat_template(tok, template)
    served = tok.apply_chat_template([{"role": "user", "content": "Add 2 and 3."},
                                      {"role": "assistant", "content": "5"}], tokenize=True, return_dict=True)
    assert list(served["input_ids"]) == trained.input_ids


def p2d(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    path = save_tiny(tmp_path_factory.mktemp("chat") / "model")
    cfg = path / "tokenizer_config.json"
    cfg.write_text(json.dumps(json.loads(cfg.read_text()) | {"chat_template": CHATML}))
    (path / "chat_template.jinja").write_text(CHATML)
    return path


@pytest.mark.parametrize("template", ["auto", "alpaca"])
def test_trained_model_carries_the_template_it_was_trained_with(chat_model, tmp_path, template):
    from transformers import AutoTokenizer

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                                     {"role": "assistant", "content": f"a{i}"}]}) + "\n"
                            for i in range(6)))
    p2d("train", "--model", chat_model, "--data", data, "--scope", "full", "--max-steps", 1, "--template", template,
        "--out", tmp_path / "o")
    summary = json.loads((tmp_path / "o" / "train.json").read_text())
    assert summary["template"] == ("chat" if template == "auto" else "alpaca")
    served = AutoTokenizer.from_pretrained(tmp_path / "o" / "model")
    msgs = [{"role": "user", "content": "q0"}]
    rendered = served.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ex = Example("0", to_examples([{"instruction": "q0", "output": "a0"}], "x")[0].prompt, "a0",
                 messages=(("user", "q0"), ("assistant", "a0")))
    expected = prompt_text(ex, chat_tokenizer(), "chat") if template == "auto" else ex.prompt
    assert rendered == expected
    card = (tmp_path / "o" / "model" / "README.md").read_text()
    assert ("chat template" in card) if template == "auto" else ("Alpaca" in card)


def test_a_conversation_that_opens_with_the_assistant_trains_the_later_turns():
    tok = chat_tokenizer()
    opener = {"messages": [{"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "Add 2 and 3."},
                           {"role": "assistant", "content": "5"}]}
    t = tokenize(to_examples([opener], "x.jsonl"), tok, 512, "chat")[0]
    assert trained_texts(t, tok) == ["5<|im_end|>\n"]


def test_generation_stops_at_the_templates_end_of_turn():
    """A model trained under ChatML ends its answer with <|im_end|>, which need not be the tokenizer's EOS."""
    from p2d.tokens import end_of_turn_ids

    tok = chat_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    assert tok.convert_tokens_to_ids("<|im_end|>") in end_of_turn_ids(tok)
    assert tok.eos_token_id in end_of_turn_ids(tok)


def test_nothing_to_tokenize_is_no_error():
    assert tokenize([], chat_tokenizer(), 64, "chat") == [] and tokenize([], make_tokenizer(), 64) == []
