import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.tables import read_table, write_table
from schemas import ALL, METRICS, TRANSCRIPTS, SchemaError, to_table


def _row(**over):
    row = dict(
        utt_id="u1",
        corpus="c",
        split="train",
        audio_path="/a.flac",
        offset_s=0.0,
        duration_s=1.5,
        sample_rate_hz=16000,
        text_raw="HELLO",
        text="hello",
        text_norm="hello",
        speaker=None,
        text_source="corpus",
    )
    row.update(over)
    return row


def test_every_table_a_stage_writes_has_a_versioned_schema():
    assert set(ALL) >= {"transcripts", "rejects", "responses", "examples", "predictions", "metrics"}
    for s in ALL.values():
        assert s.version >= 1 and s.tag == f"{s.name}/v{s.version}"


def test_round_trip_keeps_rows_and_tags_the_file(tmp_path):
    p = write_table(
        to_table([_row(), _row(utt_id="u2", speaker="s")], TRANSCRIPTS), tmp_path / "t.parquet", TRANSCRIPTS
    )
    t = read_table(p, TRANSCRIPTS)
    assert t.column("utt_id").to_pylist() == ["u1", "u2"]
    assert pq.read_schema(p).metadata[b"splsm.schema"] == b"transcripts/v2"


def test_wrong_type_on_write_names_table_column_expected_and_found(tmp_path):
    table = to_table([_row()], TRANSCRIPTS)
    bad = table.set_column(table.schema.get_field_index("duration_s"), "duration_s", pa.array(["1.5"]))
    with pytest.raises(SchemaError) as e:
        write_table(bad, tmp_path / "t.parquet", TRANSCRIPTS)
    msg = str(e.value)
    assert "transcripts/v2" in msg and "'duration_s'" in msg and "double" in msg and "string" in msg
    assert not (tmp_path / "t.parquet").exists()


def test_wrong_value_in_rows_names_the_row():
    with pytest.raises(SchemaError, match=r"'sample_rate_hz' expected int32, found str at row 1"):
        to_table([_row(), _row(sample_rate_hz="16k")], TRANSCRIPTS)


def test_read_checks_the_file_against_the_readers_schema(tmp_path):
    # a file written by another writer: right name, a column of the wrong type
    schema = TRANSCRIPTS.with_metadata().set(5, pa.field("duration_s", pa.float32(), nullable=False))
    table = to_table([_row()], TRANSCRIPTS).cast(schema)
    pq.write_table(table, tmp_path / "t.parquet")
    with pytest.raises(SchemaError, match=r"'duration_s' expected double, found float"):
        read_table(tmp_path / "t.parquet", TRANSCRIPTS)


def test_read_rejects_another_table_or_version(tmp_path):
    p = write_table(to_table([], METRICS), tmp_path / "m.parquet", METRICS)
    with pytest.raises(SchemaError, match="transcripts/v2"):
        read_table(p, TRANSCRIPTS)
    untagged = tmp_path / "u.parquet"
    pq.write_table(to_table([_row()], TRANSCRIPTS).replace_schema_metadata(None), untagged)
    with pytest.raises(SchemaError, match="found none"):
        read_table(untagged, TRANSCRIPTS)


def test_null_in_required_column_is_an_error(tmp_path):
    table = to_table([_row()], TRANSCRIPTS)
    schema = table.schema.set(0, pa.field("utt_id", pa.string(), nullable=True))
    bad = pa.table(
        {n: table.column(n) if n != "utt_id" else pa.array([None], pa.string()) for n in table.column_names},
        schema=schema,
    )
    with pytest.raises(SchemaError, match=r"'utt_id' expected non-null string, found null at row 0"):
        write_table(bad, tmp_path / "t.parquet", TRANSCRIPTS)


def test_extra_or_missing_column_is_an_error(tmp_path):
    table = to_table([_row()], TRANSCRIPTS)
    with pytest.raises(SchemaError, match="'extra' expected no such column"):
        write_table(table.append_column("extra", pa.array([1])), tmp_path / "t.parquet", TRANSCRIPTS)
    with pytest.raises(SchemaError, match="'speaker' expected string, found no such column"):
        write_table(table.drop(["speaker"]), tmp_path / "t.parquet", TRANSCRIPTS)
