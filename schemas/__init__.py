"""Arrow schemas of every table a stage writes, each with a name and a version.

Every Parquet file carries its schema's name and version in its metadata. ``check`` compares a table
(or a file's schema) with the schema its writer or reader expects; a mismatch raises ``SchemaError``
naming the table, the column, the expected and the found type, so a stage never silently reads a table
of another shape or version. This package holds definitions only: the Parquet I/O that applies them on
every write and read is ``core.tables``.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

META_KEY = b"splsm.schema"


class SchemaError(ValueError):
    """A table does not match the schema its reader or writer expects."""


@dataclass(frozen=True)
class TableSchema:
    name: str
    version: int
    schema: pa.Schema

    @property
    def tag(self) -> str:
        return f"{self.name}/v{self.version}"

    def with_metadata(self) -> pa.Schema:
        return self.schema.with_metadata({META_KEY: self.tag.encode()})

    def empty(self) -> pa.Table:
        return self.with_metadata().empty_table()


def _f(name: str, typ: pa.DataType, nullable: bool = False) -> pa.Field:
    return pa.field(name, typ, nullable=nullable)


TRANSCRIPTS = TableSchema(
    "transcripts",
    2,
    pa.schema(
        [
            _f("utt_id", pa.string()),
            _f("corpus", pa.string()),
            _f("split", pa.string()),
            _f("audio_path", pa.string()),  # absolute path, confined to the declared corpus root
            _f("offset_s", pa.float64()),  # segment start inside the file
            _f("duration_s", pa.float64()),
            _f("sample_rate_hz", pa.int32()),  # of the file on disk; loaders resample to 16 kHz
            _f("text_raw", pa.string()),  # the corpus's own transcript, byte for byte
            _f("text", pa.string()),  # readable form given to the LLM (casing and spacing repaired)
            _f("text_norm", pa.string()),  # Whisper's English normalizer, for WER and dedup
            _f("speaker", pa.string(), nullable=True),
            _f("text_source", pa.string()),  # "corpus" or "whisper:<checkpoint sha256>"
            # The audio file as probed: a rerun probes it again only if these changed. Null in tables
            # that another tool wrote.
            _f("file_size", pa.int64(), nullable=True),
            _f("file_mtime_ns", pa.int64(), nullable=True),
            _f("file_sha256", pa.string(), nullable=True),  # null when harvest.content_hash is off
        ]
    ),
)

REJECTS = TableSchema(
    "rejects",
    2,
    pa.schema(
        [
            _f("corpus", pa.string()),
            _f("source", pa.string()),  # file and line (or file) the bad row came from
            _f("utt_id", pa.string(), nullable=True),
            _f("field", pa.string()),  # which field was bad: audio, text, utt_id
            _f("reason", pa.string()),  # short machine-readable reason, counted at the end of a run
            _f("detail", pa.string()),
            _f("audio_path", pa.string(), nullable=True),  # resolved audio file, when the row named one
            # of that file, for audio rejects: a rerun reuses the reject while these are unchanged
            _f("file_size", pa.int64(), nullable=True),
            _f("file_mtime_ns", pa.int64(), nullable=True),
            _f("file_sha256", pa.string(), nullable=True),
        ]
    ),
)


def reject_row(
    corpus: str, source: str, utt_id: str | None, field: str, reason: str, detail: str, **file
) -> dict:
    """One REJECTS row: where the bad row came from, which field, why; ``file``: the audio file's
    ``audio_path``, ``file_size``, ``file_mtime_ns``, ``file_sha256`` where the reject is about one."""
    return dict(
        corpus=corpus, source=source, utt_id=utt_id, field=field, reason=reason, detail=detail, **file
    )


RESPONSES = TableSchema(
    "responses",
    2,
    pa.schema(
        [
            _f("utt_id", pa.string()),
            _f("task", pa.string()),
            _f("instruction_id", pa.string()),
            _f("instruction", pa.string()),
            _f("prompt", pa.string()),
            _f("answer", pa.string()),
            _f("model", pa.string()),
            _f("finish_reason", pa.string()),
            _f("prompt_tokens", pa.int32()),
            _f("completion_tokens", pa.int32()),
            _f("request_key", pa.string()),  # cache key: sha256 of model, prompt and sampling parameters
            _f("sampling", pa.string()),  # JSON of the sampling parameters sent
            # v2: the first filter the answer failed (stages/generation/filters.py); null: kept for training.
            # Every (utterance, task) has exactly one row, kept or not, so nothing is dropped silently.
            _f("rejected_by", pa.string(), nullable=True),
        ]
    ),
)

GENERATE_STATS = TableSchema(
    "generate_stats",
    1,
    pa.schema(
        [
            _f("task", pa.string()),
            _f("filter", pa.string()),
            _f("applied", pa.int64()),  # answers of this task the filter judged
            _f("failed", pa.int64()),  # answers that failed it (an answer may fail several)
            _f("rejected", pa.int64()),  # answers whose rejected_by is this filter (the first failed)
        ]
    ),
)

EXAMPLES = TableSchema(
    "examples",
    1,
    pa.schema(
        [
            _f("example_id", pa.string()),
            _f("utt_id", pa.string()),
            _f("split", pa.string()),  # train / dev / test, or a corpus-defined eval split name
            _f("task", pa.string()),
            _f("instruction", pa.string()),
            _f("prefix", pa.string()),  # text before the speech tokens
            _f("suffix", pa.string()),  # text between the speech tokens and the answer
            _f("answer", pa.string()),  # target; the loss covers it and the end-of-sequence token only
            _f("transcript", pa.string()),
            _f("audio_path", pa.string()),
            _f("offset_s", pa.float64()),
            _f("duration_s", pa.float64()),
            _f("speaker", pa.string(), nullable=True),
        ]
    ),
)

SHARDS = TableSchema(
    "shards",
    1,
    pa.schema(
        [
            _f("file", pa.string()),  # shard file name, relative to the manifest's folder
            _f("split", pa.string()),  # every row of a shard has this split
            _f("rows", pa.int64()),
            _f("row_groups", pa.int32()),
            _f("bytes", pa.int64()),
            _f("sha256", pa.string()),
            _f("audio_s", pa.float64()),  # total audio duration of the shard's rows
        ]
    ),
)


PREDICTIONS = TableSchema(
    "predictions",
    3,
    pa.schema(
        [
            _f("example_id", pa.string()),
            _f("utt_id", pa.string()),
            _f("eval_set", pa.string()),
            _f("task", pa.string()),
            # v3: who transcribed: "lsm" (the speech-text model), or "whisper" (its Whisper alone, the reference)
            _f("system", pa.string()),
            _f("reference", pa.string()),
            _f("hypothesis", pa.string()),
            _f("reference_norm", pa.string()),
            _f("hypothesis_norm", pa.string()),
            _f("ref_words", pa.int32()),
            _f("substitutions", pa.int32()),
            _f("deletions", pa.int32()),
            _f("insertions", pa.int32()),
            _f("errors", pa.int32()),
            _f("duration_s", pa.float64()),
        ]
    ),
)

METRICS = TableSchema(
    "metrics",
    3,
    pa.schema(
        [
            _f("eval_set", pa.string()),
            _f("task", pa.string()),
            _f("system", pa.string()),  # v3: "lsm", or "whisper" (the reference row: its Whisper alone)
            _f("n_utterances", pa.int32()),
            _f("n_ref_words", pa.int32()),
            _f("substitutions", pa.int32()),
            _f("deletions", pa.int32()),
            _f("insertions", pa.int32()),
            _f("hits", pa.int32()),
            _f("wer", pa.float64()),
            _f("empty_references", pa.int32()),  # filtered out of the WER and counted here
            _f("rejected", pa.int32()),  # eval rows whose audio could not be loaded (in rejects.parquet)
            _f("audio_s", pa.float64()),  # seconds of audio decoded
            _f("decode_s", pa.float64()),  # wall seconds of features + encoder + generate
            _f("rtfx", pa.float64()),  # audio_s / decode_s
            _f("num_beams", pa.int32()),
        ]
    ),
)

PROBE = TableSchema(
    "probe",
    2,
    pa.schema(
        [
            _f("utt_id", pa.string()),
            _f("eval_set", pa.string()),
            _f("category", pa.string()),  # a non-ASR task of the instruction catalog
            _f("instruction", pa.string()),
            _f("transcript", pa.string()),
            _f("llm_answer", pa.string()),  # the LLM's own answer to the same instruction on the transcript
            _f("answer", pa.string()),  # the speech model's answer to (speech, instruction)
            _f("wer_vs_transcript", pa.float64()),  # WER of the answer against the transcript, normalized
            _f("anchored", pa.bool_()),  # wer_vs_transcript below the threshold: the answer is the transcript
            _f("own_asr", pa.string()),  # the model's own transcription of the clip (None: it has none)
            _f(
                "wer_vs_own_asr", pa.float64()
            ),  # WER of the answer against own_asr, normalized (NaN: no words)
            _f("anchored_own", pa.bool_()),  # wer_vs_own_asr below the threshold (None: no own transcription)
            _f("chrf", pa.float64()),  # sentence chrF (0-100) of the answer against the LLM's answer
        ]
    ),
)

PROBE_METRICS = TableSchema(
    "probe_metrics",
    2,
    pa.schema(
        [
            _f("eval_set", pa.string()),
            _f("category", pa.string()),
            _f("n_items", pa.int32()),
            _f("n_anchored", pa.int32()),
            _f("anchor_rate", pa.float64()),
            _f("n_with_own_asr", pa.int32()),  # scored items whose clip has an own transcription with words
            _f("n_anchored_own", pa.int32()),
            _f(
                "anchor_rate_own", pa.float64()
            ),  # anchored to the model's own transcription, of n_with_own_asr
            _f("anchor_wer_threshold", pa.float64()),
            _f("self_consistency_chrf", pa.float64()),  # corpus chrF (0-100) against the LLM's answers
            _f("empty_transcripts", pa.int32()),  # items left out: no words to anchor to
            _f("rejected", pa.int32()),  # items whose audio could not be loaded
        ]
    ),
)

QA = TableSchema(
    "qa",
    1,
    pa.schema(
        [
            _f("qa_id", pa.string()),
            _f("utt_id", pa.string()),
            _f("eval_set", pa.string()),
            _f("question", pa.string()),
            _f("reference", pa.bool_()),
            _f("answer", pa.string()),  # the speech model's free-form answer
            _f("parsed", pa.string(), nullable=True),  # "yes" / "no", or null when it says neither
            _f("correct", pa.bool_()),
        ]
    ),
)

QA_METRICS = TableSchema(
    "qa_metrics",
    1,
    pa.schema(
        [
            _f("eval_set", pa.string()),
            _f("source", pa.string()),  # the question file, or "generated:word-presence-v1"
            _f("n_questions", pa.int32()),
            _f("n_correct", pa.int32()),
            _f("n_unparsed", pa.int32()),  # answers with neither yes nor no: counted as wrong
            _f("accuracy", pa.float64()),
            _f(
                "rejected", pa.int32()
            ),  # questions on audio that could not be loaded or on unknown utterances
        ]
    ),
)

ALL = {
    s.name: s
    for s in (
        TRANSCRIPTS,
        REJECTS,
        RESPONSES,
        GENERATE_STATS,
        EXAMPLES,
        SHARDS,
        PREDICTIONS,
        METRICS,
        PROBE,
        PROBE_METRICS,
        QA,
        QA_METRICS,
    )
}


def check(table: pa.Table | pa.Schema, expected: TableSchema, where: str = "") -> None:
    """Raise SchemaError unless ``table`` has exactly the columns and types of ``expected``."""
    found = table if isinstance(table, pa.Schema) else table.schema
    at = f" in {where}" if where else ""
    for field in expected.schema:
        idx = found.get_field_index(field.name)
        if idx < 0:
            raise SchemaError(
                f"table {expected.tag}{at}: column {field.name!r} expected {field.type}, found no such column"
            )
        got = found.field(idx).type
        if got != field.type:
            raise SchemaError(
                f"table {expected.tag}{at}: column {field.name!r} expected {field.type}, found {got}"
            )
    extra = [n for n in found.names if expected.schema.get_field_index(n) < 0]
    if extra:
        raise SchemaError(
            f"table {expected.tag}{at}: column {extra[0]!r} expected no such column, found {found.field(extra[0]).type}"
        )
    tag = (found.metadata or {}).get(META_KEY)
    if tag is not None and tag.decode() != expected.tag:
        raise SchemaError(
            f"table {expected.tag}{at}: schema version expected {expected.tag}, found {tag.decode()}"
        )
    if isinstance(table, pa.Table):
        for field in expected.schema:
            if not field.nullable and table.column(field.name).null_count:
                col = table.column(field.name)
                row = next(i for i, v in enumerate(col.is_null().to_pylist()) if v)
                raise SchemaError(
                    f"table {expected.tag}{at}: column {field.name!r} expected non-null {field.type}, found null at row {row}"
                )


def to_table(rows: list[dict], expected: TableSchema) -> pa.Table:
    """Build a table from row dicts, in the schema's column order; unknown keys are an error."""
    if not rows:
        return expected.empty()
    names = expected.schema.names
    for i, row in enumerate(rows):
        extra = set(row) - set(names)
        if extra:
            raise SchemaError(f"table {expected.tag}: row {i} has unknown column {sorted(extra)[0]!r}")
    cols = {}
    for field in expected.schema:
        values = [row.get(field.name) for row in rows]
        try:
            cols[field.name] = pa.array(values, type=field.type)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            bad = next((i for i, v in enumerate(values) if not _fits(v, field.type)), 0)
            raise SchemaError(
                f"table {expected.tag}: column {field.name!r} expected {field.type}, found "
                f"{type(values[bad]).__name__} at row {bad} ({e})"
            ) from e
    return pa.table(cols, schema=expected.with_metadata())


def _fits(value, typ: pa.DataType) -> bool:
    try:
        pa.array([value], type=typ)
        return True
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return False
