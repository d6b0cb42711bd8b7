"""Write benchmark results where people read them: docs/results/<name>.json and a section of docs/BENCHMARKS.md.

Each benchmark owns one section, delimited by HTML comments, so scripts can be re-run in any order
without clobbering each other's tables. Every section states the machine and the exact command.
"""

from __future__ import annotations

import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

from p2d.io import write_json, write_text

DOCS = Path(__file__).resolve().parents[1] / "docs"


def machine() -> str:
    """One line naming the machine the numbers come from."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                   if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), {gpu}, Python {platform.python_version()}")


def command() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=DOCS.parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def publish(name: str, title: str, markdown: str, results: dict) -> None:
    """Save results JSON and replace this benchmark's section of docs/BENCHMARKS.md."""
    meta = {"machine": machine(), "command": command(), "commit": commit()}
    write_json(DOCS / "results" / f"{name}.json", {**meta, **results})
    section = (f"<!-- {name}:start -->\n## {title}\n\n"
               f"Machine: {meta['machine']}.  \nCommand: `{meta['command']}` (commit {meta['commit']}).  \n"
               f"Raw results: [`docs/results/{name}.json`](results/{name}.json).\n\n{markdown.strip()}\n"
               f"<!-- {name}:end -->")
    path = DOCS / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n\nEvery table here is written by a script in `benchmarks/`.\n"
    pattern = re.compile(rf"<!-- {name}:start -->.*?<!-- {name}:end -->", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    write_text(path, text)


def table(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table of `rows` (dicts) with the given columns; floats get 4 significant digits."""
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def emit(name: str, title: str, markdown: str, results: dict, local_dir: Path | None) -> None:
    """Publish to docs/, or, for --quick and --no-publish runs, write to `local_dir` only."""
    if local_dir is None:
        publish(name, title, markdown, results)
        return
    write_json(local_dir / f"{name}.json", results)
    write_text(local_dir / f"{name}.md", markdown)
    print(f"\nwritten to {local_dir} (not published)")
