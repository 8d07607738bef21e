"""The instruction catalog: categories of tasks, several wordings each, one drawn per utterance.

A catalog is a versioned YAML file: ``version``, optional ``defaults`` (settings every category
inherits) and ``categories``, each with its ``instructions`` and settings: ``max_new_tokens`` (the
answer token budget), ``filters`` (which of ``FILTERS`` judge its answers; ``stages.generate.filters`` implements them)
and ``target_language`` (translation: the language, hence the script, the answer must be in).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import yaml

BUNDLED = Path(__file__).resolve().parent / "catalogs"
DEFAULT_CATALOG = BUNDLED / "instructions-v1.yaml"


def bundled_catalogs() -> dict[str, Path]:
    """Catalogs that ship with the project, by name: ``instructions-v1`` (the project's own wordings, the
    default) and ``reference`` (the self-powered paper's code's wordings)."""
    return {p.stem: p for p in sorted(BUNDLED.glob("*.yaml"))}


def resolve_catalog(value: str | Path | None, base: Path) -> Path | None:
    """A config's ``generate.catalog``: a bundled catalog's name, or a file relative to the config's folder."""
    if value is None:
        return None
    p = Path(value)
    if not p.is_absolute() and p.suffix == "" and len(p.parts) == 1 and str(p) in bundled_catalogs():
        return bundled_catalogs()[str(p)]
    return (p if p.is_absolute() else base / p).resolve()


# Order matters: the first failing one is the recorded reason.
# request_error: the server refused the request itself (a 400 for an over-long context); it judges every
# category's error rows, whatever the catalog lists, and cannot be skipped: an error has no answer to keep.
FILTERS = ("request_error", "prompt_too_long", "empty", "truncated", "no_end_punct", "wrong_script")

# Scripts (first word of a character's Unicode name) accepted as "written in" a target language.
SCRIPTS = {
    "zh": {"CJK"},
    "ja": {"CJK", "HIRAGANA", "KATAKANA"},
    "ko": {"HANGUL"},
    "ru": {"CYRILLIC"},
    "uk": {"CYRILLIC"},
    "el": {"GREEK"},
    "ar": {"ARABIC"},
    "he": {"HEBREW"},
    "hi": {"DEVANAGARI"},
    "th": {"THAI"},
    "en": {"LATIN"},
    "de": {"LATIN"},
    "fr": {"LATIN"},
    "es": {"LATIN"},
}


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

    @property
    def max_new_tokens(self) -> int | None:
        return self.settings.get("max_new_tokens")

    @property
    def filters(self) -> tuple[str, ...]:
        return tuple(self.settings.get("filters", ()))

    @property
    def target_language(self) -> str | None:
        return self.settings.get("target_language")


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


def sample_tasks(utt_id: str, tasks: list[str], per_utterance: int | None, seed: int) -> list[str]:
    """The LLM tasks one utterance gets: every one of ``tasks``, or ``per_utterance`` of them drawn by a hash of
    (seed, utterance, task), in ``tasks`` order. The reference ran each category over its own manifest, so an
    utterance got one LLM task; its draw was unseeded, this one is the same on every run and every worker."""
    if per_utterance is None or per_utterance >= len(tasks):
        return list(tasks)

    def rank(task: str) -> bytes:
        return hashlib.sha256(f"{seed}\0{utt_id}\0{task}\0sample".encode()).digest()

    kept = set(sorted(tasks, key=rank)[:per_utterance])
    return [t for t in tasks if t in kept]


class CatalogError(ValueError):
    pass


SETTINGS = ("max_new_tokens", "filters", "target_language", "max_words")


def _check_settings(path: Path, where: str, settings: dict) -> None:
    for k, v in settings.items():
        if k not in SETTINGS:
            raise CatalogError(
                f"catalog {path}: {where}: unknown setting {k!r}; known: {', '.join(SETTINGS)}"
            )
        if k in ("max_new_tokens", "max_words") and not (isinstance(v, int) and v > 0):
            raise CatalogError(f"catalog {path}: {where}: {k} must be a positive integer, found {v!r}")
        if k == "filters":
            if not isinstance(v, list) or any(f not in FILTERS for f in v):
                raise CatalogError(
                    f"catalog {path}: {where}: filters must be a list of {', '.join(FILTERS)}, found {v!r}"
                )
        if k == "target_language" and v not in SCRIPTS:
            raise CatalogError(
                f"catalog {path}: {where}: target_language {v!r} has no known script; known: {', '.join(sorted(SCRIPTS))}"
            )


def load_catalog(path: str | Path | None = None) -> Catalog:
    path = Path(path) if path else DEFAULT_CATALOG
    raw_bytes = path.read_bytes()
    raw = yaml.safe_load(raw_bytes)
    if not isinstance(raw, dict) or not isinstance(raw.get("categories"), dict):
        raise CatalogError(f"catalog {path}: expected a mapping with 'version' and 'categories'")
    if not isinstance(raw.get("version"), int):
        raise CatalogError(f"catalog {path}: 'version' must be an integer")
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise CatalogError(f"catalog {path}: 'defaults' must be a mapping")
    _check_settings(path, "defaults", defaults)
    cats = {}
    for name, body in raw["categories"].items():
        texts = (body or {}).get("instructions") or []
        if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise CatalogError(f"catalog {path}: category {name!r} needs a list of non-empty instructions")
        source = body.get("answer_source", "llm")
        if source not in ("llm", "transcript"):
            raise CatalogError(f"catalog {path}: category {name!r} answer_source must be llm or transcript")
        own = {k: v for k, v in body.items() if k not in ("instructions", "answer_source")}
        _check_settings(path, f"category {name!r}", own)
        settings = {**defaults, **own}
        cats[name] = Category(
            name, source, [Instruction(f"{name}/{i}", t.strip()) for i, t in enumerate(texts)], settings
        )
    return Catalog(path, raw["version"], "sha256:" + hashlib.sha256(raw_bytes).hexdigest(), cats)
