"""Domain data cards: where a domain's training, target and evaluation data come from.

A card (`data_cards/<domain>.md`, installed as `p2d.data_cards`) is Markdown with YAML front matter,
like a Hugging Face dataset card, so the same file documents the data for people and configures
p2d. Sources are tried in order: local files under a data root (read in place, never copied), a hub
id only when asked for, and the embedded `p2d:seed/<domain>` last so a card always resolves offline.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import yaml

from p2d import P2DError
from p2d.data import is_hub_id

REQUIRED = ("domain", "description", "template", "train", "seed", "license")


def data_roots() -> list[Path]:
    """Directories searched for a card's relative paths: $P2D_DATA_DIR, ./shared/data, ../shared/data."""
    roots = [Path(os.environ["P2D_DATA_DIR"])] if os.environ.get("P2D_DATA_DIR") else []
    return [r for r in roots + [Path("shared/data"), Path("../shared/data")] if r.is_dir()]


@dataclass
class DataCard:
    domain: str
    description: str
    template: str
    train: list[str]
    seed: str
    license: str
    fields: dict[str, str] | None = None
    eval: str | None = None
    eval_task: str | None = None
    text: str = field(default="", repr=False)

    def resolve(self, path: str | None, prefer_hub: bool = False) -> str | None:
        """A loadable source for `path`: embedded and existing paths as-is, relative files under a data root.

        Hub ids resolve only with `prefer_hub`, so nothing reaches the network unless the user asks.
        """
        if not path:
            return None
        if path.startswith("p2d:"):
            return path
        if is_hub_id(path):
            return path if prefer_hub and not os.environ.get("P2D_OFFLINE") else None
        if Path(path).expanduser().is_absolute():
            return path if Path(path).expanduser().exists() else None
        return next((str((root / path).resolve()) for root in data_roots() if (root / path).exists()), None)

    def train_source(self, prefer_hub: bool = False) -> str:
        """The first training source that resolves (with `prefer_hub`, hub ids are tried before the rest)."""
        order = sorted(self.train, key=lambda s: not is_hub_id(s)) if prefer_hub else self.train
        for source in order:
            if (resolved := self.resolve(source, prefer_hub)) is not None:
                return resolved
        raise P2DError(f"data card {self.domain!r}: none of its train sources resolves: {', '.join(self.train)}")

    def eval_source(self) -> str | None:
        """The held-out evaluation set, or None if the card has none or its file is not available here."""
        return self.resolve(self.eval)


def available_domains() -> list[str]:
    return sorted(p.name.removesuffix(".md") for p in files("p2d.data_cards").iterdir() if p.name.endswith(".md"))


DOMAINS = tuple(available_domains())  # the --domain choices


def load_card(domain: str) -> DataCard:
    """The card for `domain`; unknown domains and malformed cards raise P2DError naming the card."""
    if domain not in available_domains():
        raise P2DError(f"no data card for domain {domain!r}; available: {', '.join(available_domains())}")
    name = f"data_cards/{domain}.md"
    text = files("p2d.data_cards").joinpath(f"{domain}.md").read_text(encoding="utf-8")
    head, sep, body = text.removeprefix("---\n").partition("\n---\n")
    if not text.startswith("---\n") or not sep:
        raise P2DError(f"{name}: missing YAML front matter between '---' lines")
    try:
        meta = yaml.safe_load(head) or {}
    except yaml.YAMLError as e:
        raise P2DError(f"{name}: invalid YAML front matter ({e})") from e
    missing = [k for k in REQUIRED if not meta.get(k)]
    if missing:
        raise P2DError(f"{name}: front matter lacks {', '.join(missing)}")
    unknown = set(meta) - (set(DataCard.__dataclass_fields__) - {"text"})
    if unknown:
        raise P2DError(f"{name}: unknown front-matter key(s) {', '.join(sorted(unknown))}")
    if not isinstance(meta["train"], list):
        raise P2DError(f"{name}: 'train' must be a list of sources")
    return DataCard(**meta, text=body.strip())
