"""The instruction catalog: categories of tasks, several wordings each, one drawn per utterance."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import yaml

DEFAULT_CATALOG = Path(__file__).resolve().parent / "catalog" / "instructions-v1.yaml"


@dataclass(frozen=True)
class Instruction:
    id: str  # category/index, stable while the catalog's order is
    text: str


@dataclass(frozen=True)
class Category:
    name: str
    answer_source: str  # "transcript" (ASR) or "llm"
    instructions: list[Instruction]
    settings: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Catalog:
    path: Path
    version: int
    content_hash: str
    categories: dict[str, Category]

    def draw(self, task: str, utt_id: str, seed: int) -> Instruction:
        """The instruction for (utterance, task): a hash of seed, utterance and task picks one, so a
        rerun, a resumed run and another worker all draw the same."""
        if task not in self.categories:
            raise KeyError(f"catalog {self.path}: no category {task!r}")
        choices = self.categories[task].instructions
        h = hashlib.sha256(f"{seed}\0{utt_id}\0{task}".encode()).digest()
        return choices[int.from_bytes(h[:8], "big") % len(choices)]


class CatalogError(ValueError):
    pass


def load_catalog(path: str | Path | None = None) -> Catalog:
    path = Path(path) if path else DEFAULT_CATALOG
    raw_bytes = path.read_bytes()
    raw = yaml.safe_load(raw_bytes)
    if not isinstance(raw, dict) or not isinstance(raw.get("categories"), dict):
        raise CatalogError(f"catalog {path}: expected a mapping with 'version' and 'categories'")
    cats = {}
    for name, body in raw["categories"].items():
        texts = (body or {}).get("instructions") or []
        if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise CatalogError(f"catalog {path}: category {name!r} needs a list of non-empty instructions")
        source = body.get("answer_source", "llm")
        if source not in ("llm", "transcript"):
            raise CatalogError(f"catalog {path}: category {name!r} answer_source must be llm or transcript")
        settings = {k: v for k, v in body.items() if k not in ("instructions", "answer_source")}
        cats[name] = Category(
            name, source, [Instruction(f"{name}/{i}", t.strip()) for i, t in enumerate(texts)], settings
        )
    return Catalog(path, int(raw.get("version", 0)), "sha256:" + hashlib.sha256(raw_bytes).hexdigest(), cats)
