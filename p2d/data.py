"""Read instruction data in any common schema and turn it into prompt/response Examples.

Users bring Alpaca, GSM8K, prompt/completion or chat-message files in JSON, JSONL, Parquet, CSV or
`save_to_disk` form; everything downstream sees one `Example` type. Each record is kept unchanged
in `Example.raw` so exports write the user's own rows back. Errors name the file, the line (or
record) and the field, because a bad row in a 50k-row file is otherwise hard to find.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from p2d import P2DError
from p2d.tokens import Example, PackedTokens, tokenize


log = logging.getLogger(__name__)


Sources = str | Sequence[str]  # one data source, or several read as one pool


class DataError(P2DError):
    """Unreadable data or a record that does not fit the schema; the message says where."""


TEMPLATES = {
    "alpaca": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n",
    ),
    "plain": ("{instruction}\n{input}\n", "{instruction}\n"),
}

# (instruction, input, output) field names, tried in order on the first record.
SCHEMAS = (
    ("instruction", "input", "output"),
    ("instruction", "input", "response"),
    ("question", None, "answer"),
    ("prompt", None, "response"),
    ("prompt", None, "completion"),
    ("prompt", None, "canonical_solution"),  # HumanEval
    ("query", None, "response"),
)
MESSAGE_FIELDS = ("messages", "conversations")
ASSISTANT_ROLES = {"assistant", "gpt", "model", "bot"}
USER_ROLES = {"human": "user", "user": "user"}  # other roles (system, tool, ...) pass through as named
FILE_SUFFIXES = (".json", ".jsonl", ".ndjson", ".json.gz", ".jsonl.gz", ".parquet", ".csv")
HUB_ID = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<config>[\w.-]+))?(?::(?P<split>[\w.-]+))?$")


@dataclass(frozen=True)
class FieldMap:
    """Which record fields hold the parts of an example: `messages`, or instruction (+input) and output."""

    instruction: str | None = None
    input: str | None = None
    output: str | None = None
    messages: str | None = None


class Records(list):
    """Records plus, where the format has them, their 1-based line numbers (for error messages)."""

    def __init__(self, rows: list[dict], lines: list[int] | None = None):
        super().__init__(rows)
        self.lines = lines


def _check_rows(source: str, rows: list, lines: list[int] | None = None) -> Records:
    if not rows:
        raise DataError(f"{source}: no records")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            where = f"{source}:{lines[i]}" if lines else f"{source}: record[{i}]"
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return Records(rows, lines)


def _open_bytes(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _decode(raw: bytes, source: str, line: int | None = None) -> str:
    """UTF-8 text, or a DataError naming the line (and column) of the first byte that is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if line is None:
            line, column = raw.count(b"\n", 0, e.start) + 1, e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        else:
            column = e.start + 1
        raise DataError(f"{source}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {column}); "
                        "re-encode the file as UTF-8") from None


def _jsonl_chunks(path: Path, source: str, chunk_rows: int) -> Iterator[Records]:
    """Records of a JSONL file, `chunk_rows` at a time, each with its line numbers."""
    rows, lines = [], []
    with _open_bytes(path) as f:
        for n, raw in enumerate(f, 1):
            line = _decode(raw, source, n)
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{source}:{n}: invalid JSON ({e.msg}, column {e.colno})") from e
                if not isinstance(row, dict):
                    raise DataError(f"{source}:{n}: expected a JSON object, got {type(row).__name__}")
                rows.append(row)
                lines.append(n)
                if len(rows) == chunk_rows:
                    yield Records(rows, lines)
                    rows, lines = [], []
    if rows:
        yield Records(rows, lines)


def _read_jsonl(path: Path, source: str) -> Records:
    rows, lines = [], []
    for chunk in _jsonl_chunks(path, source, 1 << 16):  # each row already checked to be an object
        rows += chunk
        lines += chunk.lines
    if not rows:
        raise DataError(f"{source}: no records")
    return Records(rows, lines)


def _read_json(path: Path, source: str) -> Records:
    with _open_bytes(path) as f:
        text = _decode(f.read(), source)
    if not text.strip():
        raise DataError(f"{source}: empty file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{source}:{e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from e
    if isinstance(data, dict):
        key = next((k for k in ("data", "train") if isinstance(data.get(k), list)), None)
        if key is None:
            raise DataError(f"{source}: expected a JSON array of records or an object with a 'data' or 'train' list")
        data = data[key]
    if not isinstance(data, list):
        raise DataError(f"{source}: expected a JSON array of records, got {type(data).__name__}")
    return _check_rows(source, data)


def _read_with_datasets(path: Path, source: str) -> Records:
    import datasets

    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds:
                    raise DataError(f"{source}: saved DatasetDict has no 'train' split (has {', '.join(ds)})")
                ds = ds["train"]
        else:
            builder = "parquet" if path.suffix == ".parquet" else "csv"
            ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except DataError:
        raise
    except Exception as e:  # pyarrow/datasets raise many types for unreadable files
        raise DataError(f"{source}: cannot read ({type(e).__name__}: {e})") from e
    # CSV: header is line 1 and rows follow (assuming no multi-line cells).
    lines = list(range(2, len(ds) + 2)) if path.suffix == ".csv" else None
    return _check_rows(source, ds.to_list(), lines)


def _read_hub(source: str, match: re.Match) -> Records:
    if any(os.environ.get(v) for v in ("P2D_OFFLINE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        raise DataError(f"{source}: looks like a hub dataset id, but p2d is offline; pass a local file instead")
    import datasets

    split = match["split"] or "train"
    try:
        ds = datasets.load_dataset(match["repo"], match["config"], split=split)
    except Exception as e:  # network, auth and missing-dataset errors all mean "use a local file"
        raise DataError(f"{source}: the hub is unreachable or has no such dataset/split ({type(e).__name__}: {e}); "
                        f"pass a local file instead") from e
    return _check_rows(source, ds.to_list())


def _suffix(path: Path) -> str:
    return "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix


def is_hub_id(source: str) -> bool:
    """`owner/name[@config][:split]` that is not a local path (file-like suffixes mean a missing file)."""
    path = Path(source).expanduser()
    return bool(HUB_ID.match(source)) and not path.exists() and _suffix(path) not in FILE_SUFFIXES \
        and not source.startswith(".")


def _jsonl_file(source: str) -> Path | None:
    """The JSONL file behind `source` (a local .jsonl file or p2d:default), which can be read line by line."""
    if source == "p2d:default":
        from p2d import default_pool

        return default_pool.pool_path()
    path = Path(source).expanduser()
    return path if path.is_file() and _suffix(path) in (".jsonl", ".jsonl.gz", ".ndjson") else None


def load_records(source: str) -> list[dict]:
    """Rows of a local file or directory, an embedded `p2d:` source, or a hub id `owner/name[@config][:split]`."""
    source = str(source)
    if (jsonl := _jsonl_file(source)) is not None:
        return _read_jsonl(jsonl, source)
    if source.startswith("p2d:"):
        from p2d import default_pool

        if source.startswith("p2d:seed/"):
            try:
                return _check_rows(source, default_pool.build_seeds(source.removeprefix("p2d:seed/")))
            except P2DError as e:
                raise DataError(f"{source}: {e}") from e
        raise DataError(f"{source}: unknown embedded source; use p2d:default or p2d:seed/<domain>")
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_with_datasets(path, source)
    suffixes = _suffix(path)
    if path.is_file():  # JSONL files were read above
        if suffixes in (".json", ".json.gz"):
            return _read_json(path, source)
        if suffixes in (".parquet", ".csv"):
            if path.stat().st_size == 0:
                raise DataError(f"{source}: empty file")
            return _read_with_datasets(path, source)
        raise DataError(f"{source}: unsupported file type {suffixes or '(none)'}; "
                        f"use .json, .jsonl, .parquet, .csv, .json.gz, .jsonl.gz or a save_to_disk directory")
    if is_hub_id(source):
        return _read_hub(source, HUB_ID.match(source))
    raise DataError(f"{source}: no such file or directory")


FIELDS_HELP = "The data's field map when p2d cannot tell it, e.g. 'instruction=q,output=a'."


def parse_fields(spec: FieldMap | dict | str | None) -> FieldMap | None:
    """An explicit field map from a dict or a string like "instruction=q,output=a"."""
    if spec is None or isinstance(spec, FieldMap):
        return spec
    if isinstance(spec, str):
        pairs = [p.split("=", 1) for p in spec.split(",") if p.strip()]
        if any(len(p) != 2 for p in pairs):
            raise DataError(f"field map (--fields) {spec!r}: expected comma-separated key=field pairs, e.g. instruction=q,output=a")
        spec = {k.strip(): v.strip() for k, v in pairs}
    unknown = set(spec) - {"instruction", "input", "output", "messages"}
    if unknown:
        raise DataError(f"field map (--fields): unknown key(s) {', '.join(sorted(unknown))}; "
                        f"use instruction, input, output or messages")
    fields = FieldMap(**spec)
    if not fields.messages and not (fields.instruction and fields.output):
        raise DataError("field map (--fields): give either messages=<field> or both instruction=<field> and output=<field>")
    return fields


def detect_fields(record: dict, source: str) -> FieldMap:
    """The schema of `record`: chat messages, or the first known (instruction, input, output) naming."""
    for key in MESSAGE_FIELDS:
        if isinstance(record.get(key), list):
            return FieldMap(messages=key)
    for instruction, input_, output in SCHEMAS:
        if instruction in record and output in record:
            return FieldMap(instruction, input_ if input_ in record else None, output)
    known = "; ".join("/".join(f for f in s if f) for s in SCHEMAS) + "; messages; conversations"
    raise DataError(f"{source}: cannot tell the schema from fields {sorted(record)}; known: {known}. "
                    f"Pass an explicit field map, e.g. instruction=q,output=a")


def _text(record: dict, key: str, where: str, optional: bool = False) -> str:
    value = record.get(key)
    if optional and value is None:
        return ""
    if key not in record:
        raise DataError(f"{where}: missing field {key!r}")
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {value!r:.60}")
    return value


def _from_messages(record: dict, key: str, where: str) -> tuple[str, str, str, tuple[tuple[str, str], ...]]:
    """(instruction, input, response, conversation). For text templates the last assistant turn is the
    response, the user turn before it the instruction, earlier turns the input; the conversation
    (roles system/user/assistant, up to the last assistant turn) is what the chat template renders."""
    turns = record.get(key)
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field {key!r} must be a non-empty list of turns")
    parsed = []
    for j, turn in enumerate(turns):
        role = turn.get("role", turn.get("from")) if isinstance(turn, dict) else None
        content = turn.get("content", turn.get("value")) if isinstance(turn, dict) else None
        if not isinstance(role, str) or not isinstance(content, str):
            raise DataError(f"{where}: field {key!r}[{j}] needs string 'role'/'from' and 'content'/'value'")
        role = role.lower()
        parsed.append(("assistant" if role in ASSISTANT_ROLES else USER_ROLES.get(role, role), content))
    last = max((j for j, (role, _) in enumerate(parsed) if role == "assistant"), default=None)
    if last is None or last == 0:
        raise DataError(f"{where}: field {key!r} has no assistant turn after a prompt turn")
    *context, (_, instruction) = parsed[:last]
    return (instruction, "\n\n".join(f"{role}: {text}" for role, text in context), parsed[last][1],
            tuple(parsed[: last + 1]))


def format_prompt(instruction: str, input: str = "", template: str = "alpaca") -> str:
    """The prompt text for one example (Alpaca as in the ALPS paper, Table 9, or "plain")."""
    if template not in TEMPLATES:
        raise DataError(f"unknown template {template!r}; available: {', '.join(TEMPLATES)}")
    with_input, without = TEMPLATES[template]
    return (with_input if input.strip() else without).format(instruction=instruction, input=input)


def text_template(template: str, fallback: str = "alpaca") -> str:
    """The text prompt behind a template name: itself for alpaca/plain, else (auto, chat) `fallback`,
    since every example also keeps a text form."""
    return template if template in TEMPLATES else fallback


def single_turn(instruction: str, input: str, output: str) -> tuple[tuple[str, str], ...]:
    """The conversation of an instruction record: one user turn (the input below the instruction), one answer."""
    return ("user", f"{instruction}\n\n{input}" if input.strip() else instruction), ("assistant", output)


def text_chat_template(tokenizer, template: str = "alpaca") -> str:
    """A Jinja chat template that renders a conversation exactly as p2d trains on a text template, so a
    model trained that way is served (vLLM, transformers' chat pipelines) in the format it learned."""
    head, cue = TEMPLATES[template][1].split("{instruction}")
    adds_bos = tokenizer.bos_token_id is not None and \
        tokenizer("x", add_special_tokens=True)["input_ids"][:1] == [tokenizer.bos_token_id]
    return (("{{ bos_token }}" if adds_bos else "")
            + "{% for m in messages %}{% if m['role'] == 'user' %}{{ " + repr(head) + " + m['content'] + "
            + repr(cue) + " }}{% elif m['role'] == 'assistant' %}{{ m['content'] + (eos_token or '') }}{% endif %}"
            + "{% endfor %}")


class _Converter:
    """Records to Examples, chunk after chunk, with one schema, one id namespace and one row count."""

    def __init__(self, source: str, fields: FieldMap | dict | str | None, template: str, domain: str | None,
                 prefix: str | None = None):
        self.source, self.fields, self.domain, self.prefix = source, parse_fields(fields), domain, prefix
        self.text = text_template(template)
        self.seen: dict[str, int] = {}  # id -> its line (or record index): ints, so a million ids stay small
        self.empty: list[str] = []
        self.rows = self.kept = 0

    def __call__(self, records: list[dict]) -> list[Example]:
        if records and self.fields is None:
            self.fields = detect_fields(records[0], self.source)
        fields, examples = self.fields, []
        lines = getattr(records, "lines", None)
        for j, record in enumerate(records):
            i = self.rows + j
            where = self._where(lines[j] if lines else i, bool(lines))
            if fields.messages:
                instruction, input_, output, messages = _from_messages(record, fields.messages, where)
            else:
                instruction = _text(record, fields.instruction, where)
                input_ = _text(record, fields.input, where, optional=True) if fields.input else ""
                output = _text(record, fields.output, where)
                messages = single_turn(instruction, input_, output)
            if not instruction.strip() or not output.strip():
                if len(self.empty) < 5:
                    self.empty.append(where)
                continue
            id_ = str(record["id"]) if record.get("id") is not None else str(i)
            if self.prefix:
                id_ = prefixed_id(self.prefix, id_)
            if id_ in self.seen:
                raise DataError(f"{where}: duplicate id {id_!r} (also {self._where(self.seen[id_], bool(lines))})")
            self.seen[id_] = lines[j] if lines else i
            record_domain = record.get("domain")
            examples.append(Example(id=id_, prompt=format_prompt(instruction, input_, self.text), response=output,
                                    domain=record_domain if isinstance(record_domain, str) else self.domain,
                                    raw=record, messages=messages))
        self.rows += len(records)
        self.kept += len(examples)
        return examples

    def _where(self, n: int, is_line: bool) -> str:
        return f"{self.source}:{n}" if is_line else f"{self.source}: record[{n}]"

    def finish(self) -> None:
        if self.rows == 0:
            raise DataError(f"{self.source}: no records")
        if self.kept < self.rows:
            log.warning("skipped %d record(s) with an empty instruction or response: %s", self.rows - self.kept,
                        ", ".join(self.empty))
        if self.kept == 0:
            raise DataError(f"{self.source}: no records with a non-empty instruction and response")


def to_examples(records: list[dict], source: str, fields: FieldMap | dict | str | None = None,
                template: str = "alpaca", domain: str | None = None) -> list[Example]:
    """Examples from records; the schema is detected on the first record unless `fields` is given.

    `template` sets the text prompt ("plain", else Alpaca); every example also carries its conversation
    for the chat template. Records with an empty instruction or response are skipped with a warning
    rather than failing the whole file: real sets have a few (Code Alpaca 2k has two), and they carry
    nothing to learn. Missing or non-string fields are errors, since they mean a wrong schema or field map.
    """
    convert = _Converter(source, fields, template, domain)
    examples = convert(records)
    convert.finish()
    return examples


def sources_of(source: Sources) -> list[str]:
    """The sources of a pool given as one source or several."""
    sources = [str(source)] if isinstance(source, (str, os.PathLike)) else [str(s) for s in source]
    if not sources:
        raise DataError("no data source given")
    return sources


def pool_spec(source: Sources) -> Sources:
    """How a pool is written in configs and summaries: one source as a string, several as a list."""
    out = sources_of(source)
    return out[0] if len(out) == 1 else out


def prefixed_id(name: str, id_: str) -> str:
    """A row's id in a pool of several sources (`source_names`); `row_source` reads it back."""
    return f"{name}/{id_}"


def row_source(sample_id: str, sources: list[str]) -> str:
    """The source name of a pool row: one source's rows keep their ids, several sources' are `prefixed_id`s."""
    return sample_id.split("/", 1)[0] if len(sources) > 1 else sources[0]


def source_names(source: Sources) -> list[str]:
    """A short unique name per source (its file name without suffixes): several sources' ids are
    `name/id`, which keeps rows without ids (numbered per file) apart and says where each row came from."""
    names: list[str] = []
    for s in sources_of(source):
        stem = s.removeprefix("p2d:").rstrip("/").replace("/", "-") if s.startswith("p2d:") or is_hub_id(s) \
            else Path(s).name.split(".")[0]
        base = name = re.sub(r"[^\w.-]+", "_", stem) or "data"
        k = 1
        while name in names:  # a.jsonl, a-2.jsonl and a.json: a, a-2, a-3
            k += 1
            name = f"{base}-{k}"
        names.append(name)
    return names


def iter_examples(source: Sources, fields: FieldMap | dict | str | None = None, template: str = "alpaca",
                  domain: str | None = None, chunk_rows: int = 8192) -> Iterator[list[Example]]:
    """`load_examples` in chunks, for pools too large to hold as Python records: JSONL files (and
    p2d:default) are read line by line; other formats are read whole, then handed out in chunks.

    Several sources are read one after the other, each with its own schema (unless `fields` names
    one for all), their ids prefixed by `source_names`."""
    sources = sources_of(source)
    prefixes = source_names(sources) if len(sources) > 1 else [None]
    for src, prefix in zip(sources, prefixes):
        convert = _Converter(src, fields, template, domain, prefix)
        for records in _record_chunks(src, chunk_rows):
            yield convert(records)
        convert.finish()


def load_tokens(source: Sources, tokenizer, max_length: int, template: str = "alpaca",
                fields: FieldMap | dict | str | None = None, window: int | None = None) -> PackedTokens:
    """A whole pool read, tokenized and packed chunk by chunk: memory grows with its tokens, not its records."""
    return PackedTokens.pack((tokenize(chunk, tokenizer, max_length, template, window)
                              for chunk in iter_examples(source, fields, template)), vocab_size=len(tokenizer))


def select_examples(source: Sources, ids: Iterable[str], fields: FieldMap | dict | str | None = None,
                    template: str = "alpaca") -> list[Example]:
    """The examples of `source` whose ids are in `ids`, in file order, read chunk by chunk."""
    wanted = set(ids)
    return [e for chunk in iter_examples(source, fields, template) for e in chunk if e.id in wanted]


def _record_chunks(source: str, chunk_rows: int) -> Iterator[Records]:
    if (jsonl := _jsonl_file(source)) is not None:
        yield from _jsonl_chunks(jsonl, source, chunk_rows)
        return
    records = load_records(source)
    lines = getattr(records, "lines", None)
    for s in range(0, len(records), chunk_rows):
        yield Records(records[s: s + chunk_rows], lines[s: s + chunk_rows] if lines else None)


def load_examples(source: Sources, fields: FieldMap | dict | str | None = None, template: str = "alpaca",
                  domain: str | None = None, limit: int | None = None) -> list[Example]:
    """`load_records` + `to_examples`; `limit` keeps the first N records (of a single source)."""
    sources = sources_of(source)
    if len(sources) > 1:
        if limit is not None:
            raise DataError("a record limit applies to one data source, not several")
        return [e for chunk in iter_examples(sources, fields, template, domain) for e in chunk]
    source = sources[0]
    records = load_records(source)
    if limit is not None:
        records = Records(records[:limit], records.lines[:limit] if getattr(records, "lines", None) else None)
    return to_examples(records, source, fields, template, domain)
