"""The mined subset in the forms other trainers read: the original records, scores, and dataset configs.

selected.jsonl holds each selected sample's record exactly as it was read (every field kept,
nothing added) in pool order, so it diffs cleanly against the pool and is byte-identical across
runs. The LLaMA-Factory and Axolotl entries map the pool's own field names, inferred from the
records' keys, so the file is used as is. trl.jsonl is the same rows in TRL's own formats:
prompt/completion holding exactly the text p2d trains on (so SFTTrainer's completion-only loss
matches p2d's response-only loss), or role/content `messages` for conversation pools.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
from pathlib import Path

import yaml

from p2d import P2DError
from p2d.data import row_source
from p2d.io import atomic_path, write_json, write_text
from p2d.tokens import Example

# (prompt field, optional input field, response field) pairs recognised as single-turn records.
PAIR_SCHEMAS = (
    ("instruction", "input", "output"),
    ("question", None, "answer"),
    ("prompt", None, "completion"),
    ("prompt", None, "response"),
    ("query", None, "response"),
    ("problem", None, "solution"),
    ("instruction", None, "response"),
)
CHAT_KEYS = ("messages", "conversations")
# Axolotl's custom single-turn format, matching the Alpaca layout the pool is usually trained with.
PROMPT_FORMAT = "### Instruction:\n{instruction}\n\n### Response:\n"


def infer_schema(records: list[dict], source: str = "", fields: str | None = None) -> dict:
    """{"kind": "chat", "field": ..., "role": ..., "content": ...} or {"kind": "pair", "prompt": ..., "input": ..., "response": ...}.

    `fields`: the field map the pool was read with (`--fields`), which names the columns outright."""
    from p2d.data import parse_fields

    keys = set(records[0]) if records else set()
    for r in records[1:]:
        keys &= set(r)
    given = parse_fields(fields)
    if given and not given.messages:
        return {"kind": "pair", "prompt": given.instruction, "input": given.input, "response": given.output,
                "system": "system" if "system" in keys else None}
    for field in ([given.messages] if given else CHAT_KEYS):
        if field in keys:
            turn = next((t for r in records for t in r[field] if isinstance(t, dict)), {})
            role, content = ("role", "content") if "role" in turn else ("from", "value")
            return {"kind": "chat", "field": field, "role": role, "content": content,
                    "system": "system" if "system" in keys else None}
    for prompt, inp, response in PAIR_SCHEMAS:
        if prompt in keys and response in keys:
            return {"kind": "pair", "prompt": prompt, "input": inp if inp in keys else None, "response": response,
                    "system": "system" if "system" in keys else None}
    what = f" ({source})" if source else ""
    raise P2DError(f"cannot map the pool's records{what} to a trainer schema: fields {sorted(keys)}; expected "
                   f"{' or '.join(CHAT_KEYS)}, or one of " + ", ".join(f"{p}/{r}" for p, _, r in PAIR_SCHEMAS))


def llamafactory_entry(schema: dict, file_name: str) -> dict:
    if schema["kind"] == "chat":
        entry = {"file_name": file_name, "formatting": "sharegpt", "columns": {"messages": schema["field"]}}
        if schema["system"]:
            entry["columns"]["system"] = schema["system"]
        if schema["role"] == "role":
            entry["tags"] = {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                             "assistant_tag": "assistant", "system_tag": "system"}
        return entry
    columns = {"prompt": schema["prompt"], "response": schema["response"]}
    if schema["input"]:
        columns["query"] = schema["input"]
    if schema["system"]:
        columns["system"] = schema["system"]
    return {"file_name": file_name, "columns": columns}


def axolotl_dataset(schema: dict, path: str) -> dict:
    base = {"path": path, "ds_type": "json", "split": "train"}
    if schema["kind"] == "chat":
        return {**base, "type": "chat_template", "field_messages": schema["field"],
                "message_property_mappings": {"role": schema["role"], "content": schema["content"]}}
    if schema["prompt"] == "instruction" and schema["input"] == "input" and schema["response"] == "output":
        return {**base, "type": "alpaca"}
    custom = {"field_instruction": schema["prompt"], "field_output": schema["response"],
              "format": PROMPT_FORMAT, "no_input_format": PROMPT_FORMAT}
    if schema["input"]:
        custom["field_input"] = schema["input"]
        custom["format"] = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    return {**base, "type": custom}


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "tool": "tool", "function_call": "assistant", "observation": "tool"}


def trl_record(example: Example, schema: dict) -> dict:
    """One TRL SFTTrainer record: conversational `messages`, or the prompt/completion p2d trains on."""
    if schema["kind"] == "chat":
        role, content = schema["role"], schema["content"]
        messages = [{"role": SHAREGPT_ROLES.get(t[role], t[role]), "content": t[content]}
                    for t in example.raw[schema["field"]]]
        if schema["system"] and example.raw.get(schema["system"]):
            messages.insert(0, {"role": "system", "content": example.raw[schema["system"]]})
        return {"messages": messages}
    return {"prompt": example.prompt, "completion": example.response}


def _ranges(rows: list[slice]) -> list[tuple[int, int]]:
    """Sorted, merged [start, stop) ranges."""
    out: list[list[int]] = []
    for r in sorted(rows, key=lambda r: r.start):
        if out and r.start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], r.stop)
        else:
            out.append([r.start, r.stop])
    return [tuple(r) for r in out]


def axolotl_unfrozen(model, heads: list[tuple[int, int]]) -> list[str]:
    """axolotl `unfrozen_parameters` that train the rows p2d's heads scope trains.

    Each selected head's q_proj rows and its KV group's k/v rows (and bias entries), as
    `^name$[start:stop]` row ranges. axolotl freezes the other rows by zeroing their gradients, so
    AdamW weight decay would still move them: the config sets weight_decay 0. o_proj columns
    (`--train-o`) have no row-range form and are not included.
    """
    from p2d.geometry import AttentionGeometry, projection

    geom = AttentionGeometry.from_config(model.config)
    names = {id(m): n for n, m in model.named_modules()}
    by_layer: dict[int, set[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(int(layer), set()).add(int(head))
    out = []
    for layer, hs in sorted(by_layer.items()):
        q = _ranges([geom.q_rows(h) for h in hs])
        kv = _ranges([geom.kv_rows(g) for g in {geom.kv_group(h) for h in hs}])
        for proj, ranges in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            module = projection(model, layer, proj)
            for param in ("weight", "bias") if module.bias is not None else ("weight",):
                out += [f"^{names[id(module)]}.{param}$[{a}:{b}]" for a, b in ranges]
    return out


def scores_csv(result, sources: list[str] | None = None) -> str:
    """id, affinity, quality, score, rank, selected (and with several sources, source) for every pool
    sample, in pool order."""
    def num(x) -> str:
        return "" if x is None or (isinstance(x, float) and math.isnan(x)) else repr(float(x))

    several = sources is not None and len(sources) > 1
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", "affinity", "quality", "score", "rank", "selected"] + (["source"] if several else []))
    quality = result.quality if result.quality is not None else [None] * len(result.ids)
    for i, sid in enumerate(result.ids):
        w.writerow([sid, num(float(result.affinity[i])), num(None if quality[i] is None else float(quality[i])),
                    num(float(result.score[i])), int(result.rank[i]), int(bool(result.selected[i]))]
                   + ([row_source(sid, sources)] if several else []))
    return buf.getvalue()


def export_subset(out_dir: str | Path, kept: list[Example], result, source: str = "",
                  parquet: bool = False, dataset_name: str = "p2d_selected", axolotl: dict | None = None,
                  fields: str | None = None, sources: list[str] | None = None) -> dict[str, Path]:
    """Write selected.jsonl, trl.jsonl, scores.csv, dataset_info.json, axolotl.yaml (and selected.parquet).

    `axolotl`: further top-level keys of axolotl.yaml (base_model, unfrozen_parameters, training
    settings), so the file is a complete config that trains what p2d would. `sources`: the pool's
    source names (`p2d.data.source_names`); with several, each source's selected rows also go to
    selected/NAME.jsonl in its own schema, with an entry each in dataset_info.json and axolotl.yaml,
    since a trainer maps one schema per dataset.
    """
    out = Path(out_dir)
    if [e.id for e in kept] != [i for i, keep in zip(result.ids, result.selected) if keep]:
        raise P2DError("export: the examples are not the ones selected (ids differ)")
    if not kept:
        raise P2DError("export: nothing was selected")
    sources = sources or ["selected"]
    parts: dict[str, list[Example]] = {}
    for e in kept:
        parts.setdefault(row_source(e.id, sources), []).append(e)
    several = len(sources) > 1
    schemas = {name: infer_schema([e.raw for e in part], name if several else source, fields)
               for name, part in parts.items()}
    files = {name: f"selected/{name}.jsonl" if several else "selected.jsonl" for name in parts}
    # trl.jsonl is one dataset in one format: conversations when every part is one, else the prompt/completion
    # p2d trains on (each row read with its own source's schema)
    all_chat = all(s["kind"] == "chat" for s in schemas.values())
    paths = {name: out / name for name in ("selected.jsonl", "trl.jsonl", "scores.csv", "dataset_info.json",
                                           "axolotl.yaml")}
    write_text(paths["selected.jsonl"], _jsonl(e.raw for e in kept))
    shutil.rmtree(out / "selected", ignore_errors=True)  # an earlier run's per-source files
    if several:
        for name, part in parts.items():
            paths[files[name]] = out / files[name]
            write_text(paths[files[name]], _jsonl(e.raw for e in part))
    write_text(paths["trl.jsonl"], _jsonl(trl_record(e, schemas[row_source(e.id, sources)] if all_chat else {"kind": "pair"})
                                          for e in kept))
    write_text(paths["scores.csv"], scores_csv(result, sources))
    write_json(paths["dataset_info.json"], {(f"{dataset_name}_{name}" if several else dataset_name):
                                            llamafactory_entry(schemas[name], files[name]) for name in parts})
    # paths relative to this directory (axolotl reads them from where it runs), so the directory can be moved or copied
    config = {**(axolotl or {}), "datasets": [axolotl_dataset(schemas[name], files[name]) for name in parts]}
    head = ("# from this directory: axolotl train axolotl.yaml  (the dataset paths are relative to it; elsewhere axolotl "
            "would look them up on the hub)\n# written by p2d mine; unfrozen_parameters train the selected heads' rows\n")
    write_text(paths["axolotl.yaml"], head + yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    if not parquet:
        (out / "selected.parquet").unlink(missing_ok=True)  # an earlier run's, which this selection would contradict
    if parquet:
        import pyarrow as pa
        import pyarrow.parquet as pq

        paths["selected.parquet"] = out / "selected.parquet"
        try:
            table = pa.Table.from_pylist([e.raw for e in kept])
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise P2DError(f"export: the selected records do not fit one Parquet schema ({e}); use selected.jsonl") from e
        with atomic_path(paths["selected.parquet"]) as tmp:
            pq.write_table(table, tmp)
    return paths


def _jsonl(rows) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
