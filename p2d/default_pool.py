"""The embedded default pool: mixed instruction data that p2d builds itself, offline.

So that `p2d run` works on a fresh machine with no data argument, the pool is made from what
every Python installation has: standard-library functions (code), generated GSM8K-style word
problems (math), and exactly-checkable text tasks over stdlib prose (general). Everything is built
once, deduplicated by content, shuffled with seeded generators, and a held-out seed (target) set
is carved off each domain before the pool takes the rest, so seeds and pool never overlap.
The result is deterministic for a given Python version (the stdlib is the input).
"""

from __future__ import annotations

import ast
import codecs
import contextlib
import datetime
import functools
import importlib
import inspect
import io
import pkgutil
import random
import re
import string
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Callable

from p2d import P2DError
from p2d.io import write_jsonl
from p2d.models import cache_dir

DOMAINS = ("code", "math", "general")
POOL_PER_DOMAIN = 1200
SEED_RESERVE = 200  # carved off each domain first, so any build_seeds(n <= 200) is disjoint from the pool
VERSION = "v1"

# Modules that are tests, GUIs, installers, data, or that act on import (antigravity opens a browser).
_SKIP_MODULES = {
    "antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "lib2to3", "ensurepip", "test",
    "distutils", "encodings", "pydoc_data", "msilib", "venv", "unittest", "doctest", "pdb", "site",
}
_MAX_SOURCE_LINES = 40
# Leading docstring verbs turned into third person ("Return x." -> "that returns x.").
_VERBS = {
    "add", "append", "apply", "build", "calculate", "call", "check", "clear", "close", "compare", "compile",
    "compute", "construct", "convert", "copy", "create", "decode", "delete", "determine", "encode", "ensure",
    "escape", "evaluate", "execute", "expand", "extract", "fetch", "fill", "filter", "find", "format",
    "generate", "get", "guess", "handle", "initialize", "insert", "install", "iterate", "join", "list", "load",
    "look", "make", "map", "mark", "merge", "normalize", "open", "pack", "parse", "print", "process",
    "produce", "put", "quote", "raise", "read", "register", "remove", "render", "replace", "reset",
    "resolve", "return", "run", "save", "search", "send", "set", "sort", "split", "start", "stop", "strip",
    "test", "translate", "try", "unpack", "unquote", "update", "validate", "wait", "walk", "wrap", "write",
    "yield",
}


def _third_person(verb: str) -> str:
    if verb.endswith("y") and verb[-2:-1] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + ("es" if verb.endswith(("s", "sh", "ch", "x", "z", "o")) else "s")


def _quiet_import(name: str):
    """Import a stdlib module, silencing prints and deprecation warnings; None if unavailable."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except Exception:  # platform-specific or broken optional modules: just not part of the pool
            return None


def _stdlib_modules() -> list:
    modules = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in _SKIP_MODULES or (module := _quiet_import(name)) is None:
            continue
        modules.append(module)
        for info in sorted(pkgutil.iter_modules(getattr(module, "__path__", [])), key=lambda i: i.name):
            if not info.name.startswith("_") and "test" not in info.name:
                if (sub := _quiet_import(f"{name}.{info.name}")) is not None:
                    modules.append(sub)
    return modules


def _functions(module) -> list[tuple[str | None, Callable]]:
    """Public functions defined in `module`, and public methods of its public classes.

    Only what the module itself defines: installed packages patch stdlib classes (transformers adds
    `logging.Logger.warning_advice`), which would make the pool depend on what was imported first.
    """
    out: list[tuple[str | None, Callable]] = []
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj):
            out.append((None, obj))
        elif inspect.isclass(obj):
            out += [(name, m) for n, m in sorted(vars(obj).items()) if not n.startswith("_") and inspect.isfunction(m)
                    and m.__qualname__ == f"{name}.{n}" and m.__module__ == module.__name__]  # not patched in
    return out


def _code_instruction(owner: str | None, node: ast.FunctionDef, doc: str) -> str:
    summary = " ".join(doc.split("\n\n")[0].split())
    what = f"Python function `{node.name}({ast.unparse(node.args)})`"
    if owner:
        what = f"Python method `{node.name}({ast.unparse(node.args)})` of a class `{owner}`"
    first, _, rest = summary.partition(" ")
    if first.lower() in _VERBS and rest:  # "Read and return x." -> "that reads and returns x."
        rest = re.sub(r"\b(and|or) ([a-z]+)\b",
                      lambda m: f"{m[1]} {_third_person(m[2]) if m[2] in _VERBS else m[2]}", rest)
        return f"Write a {what} that {_third_person(first.lower())} {rest}"
    return f"Write a {what} matching this description: {summary}"


def _code_records() -> list[dict]:
    records, seen = [], set()
    for module in _stdlib_modules():
        for owner, fn in _functions(module):
            try:
                source = textwrap.dedent(inspect.getsource(fn))
                node = ast.parse(source).body[0]
            except (OSError, TypeError, SyntaxError, IndexError):
                continue
            if not isinstance(node, ast.FunctionDef) or source.count("\n") > _MAX_SOURCE_LINES or source in seen:
                continue
            doc = ast.get_docstring(node)  # its own docstring: inspect.getdoc would inherit a base class's
            if not doc or len(doc.split("\n\n")[0].split()) < 3:
                continue
            seen.add(source)
            records.append({"instruction": _code_instruction(owner, node, doc), "input": "", "output": source})
    return records


# ---------------------------------------------------------------- math: GSM8K-style word problems
_NAMES = ["Ava", "Ben", "Carla", "Dev", "Elena", "Farid", "Grace", "Hiro", "Isla", "Jamal", "Kira", "Liam",
          "Maya", "Noah", "Olivia", "Pedro", "Quinn", "Rosa", "Sam", "Tara", "Umar", "Vera", "Wes", "Yuki", "Zoe"]
_ITEMS = [("apple", 1, 3), ("notebook", 2, 6), ("pencil", 1, 2), ("sandwich", 4, 9), ("book", 8, 20),
          ("T-shirt", 7, 15), ("cupcake", 2, 5), ("toy car", 3, 11), ("plant", 5, 14), ("ticket", 6, 25)]


def _calc(expr: str) -> int:
    """Evaluate one generated arithmetic step ("3*4" in "<<3*4=12>>"), insisting on a whole result."""
    value = eval(expr, {"__builtins__": {}})  # noqa: S307 - only our own generated arithmetic
    if value != int(value):
        raise ValueError(f"{expr} is not a whole number")
    return int(value)


def _step(text: str, expr: str) -> tuple[str, int]:
    value = _calc(expr)
    return text.format(f"{expr} = <<{expr}={value}>>{value}"), value


def _shopping(r: random.Random) -> tuple[str, list[str], int]:
    name = r.choice(_NAMES)
    (i1, lo1, hi1), (i2, lo2, hi2) = r.sample(_ITEMS, 2)
    a, b, p, q = r.randint(2, 9), r.randint(2, 9), r.randint(lo1, hi1), r.randint(lo2, hi2)
    s1, c1 = _step(f"The {i1}s cost {{}} dollars.", f"{a}*{p}")
    s2, c2 = _step(f"The {i2}s cost {{}} dollars.", f"{b}*{q}")
    s3, total = _step("Altogether that is {} dollars.", f"{c1}+{c2}")
    bill = next(x for x in (20, 50, 100, 200, 500) if x >= total)
    s4, change = _step("The change is {} dollars.", f"{bill}-{total}")
    question = (f"{name} buys {a} {i1}s for ${p} each and {b} {i2}s for ${q} each. "
                f"{name} pays with a ${bill} bill. How much change does {name} get back?")
    return question, [s1, s2, s3, s4], change


def _rates(r: random.Random) -> tuple[str, list[str], int]:
    name, speed, hours, days = r.choice(_NAMES), r.randint(12, 60), r.randint(2, 6), r.randint(3, 14)
    rest = r.randint(1, days // 2)
    s1, per_day = _step("Each day the pages read are {}.", f"{speed}*{hours}")
    s2, work_days = _step("The number of reading days is {}.", f"{days}-{rest}")
    s3, total = _step("In total that is {} pages.", f"{per_day}*{work_days}")
    question = (f"{name} reads {speed} pages per hour and reads for {hours} hours a day. Over the next {days} days, "
                f"{name} takes {rest} days off. How many pages does {name} read in those {days} days?")
    return question, [s1, s2, s3], total


def _ages(r: random.Random) -> tuple[str, list[str], int]:
    a, b = r.sample(_NAMES, 2)
    k, young, years = r.randint(2, 5), r.randint(3, 15), r.randint(2, 10)
    s1, b_now = _step(f"{b} is {{}} years old now.", f"{young + years}-{years}")
    s2, a_now = _step(f"{a} is {{}} years old now.", f"{k}*{b_now}")
    s3, a_later = _step(f"In {years} years {a} will be {{}} years old.", f"{a_now}+{years}")
    question = (f"{a} is {k} times as old as {b}. In {years} years, {b} will be {young + years} years old. "
                f"How old will {a} be in {years} years?")
    return question, [s1, s2, s3], a_later


def _fractions(r: random.Random) -> tuple[str, list[str], int]:
    name, thing = r.choice(_NAMES), r.choice(["marbles", "stickers", "stamps", "baseball cards", "seashells"])
    d, pct = r.choice([2, 3, 4, 5]), r.choice([10, 20, 25, 50])
    total = d * (100 // pct) * r.randint(1, 8)  # both the fraction and the percentage come out whole
    s1, given = _step(f"{name} gives away {{}} {thing} to the brother.", f"{total}/{d}")
    s2, rest = _step("That leaves {}.", f"{total}-{given}")
    s3, friend = _step(f"The friend gets {{}} {thing}.", f"{rest}*{pct}/100")
    s4, left = _step(f"{name} has {{}} {thing} left.", f"{rest}-{friend}")
    question = (f"{name} has {total} {thing}. {name} gives 1/{d} of them to a brother and then {pct}% of the "
                f"remaining {thing} to a friend. How many {thing} does {name} have left?")
    return question, [s1, s2, s3, s4], left


def _bakery(r: random.Random) -> tuple[str, list[str], int]:
    batches, per, box = r.randint(3, 12), r.choice([12, 18, 24, 30, 36]), r.choice([2, 3, 6])
    morning = batches * per - 2 * box * r.randint(1, (batches * per - 1) // (2 * box))  # leftovers fill whole boxes
    s1, made = _step("The bakery makes {} cookies.", f"{batches}*{per}")
    s2, rest = _step("After the morning, {} cookies remain.", f"{made}-{morning}")
    s3, afternoon = _step("In the afternoon it sells {} cookies.", f"{rest}/2")
    s4, left = _step("That leaves {} cookies.", f"{rest}-{afternoon}")
    s5, boxes = _step("The leftover cookies fill {} boxes.", f"{left}/{box}")
    question = (f"A bakery makes {batches} batches of {per} cookies. It sells {morning} cookies in the morning and half "
                f"of the remaining cookies in the afternoon. The leftover cookies are packed {box} to a box. "
                f"How many boxes does the bakery fill?")
    return question, [s1, s2, s3, s4, s5], boxes


def _savings(r: random.Random) -> tuple[str, list[str], int]:
    name, wage, hours, weeks = r.choice(_NAMES), r.randint(9, 25), r.randint(5, 20), r.randint(2, 8)
    earned = wage * hours * weeks
    bike = r.randint(earned // 4, earned // 2)
    s1, weekly = _step(f"Each week {name} earns {{}} dollars.", f"{wage}*{hours}")
    s2, earned = _step(f"After {weeks} weeks {name} has {{}} dollars.", f"{weekly}*{weeks}")
    s3, left = _step(f"After buying the bike, {name} has {{}} dollars.", f"{earned}-{bike}")
    question = (f"{name} earns ${wage} an hour and works {hours} hours a week. After {weeks} weeks, {name} buys a bike "
                f"for ${bike}. How much money does {name} have left?")
    return question, [s1, s2, s3], left


def _groups(r: random.Random) -> tuple[str, list[str], int]:
    size, groups, markers = r.randint(3, 6), r.randint(4, 12), r.randint(2, 5)
    box = r.choice([b for b in (2, 3, 4, 5, 6, 8, 10) if groups * markers % b == 0])
    s1, groups = _step("There are {} groups.", f"{size * groups}/{size}")
    s2, needed = _step("They need {} markers.", f"{groups}*{markers}")
    s3, boxes = _step("That is {} boxes.", f"{needed}/{box}")
    question = (f"A teacher splits {size * groups} students into groups of {size}. Each group needs {markers} markers, "
                f"and markers come in boxes of {box}. How many boxes must the teacher buy?")
    return question, [s1, s2, s3], boxes


_MATH_TEMPLATES = (_shopping, _rates, _ages, _fractions, _bakery, _savings, _groups)


def _math_records(n: int) -> list[dict]:
    r, records, seen = random.Random("p2d-math"), [], set()
    while len(records) < n:
        question, steps, answer = r.choice(_MATH_TEMPLATES)(r)
        if question not in seen:
            seen.add(question)
            records.append({"instruction": question, "input": "", "output": "\n".join(steps) + f"\n#### {answer}"})
    return records


# ---------------------------------------------------------------- general: checkable text tasks
_WORD = re.compile(r"^[A-Za-z][A-Za-z'-]*[,;:.!?]?$")
_UNITS = [("kilometers", "meters", 1000), ("meters", "centimeters", 100), ("hours", "minutes", 60),
          ("minutes", "seconds", 60), ("days", "hours", 24), ("weeks", "days", 7), ("kilograms", "grams", 1000),
          ("liters", "milliliters", 1000), ("feet", "inches", 12), ("yards", "feet", 3), ("gallons", "quarts", 4)]


def _sentences(code: list[dict]) -> list[str]:
    """Plain-prose sentences (no code, 6-20 words) from the language reference, docstrings and the Zen."""
    from pydoc_data.topics import topics

    zen = codecs.decode(_quiet_import("this").s, "rot13").splitlines()[2:]  # `this` prints the Zen on import
    text = " ".join(topics[k] for k in sorted(topics)) + " " + " ".join(r["instruction"] for r in code)
    found = re.findall(r"(?<![\w.])[A-Z][a-z]+[^.!?`]*[.!?](?=\s|$)", " ".join(text.split())) + zen
    return sorted({s for s in found if 6 <= len(s.split()) <= 20 and all(_WORD.match(w) for w in s.split())})


def _words(sentence: str) -> list[str]:
    return re.findall(r"[A-Za-z][A-Za-z'-]*", sentence)


_TEXT_TASKS: list[tuple[list[str], Callable[[str], str]]] = [
    (["Sort the words of the following sentence alphabetically, ignoring case and punctuation.",
      "List the words in this sentence in alphabetical order (case-insensitive, without punctuation)."],
     lambda s: " ".join(sorted(_words(s), key=str.lower))),
    (["How many words are in the following sentence?", "Count the words in this sentence."],
     lambda s: str(len(s.split()))),
    (["Reverse the order of the words in the following sentence.",
      "Rewrite this sentence with its words in reverse order."],
     lambda s: " ".join(reversed(s.split()))),
    (["Convert the following sentence to title case.", "Capitalize the first letter of every word in this text."],
     string.capwords),
    (["What is the longest word in the following sentence? If several are equally long, give the first.",
      "Find the longest word in this sentence (the first one in case of a tie)."],
     lambda s: max(_words(s), key=len)),
    (["Rewrite the following text in capital letters.", "Convert this sentence to upper case."], str.upper),
    (["Form an acronym from the first letter of each word in the following sentence.",
      "Write the first letters of the words in this sentence as one upper-case string."],
     lambda s: "".join(w[0].upper() for w in _words(s))),
    (["How many vowels (a, e, i, o, u) does the following sentence contain?",
      "Count the vowels in this sentence, ignoring case."],
     lambda s: str(sum(c in "aeiou" for c in s.lower()))),
]


def _date_task(r: random.Random) -> tuple[str, str]:
    day = datetime.date(1950, 1, 1) + datetime.timedelta(days=r.randrange(365 * 100))
    if r.random() < 0.5:
        when = f"{day:%B} {day.day}, {day.year}"
        return r.choice([f"What day of the week was {when}?", f"On which weekday did {when} fall?"]), f"{day:%A}"
    other = day + datetime.timedelta(days=r.randint(1, 400))
    return (f"How many days are there from {day:%B} {day.day}, {day.year} to {other:%B} {other.day}, {other.year}?",
            str((other - day).days))


def _unit_task(r: random.Random) -> tuple[str, str]:
    src, dst, factor = r.choice(_UNITS)
    n = r.randint(2, 250)
    return (r.choice([f"Convert {n} {src} to {dst}.", f"How many {dst} are in {n} {src}?"]),
            f"{n} {src} is {n * factor} {dst}.")


def _general_records(n: int, sentences: list[str]) -> list[dict]:
    r, records, seen = random.Random("p2d-general"), [], set()
    while len(records) < n:
        kind = r.random()
        if kind < 0.15:
            (instruction, output), text = (_date_task(r) if kind < 0.08 else _unit_task(r)), ""
        else:
            text = r.choice(sentences)
            prompts, solve = r.choice(_TEXT_TASKS)
            instruction, output = r.choice(prompts), solve(text)
        if (instruction, text) not in seen:
            seen.add((instruction, text))
            records.append({"instruction": instruction, "input": text, "output": output})
    return records


@functools.lru_cache(maxsize=1)
def _build() -> tuple[tuple[dict, ...], dict[str, tuple[dict, ...]]]:
    code = _code_records()
    wanted = POOL_PER_DOMAIN + SEED_RESERVE
    by_domain = {"code": code, "math": _math_records(wanted), "general": _general_records(wanted, _sentences(code))}
    pool: list[dict] = []
    seeds: dict[str, tuple[dict, ...]] = {}
    for domain in DOMAINS:
        rows = by_domain[domain]
        random.Random(f"p2d-split-{domain}").shuffle(rows)
        seeds[domain] = tuple({"id": f"seed-{domain}-{i:04d}", "domain": domain, **row}
                              for i, row in enumerate(rows[:SEED_RESERVE]))
        pool += [{"id": f"{domain}-{i:05d}", "domain": domain, **row}
                 for i, row in enumerate(rows[SEED_RESERVE:wanted])]
    return tuple(pool), seeds


def build_pool() -> list[dict]:
    """The default pool: ~1,200 records per domain, each {id, domain, instruction, input, output}."""
    return [dict(r) for r in _build()[0]]


def build_seeds(domain: str, n: int = 64) -> list[dict]:
    """A held-out target set for `domain`, disjoint from the pool by id and by content."""
    if domain not in DOMAINS:
        raise P2DError(f"no embedded seed set for domain {domain!r}; available: {', '.join(DOMAINS)}")
    if not 0 < n <= SEED_RESERVE:
        raise P2DError(f"seed set size must be between 1 and {SEED_RESERVE}, got {n}")
    return [dict(r) for r in _build()[1][domain][:n]]


def pool_path() -> Path:
    """The pool as JSONL in the cache, written once (atomically) per Python version and reused."""
    path = cache_dir() / "data" / f"default-pool-{VERSION}-py{sys.version_info.major}.{sys.version_info.minor}.jsonl"
    if not path.is_file():
        write_jsonl(path, build_pool())
    return path
