"""Atomic writes: a crash or kill never leaves a half-written output where a finished one was."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from p2d import P2DError

LOCK = ".p2d.lock"
# what atomic_path / atomic_dir leave behind when killed: ".NAME.<8 chars>.tmp" files, ".NAME.<8 chars>" dirs
_TEMP = re.compile(r"^\..+\.[a-z0-9_]{8}(\.tmp)?$")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def replace_dir(tmp: Path, final: Path) -> None:
    """Put directory `tmp` at `final`; an existing `final` is moved aside first and removed after."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary output directory
    try:
        yield tmp
        replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


@contextlib.contextmanager
def locked_dir(path: str | os.PathLike, option: str = "--out") -> Iterator[Path]:
    """Hold PATH/.p2d.lock while a command writes there; clear temp files that killed writes left.

    A second p2d command into the same directory refuses at once, naming the process that holds
    it. The lock is an flock, so a killed holder releases it. Under a multi-process launcher only
    rank 0 takes it. A directory that cannot be created or written is an error naming `option`.
    """
    path = Path(path)
    if os.environ.get("RANK", "0") != "0":
        yield path
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
        handle = open(path / LOCK, "a+", encoding="utf-8")
    except OSError as e:
        raise P2DError(f"{option} {path}: cannot write there ({e.strerror or e})") from e
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise P2DError(f"{option} {path} is in use by another p2d command ({handle.read().strip() or 'unknown'}); "
                           f"wait for it to finish or use another {option}") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}: p2d {' '.join(sys.argv[1:])}\n")
        handle.flush()
        remove_stale_temps(path)
        yield path


def remove_stale_temps(path: Path) -> list[Path]:
    """Delete the temp files and directories of atomic writes that were killed (the lock holder calls it)."""
    removed = []
    for root, dirs, files in os.walk(path):
        for name in [d for d in dirs if _TEMP.match(d)]:
            shutil.rmtree(Path(root) / name, ignore_errors=True)
            dirs.remove(name)
            removed.append(Path(root) / name)
        for name in [f for f in files if _TEMP.match(f)]:
            (Path(root) / name).unlink(missing_ok=True)
            removed.append(Path(root) / name)
    return removed


def input_digest(spec: str | os.PathLike | list | tuple | None) -> str | None:
    """What a cache key needs of an input: a file's content hash, a directory's listing (name, size,
    mtime), or the spec itself for what is not a local path (a hub id, p2d:default); for several
    inputs (a pool of several sources), the digest of their digests in order."""
    if spec is None:
        return None
    if isinstance(spec, (list, tuple)):
        return "list:" + hashlib.sha256(json.dumps([input_digest(s) for s in spec]).encode()).hexdigest()
    path = Path(spec)
    if path.is_file():
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return "sha256:" + h.hexdigest()
    if path.is_dir():
        files = sorted((str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns)
                       for f in path.rglob("*") if f.is_file())
        return "dir:" + hashlib.sha256(json.dumps(files).encode()).hexdigest()
    return str(spec)
