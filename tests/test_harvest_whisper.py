"""Whisper pseudo-labels for audio without a transcript, with a tiny random-weight openai-whisper checkpoint.

The weights are random, so the words are noise: the tests check that the path runs end to end, that
each label records the checkpoint it came from, and that loading never unpickles arbitrary objects.
"""

import hashlib
import json
import pickle
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import whisper

from core.config import CorpusConfig
from core.tables import read_table
from schemas import REJECTS, TRANSCRIPTS
from stages.harvest.driver import harvest
from stages.harvest.pseudolabel import WhisperLabeler

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CV_MP3 = FIXTURES / "commonvoice-lhotse_mp3" / "clips" / "common_voice_en_651325.mp3"
JFK = FIXTURES / "jfk-openai_whisper" / "jfk.flac"

TINY = whisper.model.ModelDimensions(
    n_mels=80,
    n_audio_ctx=1500,  # fixed by the 30 s window
    n_audio_state=32,
    n_audio_head=2,
    n_audio_layer=1,
    n_vocab=51865,  # the multilingual tokenizer's size
    n_text_ctx=448,
    n_text_state=32,
    n_text_head=2,
    n_text_layer=1,
)


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = whisper.model.Whisper(TINY)
    path = tmp_path_factory.mktemp("whisper") / "tiny.pt"
    torch.save(
        {"dims": asdict(TINY), "model_state_dict": model.state_dict()}, path
    )  # openai-whisper's format
    return path


def test_audio_without_transcripts_is_labelled_with_the_checkpoint_hash(tmp_path, tiny_whisper):
    root = tmp_path / "folder"
    (root / "cv").mkdir(parents=True)
    shutil.copy(CV_MP3, root / "cv")  # Common Voice's own MP3, 48 kHz
    shutil.copy(JFK, root)  # 44.1 kHz stereo FLAC
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "jfk-segment", "audio": "jfk.flac:44100:88200"}) + "\n")
    corpora = [
        CorpusConfig(name="folder", kind="audio_folder", root=root),
        CorpusConfig(name="nolabels", kind="jsonl", root=root, manifest=manifest),
    ]
    s = harvest(corpora, tmp_path / "out", whisper_checkpoint=tiny_whisper, whisper_max_tokens=4)
    rows = {r["utt_id"]: r for r in read_table(tmp_path / "out" / "transcripts", TRANSCRIPTS).to_pylist()}
    rejects = read_table(tmp_path / "out" / "rejects.parquet", REJECTS).to_pylist()
    assert rejects == [] and sorted(rows) == ["common_voice_en_651325", "jfk", "jfk-segment"]
    source = "whisper:" + hashlib.sha256(tiny_whisper.read_bytes()).hexdigest()
    for r in rows.values():
        assert r["text_source"] == source and r["text_raw"]
    assert rows["jfk"]["sample_rate_hz"] == 44100 and rows["jfk"]["duration_s"] == pytest.approx(11.0)
    assert (rows["jfk-segment"]["offset_s"], rows["jfk-segment"]["duration_s"]) == (1.0, 2.0)
    assert rows["common_voice_en_651325"]["sample_rate_hz"] == 48000
    assert s.transcribed == 3

    again = harvest(corpora, tmp_path / "out", whisper_checkpoint=tiny_whisper, whisper_max_tokens=4)
    assert (again.transcribed, again.probed, again.reused) == (0, 0, 3)  # labels are kept, not redone


def test_checkpoint_with_pickled_objects_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"dims": Payload(), "model_state_dict": {}}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError):
        WhisperLabeler(path).transcribe([])
