"""lhotse manifests: a RecordingSet with its SupervisionSet, or a CutSet, as JSONL (``.jsonl`` or ``.jsonl.gz``).

Speech toolkits keep corpora this way (lhotse's recipes, k2/icefall, NeMo's speech-LLM training). Every
supervision is one utterance: its recording's audio file from ``start`` for ``duration`` seconds (in a cut,
``start`` counts from the cut's own start in the recording). A recording that no supervision names, and a cut
without supervisions, is audio without a transcript, as a LibriSpeech file without a line is: Whisper may label
it, else the harvest rejects it as ``no_transcript``. A supervision without ``text`` is the same.

Each line is parsed by lhotse itself (``Recording.from_dict``, ``SupervisionSegment.from_dict``,
``deserialize_item`` for cuts), one line at a time, so that a bad line is one reject naming the file, line and
field rather than the end of the whole corpus; ``lhotse.load_manifest`` parses a file whole and stops at the
first bad item. The RecordingSet is held as a small tuple per recording (its path, length and channels), not
as lhotse objects: the supervisions refer to recordings by id, in any order.

Only what the harvest can read the same way lhotse would becomes a candidate: a recording of one audio file
(``type: file``; not a URL, a command, bytes in memory or a Shar shard), without transforms other than
resampling (the loader resamples anyway; speed or volume perturbation would change the audio the text belongs
to), and a supervision that covers every channel of its recording, since the harvest downmixes to mono.
Relative audio paths are relative to the corpus root; the harvest confines every resolved path to the root,
probes the file and checks the segment against the file's real length, as for every other reader.
"""

from __future__ import annotations

import gzip
import re
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

from core.config import CorpusConfig
from stages.harvest.corpora.manifests import json_lines
from stages.harvest.corpora.records import Candidate, Reject, join, missing

TOLERANCE_S = 1e-3  # the driver's own slack between a segment's end and its file's length
# The fields the harvest relies on, with their JSON types: lhotse's from_dict builds objects without checking
# them, and a string where a number belongs would otherwise fail later, far from its line.
NUMBER = (int, float)
RECORDING_FIELDS = {
    "id": str,
    "sources": list,
    "sampling_rate": NUMBER,
    "num_samples": NUMBER,
    "duration": NUMBER,
}
SUPERVISION_FIELDS = {"id": str, "recording_id": str, "start": NUMBER, "duration": NUMBER}
CUT_FIELDS = {"id": str, "start": NUMBER, "duration": NUMBER}
# lhotse recipes name their files PREFIX_{recordings,supervisions,cuts}_PART.jsonl.gz: PART is the split
_RECIPE_NAME = re.compile(r"^.+_(?:cuts|supervisions|recordings)_(?P<part>.+)$")


class Rec(NamedTuple):
    """What the harvest needs of one lhotse Recording."""

    audio_path: str  # joined to the corpus root, not yet resolved
    duration_s: float
    channels: tuple[int, ...]
    source: str  # FILE:LINE of the recording, for rejects of its supervisions


def read(corpus: CorpusConfig) -> Iterator[Candidate | Reject]:
    try:
        import lhotse  # noqa: F401  (the parsers below import its classes)
    except ImportError as e:
        raise ImportError(
            f"corpus {corpus.name!r}: kind lhotse reads manifests with the lhotse package: pip install lhotse"
        ) from e
    if corpus.cuts is not None:
        yield from _read_cuts(corpus, Path(corpus.cuts))
    else:
        yield from _read_sets(corpus, Path(corpus.recordings), Path(corpus.supervisions))


def split_of(path: Path) -> str:
    """The split a manifest's name says: PART of lhotse's ``PREFIX_cuts_PART.jsonl.gz``, else the bare name."""
    name = path.name
    for suffix in (".gz", ".jsonl", ".json"):
        name = name.removesuffix(suffix)
    m = _RECIPE_NAME.match(name)
    return m["part"] if m else name


def _lines(corpus: CorpusConfig, path: Path) -> Iterator[tuple[str, dict | Reject]]:
    """``(FILE:LINE, JSON object)`` for each non-blank line, or a reject naming the line that is not one.

    A gzip stream that breaks off or is corrupt ends the file in one ``bad_manifest`` reject saying after
    which line: the lines before it were read, those after cannot be.
    """
    opener = gzip.open if path.name.endswith(".gz") else open
    lineno = 0
    try:
        with opener(path, "rb") as f:
            for read, source, item in json_lines(corpus, path, f):
                lineno = read  # where a gzip that breaks off broke off
                yield source, item
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        detail = f"after line {lineno}: {type(e).__name__}: {e}"
        yield str(path), Reject(corpus.name, str(path), None, "manifest", "bad_manifest", detail)


def _wrong(get: Callable[[str], object], fields: dict, what: str) -> tuple[str, str, str] | None:
    """(field, reason, detail) of the first field that is missing or not of its type, or None."""
    for key, typ in fields.items():
        v = get(key)
        if v is None:
            return key, "missing_field", f"a {what} without {key!r}"
        if isinstance(v, bool) or not isinstance(v, typ) or v == "":
            return key, "bad_value", f"{key!r} of a {what} is {v!r}"
    return None


def _parsed(
    corpus: CorpusConfig,
    source: str,
    obj: dict,
    fields: dict,
    parse: Callable[[dict], object],
    what: str,
):
    """``parse(obj)`` (a lhotse class's ``from_dict``), or a reject naming the bad field or lhotse's error."""
    bad = _wrong(obj.get, fields, what)
    if bad is not None:
        return Reject(corpus.name, source, _id(obj), *bad)
    try:
        return parse(obj)
    except (TypeError, ValueError, KeyError, AssertionError, AttributeError, IndexError) as e:
        return Reject(corpus.name, source, _id(obj), "line", "bad_row", f"not a lhotse {what}: {e}")


def _id(obj: dict) -> str | None:
    v = obj.get("id")
    return v if isinstance(v, str) else None


def _recording(corpus: CorpusConfig, source: str, rec) -> Rec | Reject:
    """The recording's one audio file, or a reject saying why the harvest cannot read it as lhotse would."""
    if len(rec.sources) != 1 or rec.sources[0].type != "file":
        kinds = ", ".join(s.type for s in rec.sources) or "none"
        return Reject(
            corpus.name,
            source,
            rec.id,
            "sources",
            "unsupported_source",
            f"recording {rec.id} has sources of type {kinds}; the harvest reads one audio file (type file)",
        )
    # transforms come as lhotse's classes (Speed, Resample, ...; they carry no name attribute) or as dicts
    names = [t.get("name") if isinstance(t, dict) else type(t).__name__ for t in rec.transforms or []]
    odd = [str(n) for n in names if n != "Resample"]
    if odd:
        return Reject(
            corpus.name,
            source,
            rec.id,
            "transforms",
            "unsupported_transform",
            f"recording {rec.id} is transformed ({', '.join(odd)}): its text belongs to audio the file does not hold",
        )
    path = rec.sources[0].source
    if not isinstance(path, str) or not path:
        return Reject(corpus.name, source, rec.id, "sources", "missing_field", "a file source without a path")
    return Rec(join(corpus.root, path), float(rec.duration), tuple(rec.channel_ids), source)


def _channels_ok(channel, rec: Rec) -> bool:
    """Whether a supervision (or cut) on ``channel`` hears what the harvest's mono downmix of the file holds."""
    if len(rec.channels) == 1:
        return True
    return isinstance(channel, list) and set(channel) == set(rec.channels)


def _utterance(
    corpus: CorpusConfig,
    source: str,
    sup,
    rec: Rec,
    offset: float,
    split: str,
    field: str,
) -> Candidate | Reject:
    """One supervision as a candidate: ``offset`` is where it starts in the recording's file."""

    def reject(f: str, reason: str, detail: str) -> Reject:
        return Reject(corpus.name, source, sup.id, f"{field}{f}", reason, detail)

    duration = float(sup.duration)
    if duration <= 0:
        return reject("duration", "empty_audio", f"supervision {sup.id} lasts {duration}s")
    if offset < -TOLERANCE_S or offset + duration > rec.duration_s + TOLERANCE_S:
        return reject(
            "start",
            "segment_out_of_range",
            f"supervision {sup.id} spans {offset:.3f}s to {offset + duration:.3f}s of recording "
            f"{sup.recording_id} ({rec.source}), which lasts {rec.duration_s:.3f}s",
        )
    if not _channels_ok(sup.channel, rec):
        return reject(
            "channel",
            "single_channel",
            f"supervision {sup.id} is on channel {sup.channel} of a recording with channels "
            f"{list(rec.channels)}; the harvest downmixes every file to mono",
        )
    text = sup.text
    if text is not None and not isinstance(text, str):
        return reject("text", "bad_value", f"'text' is a {type(text).__name__}")
    speaker = str(sup.speaker) if sup.speaker not in (None, "") else None
    return Candidate(
        sup.id,
        corpus.name,
        split,
        rec.audio_path,
        text,
        speaker,
        source,
        offset_s=max(offset, 0.0),
        duration_s=duration,
    )


def _read_sets(corpus: CorpusConfig, recordings: Path, supervisions: Path) -> Iterator[Candidate | Reject]:
    from lhotse import Recording, SupervisionSegment

    for path, what in ((recordings, "lhotse RecordingSet"), (supervisions, "lhotse SupervisionSet")):
        if not path.is_file():
            yield missing(corpus.name, path, what)
            return
    recs: dict[str, Rec | Reject] = {}
    for source, obj in _lines(corpus, recordings):
        if isinstance(obj, Reject):
            yield obj
            continue
        parsed = _parsed(corpus, source, obj, RECORDING_FIELDS, Recording.from_dict, "Recording")
        if isinstance(parsed, Reject):
            yield parsed
            if parsed.utt_id is not None and parsed.utt_id not in recs:
                recs[parsed.utt_id] = parsed  # its supervisions are rejected for it, not as unknown
            continue
        if parsed.id in recs:
            yield Reject(
                corpus.name,
                source,
                parsed.id,
                "id",
                "duplicate_recording_id",
                f"recording {parsed.id} already came from {recs[parsed.id].source}",
            )
            continue
        rec = recs[parsed.id] = _recording(corpus, source, parsed)
        if isinstance(rec, Reject):
            yield rec
    split = corpus.split or split_of(supervisions)
    heard: set[str] = set()
    for source, obj in _lines(corpus, supervisions):
        if isinstance(obj, Reject):
            yield obj
            continue
        sup = _parsed(
            corpus, source, obj, SUPERVISION_FIELDS, SupervisionSegment.from_dict, "SupervisionSegment"
        )
        if isinstance(sup, Reject):
            yield sup
            continue
        rec = recs.get(sup.recording_id)
        heard.add(sup.recording_id)
        if rec is None:
            yield Reject(
                corpus.name,
                source,
                sup.id,
                "recording_id",
                "unknown_recording",
                f"no recording {sup.recording_id!r} in {recordings}",
            )
        elif isinstance(rec, Reject):
            yield Reject(
                corpus.name,
                source,
                sup.id,
                "recording_id",
                "bad_recording",
                f"its recording {sup.recording_id} ({rec.source}) is a reject: {rec.reason}",
            )
        else:
            yield _utterance(corpus, source, sup, rec, float(sup.start), split, "")
    for rec_id, rec in recs.items():
        if rec_id not in heard and isinstance(
            rec, Rec
        ):  # audio without a supervision: as a file without a line
            yield Candidate(rec_id, corpus.name, split, rec.audio_path, None, None, rec.source)


def _read_cuts(corpus: CorpusConfig, cuts: Path) -> Iterator[Candidate | Reject]:
    from lhotse import MonoCut, MultiCut
    from lhotse.serialization import deserialize_item

    if not cuts.is_file():
        yield missing(corpus.name, cuts, "lhotse CutSet")
        return
    split = corpus.split or split_of(cuts)
    for source, obj in _lines(corpus, cuts):
        if isinstance(obj, Reject):
            yield obj
            continue
        kind = obj.get("type")
        if kind not in ("MonoCut", "MultiCut"):
            what = f"a {kind}" if isinstance(kind, str) else "not a cut (no 'type')"
            yield Reject(
                corpus.name,
                source,
                _id(obj),
                "type",
                "unsupported_cut",
                f"{what}; the harvest reads MonoCut and MultiCut, whose audio is one recording",
            )
            continue
        cut = _parsed(corpus, source, obj, CUT_FIELDS, deserialize_item, kind)
        if isinstance(cut, Reject):
            yield cut
            continue
        assert isinstance(cut, MonoCut | MultiCut)
        yield from _cut(corpus, source, cut, split)


def _cut(corpus: CorpusConfig, source: str, cut, split: str) -> Iterator[Candidate | Reject]:
    """The candidates of one cut: one per supervision, or the cut itself when it has none."""
    sups = list(cut.supervisions)

    def reject_all(field: str, reason: str, detail: str) -> Iterator[Reject]:
        # A fault of the cut is a reject of each utterance it holds: none disappears without one.
        for i, s in enumerate(sups):
            yield Reject(corpus.name, source, s.id, f"supervisions[{i}].{field}", reason, detail)
        if not sups:
            yield Reject(corpus.name, source, cut.id, field, reason, detail)

    if cut.recording is None:
        yield from reject_all("recording", "missing_field", f"cut {cut.id} has no recording (features only?)")
        return
    rec = _recording(corpus, source, cut.recording)
    if isinstance(rec, Reject):
        yield from reject_all(rec.field, rec.reason, rec.detail)
        return
    start, duration = float(cut.start), float(cut.duration)
    if start < -TOLERANCE_S or start + duration > rec.duration_s + TOLERANCE_S:
        detail = (
            f"cut {cut.id} spans {start:.3f}s to {start + duration:.3f}s of recording {cut.recording.id}, "
            f"which lasts {rec.duration_s:.3f}s"
        )
        yield from reject_all("start", "segment_out_of_range", detail)
        return
    if not _channels_ok(cut.channel, rec):
        detail = (
            f"cut {cut.id} is on channel {cut.channel} of a recording with channels {list(rec.channels)}; "
            "the harvest downmixes every file to mono"
        )
        yield from reject_all("channel", "single_channel", detail)
        return
    if not sups:
        yield Candidate(
            cut.id,
            corpus.name,
            split,
            rec.audio_path,
            None,
            None,
            source,
            offset_s=start,
            duration_s=duration,
        )
        return
    for i, sup in enumerate(sups):
        bad = _wrong(lambda k, sup=sup: getattr(sup, k, None), SUPERVISION_FIELDS, "SupervisionSegment")
        if bad is not None:
            key, reason, detail = bad
            yield Reject(corpus.name, source, _id(sup.__dict__), f"supervisions[{i}].{key}", reason, detail)
            continue
        if sup.recording_id != cut.recording.id:
            yield Reject(
                corpus.name,
                source,
                sup.id,
                f"supervisions[{i}].recording_id",
                "unknown_recording",
                f"supervision {sup.id} names recording {sup.recording_id!r}, its cut holds {cut.recording.id!r}",
            )
            continue
        yield _utterance(corpus, source, sup, rec, start + float(sup.start), split, f"supervisions[{i}].")
