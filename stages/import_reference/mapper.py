"""Which catalog category a reference instruction wording belongs to.

The reference's data names no category, only the instruction it asked; this maps the wording back to a
category of our catalog, or says why it cannot.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from pathlib import Path

import yaml

from core.catalog import Catalog, bundled_catalogs, load_catalog

REFERENCE_INSTRUCTIONS = Path(__file__).resolve().parent / "reference-instructions.yaml"

_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset(
    "a an the of to and or in on with for this that these it its is are be by as at from into your you what "
    "which text given provided english please".split()
)


def _norm_instruction(s: str) -> str:
    return " ".join(_WORD.findall(s.lower()))


def _stems(s: str) -> list[str]:
    # Five-letter prefixes are a crude stemmer that is enough to tie "paraphrase"/"paraphrasing" together.
    return [w[:5] for w in _WORD.findall(s.lower()) if w not in _STOP]


class InstructionMapper:
    """Instruction wording -> catalog category: by exact wording (the run's catalog, the reference's wordings in
    the bundled ``reference`` catalog, and those of its released data in ``reference-instructions.yaml`` beside
    this module), else by TF-IDF cosine similarity to each category's wordings, accepted only when clearly ahead
    of the runner-up."""

    def __init__(self, catalog: Catalog, aliases: Path = REFERENCE_INSTRUCTIONS, min_score=0.15, margin=0.1):
        raw = yaml.safe_load(aliases.read_text()) or {}
        wordings: dict[str, list[str]] = defaultdict(list)
        reference = load_catalog(bundled_catalogs()["reference"])
        for name, cat in catalog.categories.items():
            wordings[name] += [i.text for i in cat.instructions]
            if name in reference.categories and reference.path != catalog.path:
                wordings[name] += [i.text for i in reference.categories[name].instructions]
        for name, texts in (raw.get("categories") or {}).items():
            if name not in catalog.categories:
                raise ValueError(f"{aliases}: category {name!r} is not in the catalog {catalog.path}")
            wordings[name] += list(texts)
        self.exact = {_norm_instruction(t): name for name, ts in wordings.items() for t in ts}
        docs = {n: Counter(w for t in ts for w in _stems(t)) for n, ts in wordings.items()}
        df = Counter(w for d in docs.values() for w in d)
        self.idf = {w: math.log(1 + len(docs) / n) for w, n in df.items()}
        self.vecs = {n: self._vec(d) for n, d in docs.items()}
        self.min_score, self.margin = min_score, margin

    def _vec(self, counts: Counter) -> dict[str, float]:
        v = {w: c * self.idf.get(w, 0.0) for w, c in counts.items()}
        norm = math.sqrt(sum(x * x for x in v.values())) or 1.0
        return {w: x / norm for w, x in v.items()}

    def scores(self, instruction: str) -> list[tuple[float, str]]:
        q = self._vec(Counter(_stems(instruction)))
        return sorted(
            ((sum(x * v.get(w, 0.0) for w, x in q.items()), n) for n, v in self.vecs.items()), reverse=True
        )

    def category(self, instruction: str) -> tuple[str | None, str]:
        """``(category or None, how)``: how it matched, or why it did not."""
        hit = self.exact.get(_norm_instruction(instruction))
        if hit:
            return hit, "exact"
        (s1, best), (s2, second) = self.scores(instruction)[:2]
        if s1 >= self.min_score and s1 - s2 >= self.margin:
            return best, f"similarity {s1:.2f} (next: {second} {s2:.2f})"
        return None, f"closest category {best} at {s1:.2f}, {second} at {s2:.2f}: too weak or ambiguous"
