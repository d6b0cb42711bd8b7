"""Cached, resumable stages of a run directory.

A stage is keyed by a fingerprint of its options chained with the previous stage's fingerprint.
`RUN/<stage>/.p2d-stage.json` records the fingerprint when the stage starts and `done` when it ends:
- done with the same fingerprint: the stage is reused;
- started with the same fingerprint but not done (killed): it runs again in place and resumes
  from whatever it left (trainer checkpoints, feature-store shards);
- another fingerprint: its directory is cleared and it runs from scratch.
A failing stage never touches the directories of the stages before it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from p2d.io import read_json, write_json

MARKER = ".p2d-stage.json"
RUN = "{run}/"  # how a stage summary names a file of its run directory: a moved run directory still resumes


def fingerprint(options: dict, previous: str = "") -> str:
    blob = json.dumps(options, sort_keys=True, default=str) + previous
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Stage:
    name: str
    dir: Path
    fingerprint: str

    @property
    def marker(self) -> Path:
        return self.dir / MARKER

    def state(self) -> dict:
        """The marker, with the summary's run-directory paths made absolute again (`finish` stored them relative)."""
        return _paths(read_json(self.marker), RUN, f"{self.dir.parent}/") if self.marker.is_file() else {}

    def is_done(self) -> bool:
        state = self.state()
        return state.get("fingerprint") == self.fingerprint and state.get("done", False)

    def begin(self, force: bool = False) -> bool:
        """Prepare the directory: keep a same-fingerprint partial run (to resume), clear anything else.

        Returns whether an earlier attempt is being resumed.
        """
        resume = self.dir.exists() and not force and self.state().get("fingerprint") == self.fingerprint
        if self.dir.exists() and not resume:
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(self.marker, {"stage": self.name, "fingerprint": self.fingerprint, "done": False})
        return resume

    def finish(self, summary: dict | None = None) -> None:
        write_json(self.marker, {"stage": self.name, "fingerprint": self.fingerprint, "done": True,
                                 "summary": _paths(summary or {}, f"{self.dir.parent}/", RUN)})


def _paths(value, old: str, new: str):
    """`value` with every string that starts with `old` starting with `new` instead (dicts and lists walked)."""
    if isinstance(value, dict):
        return {k: _paths(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_paths(v, old, new) for v in value]
    return new + value[len(old):] if isinstance(value, str) and value.startswith(old) else value
