"""Admission: everything harvest decides about a candidate without opening its audio.

For each candidate a reader yields, in order: its utterance id must be new, its transcript non-empty (or
Whisper configured to make one), its audio path must resolve inside the corpus root to an existing file.
Then either the previous run's row can be kept as it is (same candidate, same file bytes), or a byte-level
reject of the same file is kept, or the file goes to the probe. A whole unit (a LibriSpeech chapter) whose
listing is unchanged is taken over as a run of previous rows without looking at one candidate.

What admission decides lands in a ``Chunk``: its ``entries`` keep reader order (runs of previous rows, new
rows), its ``probes`` the files to open, its ``rejects`` the rejects with the unit they came from.
"""

from __future__ import annotations

import hashlib
import math
import os
import stat
from concurrent.futures import Future
from dataclasses import dataclass, field

from core.config import CorpusConfig
from stages.harvest.corpora.records import Candidate, Reject, Unit, what_is
from stages.harvest.previous import Previous, PrevRow
from stages.harvest.probe import FileProbe, sha256_of


@dataclass(slots=True)
class PrevRows:
    """Rows ``first`` to ``first + count`` of the previous table, kept as they are."""

    first: int
    count: int
    unit: int  # index into ``Admission.units``; -1: no unit


@dataclass(slots=True)
class NewRow:
    """A row made in this run: ``Chunk.new_rows[pos]`` (None until its probe comes back)."""

    pos: int
    unit: int


@dataclass(slots=True)
class Probe:
    """A file to open: the candidate, its resolved path, and its size and mtime as listed."""

    candidate: Candidate
    path: str
    size: int
    mtime_ns: int


@dataclass(slots=True)
class UnitRecord:
    """One unit of this run: where its rows start in the new table, how many, and how many rejects."""

    key: str
    digest: str
    first_row: int | None = None
    rows: int = 0
    rejects: int = 0


@dataclass
class Chunk:
    """A batch of candidates on their way through admission, the probe and into the table."""

    entries: list[PrevRows | NewRow] = field(default_factory=list)  # reader order
    new_rows: list[dict | None] = field(default_factory=list)
    probes: list[Probe] = field(default_factory=list)
    rejects: list[tuple[Reject, int]] = field(default_factory=list)  # with the unit it came from
    dropped: set[int] = field(default_factory=set)  # positions of new rows that became rejects
    future: Future | None = None
    results: list[tuple[FileProbe, tuple[str | None, str | None]]] | None = None
    listed: int = 0  # candidates and reader rejects this chunk accounts for


def bounds(duration: float, max_s: float, min_s: float) -> tuple[str, str] | None:
    """A duration reject (reason, detail), or None when ``duration`` is inside the harvest's bounds."""
    if duration > max_s:
        return "too_long", f"{duration:.2f}s is longer than the {max_s}s bound"
    if duration < min_s:
        return "too_short", f"{duration:.2f}s is shorter than the {min_s}s bound"
    return None


def bad_value(c: Candidate) -> tuple[str, str] | None:
    """The first field of ``c`` a reader let through with a value no row may hold: (field, detail), or None.

    Readers parse their own formats; this is the one check every candidate passes, whatever read it, so a
    NaN offset or a numeric id in any manifest is a ``bad_value`` reject here, not a crash hours later in
    the loader (``float('nan')`` seeks nowhere) or in the Parquet writer (an int where a string belongs).
    """
    if not isinstance(c.utt_id, str) or not c.utt_id:
        return (
            "utt_id",
            f"the utterance id is {c.utt_id!r} ({type(c.utt_id).__name__}), not a non-empty string",
        )
    if c.speaker is not None and not isinstance(c.speaker, str):
        return "speaker", f"the speaker is {c.speaker!r} ({type(c.speaker).__name__}), not a string"
    if c.text_raw is not None and not isinstance(c.text_raw, str):
        return "text", f"the transcript is a {type(c.text_raw).__name__}, not a string"
    for name, v in (("offset_s", c.offset_s), ("duration_s", c.duration_s)):
        if v is None and name == "duration_s":
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return name, f"{name} is {v!r}, not a finite number of seconds"
        if v < 0 or (name == "duration_s" and v == 0):
            return name, f"{name} is {v!r}; it must be {'positive' if name == 'duration_s' else 'at least 0'}"
    return None


def file_fields(real: str, size: int | None, mtime_ns: int | None, sha: str | None) -> dict:
    """The audio file's identity as a row or a reject records it."""
    return dict(audio_path=real, file_size=size, file_mtime_ns=mtime_ns, file_sha256=sha)


class Admission:
    """The state that admission keeps across a run: ids seen, units, the previous tables."""

    def __init__(
        self,
        prev: Previous,
        max_s: float,
        min_s: float,
        labeler_source: str | None,
        content_hash: bool,
        cut_long: bool = False,
    ):
        self.prev = prev
        self.max_s, self.min_s = max_s, min_s
        self.cut_long = cut_long  # longer audio is cut to max_s (by the prober), not rejected
        self.cut = 0
        self.labeler_source = labeler_source  # None: no Whisper, so a candidate without text is a reject
        self.content_hash = content_hash
        self.seen: dict[str, str | int] = {}  # utterance id -> where it came from (see ``_packed``)
        self.units: list[UnitRecord] = []
        self.reused = 0  # rows (and byte-level rejects) taken over from the previous run
        self._files: dict[str, int] = {}  # the files that sources name, numbered for ``_packed``
        self._dir_cache: dict[str, str] = {}
        self._settings: dict[int, str] = {}  # each corpus's settings as JSON, part of every unit's digest
        self._hash_cache: tuple[str, str] | None = None

    def bounds(self, duration: float) -> tuple[str, str] | None:
        return bounds(duration, self.max_s, self.min_s)

    # ----- units: whole directories taken over from the previous run -----

    def start_unit(self, unit: Unit, corpus: CorpusConfig, chunk: Chunk) -> bool:
        """Copy an unchanged unit's rows from the previous table; False if its candidates must be read."""
        # The corpus settings (split, text field, ...) shape the rows as much as the files do, and the
        # rows hold resolved paths: the unit's key is its directory's real path, so a directory now reached
        # through another link is another unit.
        key = f"{corpus.name}:{unit.key}"
        settings = self._settings.get(id(corpus))
        if settings is None:
            settings = self._settings[id(corpus)] = corpus.model_dump_json()
        sig = f"{settings}\0{unit.key}\0{unit.digest}"
        digest = hashlib.blake2b(sig.encode(), digest_size=16).hexdigest()
        self.units.append(UnitRecord(key, digest))
        old = self.prev.units.get(key)
        if old is None or old[0] != digest or self.prev.file is None:
            return False
        _, first, n = old
        ids = self.prev.values("utt_id", first, n)
        if not self.seen.keys().isdisjoint(ids):  # a duplicate id: let the per-row path say which
            return False
        durations = self.prev.values("duration_s", first, n)
        if self.bounds(min(durations)) or self.bounds(max(durations)):
            return False
        self.seen.update(dict.fromkeys(ids, f"{unit.key} (unchanged since the previous run)"))
        self.prev.take(first, n)
        chunk.entries.append(PrevRows(first, n, len(self.units) - 1))
        chunk.listed += n
        self.reused += n
        return True

    # ----- single candidates -----

    def _packed(self, source: str) -> str | int:
        """``FILE:LINE`` as one int (file number << 40 | line), any other source as it is.

        ``seen`` holds a source for every id, only to say where a duplicate's first came from. As text a
        source took about 80 bytes a row, as an int 32: 3 million rows of a manifest hold 150 MB less.
        """
        file, sep, line = source.rpartition(":")
        if not (
            sep and line.isascii() and line.isdigit() and len(line) < 12 and (line[0] != "0" or line == "0")
        ):
            return source
        number = self._files.get(file)
        if number is None:
            number = self._files[file] = len(self._files)
        return number << 40 | int(line)

    def _where(self, packed: str | int) -> str:
        if isinstance(packed, str):
            return packed
        files = list(self._files)  # only for a duplicate: rare
        return f"{files[packed >> 40]}:{packed & (1 << 40) - 1}"

    def _resolve(self, path: str, root: str) -> tuple[str, os.stat_result | None, str | None]:
        """The real path, its stat (None if missing) and a reject reason, with one realpath per directory."""
        d, slash, name = path.rpartition("/")
        if slash and not d:
            d = "/"
        rd = self._dir_cache.get(d)
        if rd is None:
            if len(self._dir_cache) > 65536:
                self._dir_cache.clear()
            rd = self._dir_cache[d] = os.path.realpath(d)
        real = f"{rd}/{name}"
        try:
            st = os.lstat(real)
            if stat.S_ISLNK(st.st_mode):
                real = os.path.realpath(real)
                st = os.stat(real)
        except OSError:
            st = None
            real = os.path.realpath(real)
        if not (real.startswith(root + os.sep) or real == root):
            return real, st, "outside_root"
        if st is None or not stat.S_ISREG(st.st_mode):
            return real, None, "missing_audio"
        return real, st, None

    def same_bytes(self, path: str, size: int, mtime: int, p_size, p_mtime, p_sha) -> bool:
        """Whether a file is the one the previous run probed: same size, and same mtime or same SHA-256."""
        if size != p_size:
            return False
        if mtime == p_mtime:
            return True
        if not (self.content_hash and p_sha):
            return False
        if self._hash_cache is None or self._hash_cache[0] != path:
            self._hash_cache = (path, sha256_of(path))
        return self._hash_cache[1] == p_sha

    def _reusable(self, c: Candidate, real: str, st: os.stat_result) -> tuple[int, PrevRow] | None:
        """The previous row of this candidate (its position and fields) if it can be kept as is."""
        found = self.prev.find(c.utt_id)
        if found is None:
            return None
        i, r = found
        if (r.audio_path, r.corpus, r.split, r.speaker) != (real, c.corpus, c.split, c.speaker):
            return None
        if c.text_raw is None:
            if self.labeler_source is None or r.text_source != self.labeler_source:
                return None
        elif r.text_source != "corpus" or r.text_raw != c.text_raw:
            return None
        if c.frames is not None:
            sr = r.sample_rate_hz
            if (r.offset_s, r.duration_s) != (c.frames[0] / sr, c.frames[1] / sr):
                return None
        elif r.offset_s != c.offset_s or (c.duration_s is not None and r.duration_s != c.duration_s):
            return None
        if not self.same_bytes(real, st.st_size, st.st_mtime_ns, r.file_size, r.file_mtime_ns, r.file_sha256):
            return None
        return i, r

    def admit(self, c: Candidate, root: str, chunk: Chunk, unit: int) -> None:
        """Decide what becomes of one candidate: a reject, a kept previous row, or a file to probe."""
        chunk.listed += 1

        def reject(field: str, reason: str, detail: str, **file) -> None:
            chunk.rejects.append((Reject(c.corpus, c.source, c.utt_id, field, reason, detail, **file), unit))

        bad = bad_value(c)
        if bad is not None:
            if bad[0] == "utt_id":  # the reject's own utt_id column holds strings only
                chunk.rejects.append((Reject(c.corpus, c.source, None, bad[0], "bad_value", bad[1]), unit))
                return
            return reject(bad[0], "bad_value", bad[1])
        if c.utt_id in self.seen:
            first = self._where(self.seen[c.utt_id])
            return reject("utt_id", "duplicate_utt_id", f"{c.utt_id} already came from {first}")
        self.seen[c.utt_id] = self._packed(c.source)
        if c.text_raw is not None and not c.text_raw.strip():
            return reject("text", "empty_transcript", "the transcript is empty")
        if c.text_raw is None and self.labeler_source is None:
            return reject(
                "text",
                "no_transcript",
                "the corpus has no transcript for this audio and harvest.whisper_checkpoint is not set",
            )
        real, st, why = self._resolve(c.audio_path, root)
        if why == "outside_root":
            return reject("audio", why, f"{c.audio_path} resolves to {real}, outside the corpus root {root}")
        if why == "missing_audio":
            return reject("audio", why, what_is(c.audio_path), audio_path=real)
        found = self._reusable(c, real, st)
        if found is not None:
            i, r = found
            self.reused += 1
            bound = self.bounds(r.duration_s)  # the bounds may have changed since
            if bound:
                return reject("audio", *bound, **file_fields(real, st.st_size, st.st_mtime_ns, r.file_sha256))
            if st.st_mtime_ns != r.file_mtime_ns:  # touched, same bytes: record the new mtime
                row = self.prev.rows(i, 1).to_pylist()[0]
                row["file_mtime_ns"] = st.st_mtime_ns
                chunk.entries.append(NewRow(len(chunk.new_rows), unit))
                chunk.new_rows.append(row)
            else:
                chunk.entries.append(PrevRows(i, 1, unit))
            return
        old = self.prev.byte_rejects.get(real)
        if old is not None and self.same_bytes(real, st.st_size, st.st_mtime_ns, *old[:3]):
            self.reused += 1
            return reject("audio", old[3], old[4], **file_fields(real, st.st_size, st.st_mtime_ns, old[2]))
        chunk.entries.append(NewRow(len(chunk.new_rows), unit))
        chunk.new_rows.append(None)  # filled when the probe comes back
        chunk.probes.append(Probe(c, real, st.st_size, st.st_mtime_ns))

    def reject(self, r: Reject, chunk: Chunk, unit: int) -> None:
        """A reject a reader yielded (a bad line, a missing manifest)."""
        chunk.rejects.append((r, unit))
        chunk.listed += 1
