"""What a corpus reader yields: a candidate utterance, or a reject with its reason."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Candidate:
    """An utterance as its corpus describes it, before its audio is probed.

    ``audio_path`` is the path as the corpus names it (joined to the corpus root, not yet resolved).
    ``text_raw`` None means the corpus has no transcript for it: Whisper may label it.
    """

    utt_id: str
    corpus: str
    split: str
    audio_path: str
    text_raw: str | None
    speaker: str | None
    source: str  # file:line (or file), for error messages and rejects
    offset_s: float = 0.0
    duration_s: float | None = None  # None: to the end of the file
    frames: tuple[int, int] | None = None  # (start, count) in the file's own samples, as the reference writes
    # Sample rate the corpus metadata declares, if any; the probed rate is what the table records.
    sample_rate_hz: int | None = None


# Every reason a harvest reject can give, with what it means. The full test suite checks both ways that this
# is the list (tests/conftest.py): a reject with a reason not here fails it, and so does a reason here that no
# test produces.
REASONS = {
    "bad_json": "a line or file that is not the JSON its format needs",
    "bad_row": "a CSV/TSV row or GigaSpeech segment of the wrong shape",
    "bad_header": "a Common Voice TSV without the columns it needs",
    "bad_manifest": "a lhotse manifest that cannot be read as one",
    "bad_recording": "a lhotse recording entry lhotse cannot parse",
    "bad_value": "a field whose value no row may hold (NaN or negative seconds, a float id, ...)",
    "missing_field": "a required field is absent",
    "missing_manifest": "the manifest file does not exist",
    "missing_corpus_root": "the corpus root does not exist",
    "missing_audio": "the audio file does not exist (or is a dangling link)",
    "outside_root": "the audio path resolves outside the corpus root",
    "non_utf8_transcript": "a transcript line that is not UTF-8",
    "unreadable_transcript": "a transcript file that cannot be read (a dangling link, no read permission)",
    "empty_transcript": "the transcript is empty (or Whisper heard no words)",
    "no_transcript": "no transcript, and harvest.whisper_checkpoint is not set",
    "garbage_utterance": "a GigaSpeech segment marked as music, noise or silence",
    "duplicate_utt_id": "an utterance id seen before in this harvest",
    "duplicate_recording_id": "a lhotse recording id seen before",
    "unknown_recording": "a lhotse supervision or cut naming no known recording",
    "unsupported_source": "a lhotse audio source that is not a file (url, command, memory)",
    "unsupported_transform": "a lhotse transform other than Resample",
    "unsupported_cut": "a lhotse cut that is neither a MonoCut nor a MultiCut (a MixedCut, or no type)",
    "single_channel": "a lhotse supervision on one channel of a multi-channel recording (the harvest downmixes)",
    "corrupt_audio": "audio bytes no decoder can read",
    "empty_audio": "audio with no samples (in the file, or in the segment)",
    "segment_out_of_range": "a segment that ends after its file does",
    "too_short": "shorter than harvest.min_duration_s",
    "too_long": "longer than harvest.max_duration_s (or Whisper's 30 s window when it labels)",
}


@dataclass(frozen=True, slots=True)
class Reject:
    corpus: str
    source: str
    utt_id: str | None
    field: str
    reason: str
    detail: str
    audio_path: str | None = None
    file_size: int | None = None
    file_mtime_ns: int | None = None
    file_sha256: str | None = None

    def __post_init__(self):
        if self.reason not in REASONS:
            raise ValueError(
                f"reject reason {self.reason!r} is not in stages.harvest.corpora.records.REASONS"
            )

    def row(self) -> dict:
        return {k: getattr(self, k) for k in self.__slots__}


@dataclass(frozen=True, slots=True)
class Unit:
    """A group of candidates that a rerun may take over whole: one LibriSpeech chapter, one folder.

    ``digest`` covers every file the group comes from (names, sizes, mtimes); if it
    equals the previous run's, the previous rows are copied without creating a single candidate, so
    a rerun over an unchanged corpus costs a directory listing. ``items`` is not iterated then.
    """

    key: str  # the directory's real path (``listing.walk`` yields no other kind)
    digest: str
    items: Iterator[Candidate | Reject]


def label(value: object) -> object:
    """An id or speaker as a row holds it: a string as it is, an integer (JSON's ``"speaker": 103``) as its
    decimal digits; anything else (a float, a bool, a list) comes back unchanged, for admission to reject
    with its type named rather than to be turned into text nobody wrote."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


BOM = b"\xef\xbb\xbf"  # UTF-8's byte-order mark


def decode(raw: bytes, corpus: str, source: str, utt_id: str | None = None) -> str | Reject:
    """UTF-8 text of one line, or a ``non_utf8_transcript`` reject naming where it came from. A byte-order mark
    at the start (what Windows editors and some exporters write first, and what concatenating such files leaves
    mid-file) is no part of the text."""
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        return Reject(corpus, source, utt_id, "text", "non_utf8_transcript", str(e))


def text_lines(path, corpus: str) -> Iterator[tuple[str, str | Reject]]:
    """``(source, line)`` for each non-blank line of a text file, ``source`` being ``path:lineno``; a line that
    is not UTF-8 comes as a ``non_utf8_transcript`` reject instead of its text."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            raw = raw.rstrip(b"\r\n")
            if raw.strip():
                source = f"{path}:{lineno}"
                yield source, decode(raw, corpus, source)


def missing(corpus: str, path, what: str) -> Reject:
    kind = "root" if what == "corpus root" else "manifest"
    reason = "missing_corpus_root" if kind == "root" else "missing_manifest"
    return Reject(corpus, str(path), None, kind, reason, f"{what} {what_is(path)}")


def what_is(path) -> str:
    """What is at ``path`` where a file (or a directory) was wanted, in words that say what to mend: missing, a
    dangling link (and to where), a directory, a fifo or device, unreadable."""
    path = os.fspath(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return f"{path} does not exist"
    except OSError as e:
        return f"{path} cannot be looked at ({e.strerror or e})"
    link = ""
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(path)
        try:
            st = os.stat(path)
        except OSError:
            return f"{path} is a dangling link (to {target}, which does not exist)"
        link = f" (a link to {target})"
    if stat.S_ISDIR(st.st_mode):
        return f"{path}{link} is a directory"
    if not stat.S_ISREG(st.st_mode):
        return f"{path}{link} is not a regular file (a fifo, socket or device)"
    return f"{path}{link} is a regular file"


def stem(path: str) -> str:
    """``Path(path).stem`` without building a Path: readers call it once per row of million-row manifests."""
    name = path.rstrip("/").rpartition("/")[2]
    i = name.rfind(".")
    return name[:i] if 0 < i < len(name) - 1 else name  # pathlib's rule: "a." and ".a" have no suffix


def join(root, path: str) -> str:
    """``root/path`` for the audio path of a manifest row; absolute paths are kept. Not normalized: the
    harvest resolves every path (and rejects one that leaves the root) before it is used."""
    if path.startswith("/"):
        return path
    root = os.fspath(root)
    return f"{root}{path}" if root.endswith("/") else f"{root}/{path}"
