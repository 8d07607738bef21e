"""Common Voice: a release's ``LOCALE/{train,dev,test,validated}.tsv`` with ``LOCALE/clips/*.mp3``.

The TSVs are not quoted: a sentence may begin with a raw ``"`` (``"Obake karuta" is ...``), so a
line is split on tabs only, as ``csv.QUOTE_NONE`` would; a CSV reader with quoting would swallow
the tabs up to the next quote. ``validated.tsv`` holds every row of train/dev/test, so read either
it or the split files (the same clip twice is a ``duplicate_utt_id`` reject).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from core.config import CorpusConfig
from stages.harvest.corpora.records import Candidate, Reject, missing, stem, text_lines


def read(corpus: CorpusConfig) -> Iterator[Candidate | Reject]:
    root = Path(corpus.root)
    for name in corpus.tsvs:
        tsv = root / (name if name.endswith(".tsv") else f"{name}.tsv")
        if not tsv.is_file():
            yield missing(corpus.name, tsv, "Common Voice TSV")
            continue
        split = corpus.split or tsv.stem
        header: list[str] | None = None
        for source, line in text_lines(tsv, corpus.name):
            if isinstance(line, Reject):
                yield line
                continue
            fields = line.split("\t")
            if header is None:
                header = fields
                if "path" not in header or "sentence" not in header:
                    yield Reject(
                        corpus.name,
                        source,
                        None,
                        "header",
                        "bad_header",
                        f"{tsv.name} has no 'path' and 'sentence' columns (found {header})",
                    )
                    break
                col = {c: i for i, c in enumerate(header)}
                continue
            if len(fields) != len(header):
                yield Reject(
                    corpus.name,
                    source,
                    None,
                    "line",
                    "bad_row",
                    f"{len(fields)} tab-separated fields, the header has {len(header)}",
                )
                continue
            clip = fields[col["path"]]
            utt_id = stem(clip)
            speaker = fields[col["client_id"]] if "client_id" in col else None
            yield Candidate(
                utt_id,
                corpus.name,
                split,
                str(root / "clips" / clip),
                fields[col["sentence"]],
                speaker or None,
                source,
            )
