"""A work directory's training examples as a Hugging Face dataset: one Parquet file per split under ``data/``
and a dataset card (``README.md``) whose YAML header names them, so ``datasets.load_dataset(DIR)`` (or the Hub,
once pushed) gives one split per build split. The card says how the data was made: the recipe (the generate and
build runs' parameters), the models, the counts per task and split, and the lineage chain back to the corpora.

With ``embed_audio`` each row carries its clip (the utterance's segment, 16 kHz FLAC bytes) in an ``audio``
column that ``datasets`` reads as its ``Audio`` feature, so the dataset stands alone; without it, rows name
their audio by path, offset and duration, as the build stage wrote them.
"""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core.atomic import atomic_dir
from core.audio import TARGET_SR, load
from core.lineage.store import LineageStore
from core.paths import WorkPaths
from core.tables import read_table
from schemas import EXAMPLES


class ExportError(Exception):
    pass


@dataclass
class HFExport:
    out: Path
    rows_per_split: dict[str, int]
    rows_per_task_split: dict[tuple[str, str], int] = field(default_factory=dict)
    audio_embedded: bool = False


def hf_split(split: str) -> str:
    """``datasets`` takes split names of word characters only: ``test-clean`` becomes ``test_clean`` (the
    rows keep the build's own name in their ``split`` column)."""
    return re.sub(r"\W", "_", split)


def _flac(path: str, offset_s: float, duration_s: float) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, load(path, offset_s, duration_s), TARGET_SR, format="FLAC")
    return buf.getvalue()


def _hf_features(schema: pa.Schema, embed_audio: bool) -> dict:
    """The ``datasets`` feature spec of the exported columns, stored in each file's ``huggingface`` metadata."""
    kinds = {pa.string(): "string", pa.float64(): "float64"}
    feats = {f.name: {"dtype": kinds[f.type], "_type": "Value"} for f in schema if f.name != "audio"}
    if embed_audio:
        feats["audio"] = {"sampling_rate": TARGET_SR, "_type": "Audio"}
    return feats


def _writer_run(store: LineageStore, location: str) -> dict | None:
    rows = store.dicts(
        """SELECT r.run_id, r.stage, r.params, r.code_version, r.ended_at
           FROM datasets d JOIN run_io io ON io.dataset_id = d.dataset_id AND io.direction = 'output'
           JOIN runs r ON r.run_id = io.run_id
           WHERE d.location = ? AND r.status = 'succeeded' ORDER BY r.ended_at DESC LIMIT 1""",
        [location],
    )
    return rows[0] if rows else None


def _card(paths: WorkPaths, export: HFExport, splits: list[str], tasks: list[str], name: str) -> str:
    store = LineageStore(paths.lineage) if paths.lineage.exists() else None
    location = str(paths.build.examples.resolve())
    build = _writer_run(store, location) if store else None
    edges = store.upstream(location) if build else []
    generate = _writer_run(store, str(paths.generate.responses.resolve())) if store else None
    header = ["---", "configs:", "- config_name: default", "  data_files:"]
    for s in splits:
        header += [f"  - split: {hf_split(s)}", f"    path: data/{hf_split(s)}-*.parquet"]
    header += ["tags:", "- speech", "- self-powered", "- splsm", "---", ""]

    lines = [
        f"# {name}",
        "",
        "Speech instruction-following examples made the self-powered way (Yu et al., EMNLP 2024): the LLM",
        "answered an instruction about each transcript, and a speech model learns to give that answer from",
        "the audio. Each row: the instruction, the text before and after the speech (`prefix`, `suffix`), the",
        "answer, the transcript, and the audio"
        + (" (`audio`, 16 kHz FLAC)." if export.audio_embedded else " by path, offset and duration."),
        "",
        "## Counts",
        "",
        "| task | " + " | ".join(splits) + " |",
        "| --- |" + " --- |" * len(splits),
    ]
    for t in tasks:
        lines.append(
            f"| {t} | " + " | ".join(str(export.rows_per_task_split.get((t, s), 0)) for s in splits) + " |"
        )
    lines.append("| all | " + " | ".join(str(export.rows_per_split[s]) for s in splits) + " |")
    models = [e for e in edges if e["kind"] == "model"]
    if models:
        lines += ["", "## Models", ""]
        seen = set()
        for e in models:
            key = (e["role"], e["location"])
            if key not in seen:
                seen.add(key)
                lines.append(f"- {e['role']}: `{e['location']}` ({e['content_hash']})")
    for title, run in (("generate", generate), ("build", build)):
        if run:
            params = json.loads(run["params"]) if isinstance(run["params"], str) else run["params"]
            lines += [
                "",
                f"## Recipe: the {title} run",
                "",
                f"Run `{run['run_id']}`, code `{run['code_version']}`, finished {run['ended_at']:%Y-%m-%d %H:%M}.",
                "",
                "```json",
                json.dumps(params, indent=2, sort_keys=True, default=str),
                "```",
            ]
    if edges:
        lines += ["", "## Lineage", "", "What the examples were made from (`splsm lineage upstream`):", ""]
        for e in edges:
            rows = f", {e['row_count']} rows" if e["row_count"] is not None else ""
            lines.append(
                "  " * (e["depth"] - 1)
                + f"- {e['role']}: `{e['location']}` ({e['kind']}{rows}, {e['content_hash']}),"
                + f" read by {e['via_stage']} run `{e['via_run'][:8]}`"
            )
    elif store is None:
        lines += ["", "## Lineage", "", "The work directory has no lineage store."]
    return "\n".join(header + lines) + "\n"


def export_hf(
    workdir: str | Path, out: str | Path, embed_audio: bool = False, name: str | None = None
) -> HFExport:
    """Write the build stage's examples under ``out`` as a Hugging Face dataset (whole or not at all)."""
    paths = WorkPaths(Path(workdir))
    if not paths.build.examples.is_file():
        raise ExportError(f"{paths.build.examples} does not exist: run `splsm build` on {workdir} first")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "data").is_dir():
        # the export replaces OUT whole: never a directory that is not an earlier export
        raise ExportError(f"{out} exists and is not an earlier export (no data/ in it): give a new directory")
    table = read_table(paths.build.examples, EXAMPLES)
    splits = sorted(set(table.column("split").to_pylist()), key=lambda s: (s != "train", s))
    clash = Counter(hf_split(s) for s in splits)
    if any(n > 1 for n in clash.values()):
        raise ExportError(f"{paths.build.examples}: splits {splits} give the same dataset split name twice")
    tasks = sorted(set(table.column("task").to_pylist()), key=lambda t: (t != "asr", t))
    counts = Counter(zip(table.column("task").to_pylist(), table.column("split").to_pylist(), strict=True))
    export = HFExport(
        out=Path(out),
        rows_per_split={s: sum(n for (_, sp), n in counts.items() if sp == s) for s in splits},
        rows_per_task_split=dict(counts),
        audio_embedded=embed_audio,
    )
    with atomic_dir(out) as tmp:
        (tmp / "data").mkdir()
        for s in splits:
            part = table.filter(pc.equal(table.column("split"), s))
            if embed_audio:
                clips = []
                for i, r in enumerate(part.select(["audio_path", "offset_s", "duration_s"]).to_pylist()):
                    try:
                        clips.append(
                            {"bytes": _flac(r["audio_path"], r["offset_s"], r["duration_s"]), "path": None}
                        )
                    except Exception as e:  # noqa: BLE001 - any unreadable clip stops the export, named
                        raise ExportError(
                            f"{paths.build.examples}: split {s} row {i} field audio_path: {r['audio_path']}: {e}"
                        ) from e
                audio_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
                part = part.append_column("audio", pa.array(clips, type=audio_type))
            feats = _hf_features(part.schema, embed_audio)
            meta = {b"huggingface": json.dumps({"info": {"features": feats}}).encode()}
            part = part.replace_schema_metadata({**(part.schema.metadata or {}), **meta})
            pq.write_table(part, tmp / "data" / f"{hf_split(s)}-00000-of-00001.parquet")
        (tmp / "README.md").write_text(_card(paths, export, splits, tasks, name or Path(out).name))
    return export
