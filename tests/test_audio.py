"""The shared audio loader on real clips: formats, resampling, downmixing, segments, header-only probing."""

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import LIBRISPEECH
from core import audio

FIXTURES = Path(__file__).resolve().parent / "fixtures"
JFK = FIXTURES / "jfk-openai_whisper" / "jfk.flac"  # 44.1 kHz, stereo, 24-bit, 11.000 s (its README)
CV_MP3 = FIXTURES / "commonvoice-lhotse_mp3" / "clips" / "common_voice_en_651325.mp3"  # 48 kHz mono MP3
FLAC = LIBRISPEECH / "dev-clean-2" / "1988" / "24833" / "1988-24833-0000.flac"  # 53120 samples at 16 kHz


def _bytes_read() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def test_jfk_stereo_44k_flac_is_downmixed_and_resampled_to_16k_mono():
    info = audio.probe(JFK)
    assert (info.sample_rate_hz, info.num_channels) == (44100, 2)
    assert info.duration_s == pytest.approx(11.0, abs=1e-3)
    x = audio.load(JFK)
    assert x.dtype == np.float32 and x.ndim == 1
    assert len(x) == pytest.approx(11.0 * 16000, abs=2)
    native = audio.load(JFK, sr=44100)  # no resampling: must be the mean of the two channels
    both, _ = sf.read(str(JFK), dtype="float32", always_2d=True)
    np.testing.assert_allclose(native, both.mean(axis=1), atol=1e-6)
    # resampling keeps the signal: same energy within a few percent
    assert float(np.sqrt((x**2).mean())) == pytest.approx(float(np.sqrt((native**2).mean())), rel=0.05)


def test_a_segment_matches_the_same_stretch_of_the_whole_file():
    whole = audio.load(JFK)
    seg = audio.load(JFK, offset_s=2.0, duration_s=3.0)
    assert len(seg) == pytest.approx(3.0 * 16000, abs=2)
    inner = slice(800, len(seg) - 800)  # away from the resampler's edges
    np.testing.assert_allclose(seg[inner], whole[32000:80000][inner], atol=2e-3)


def test_common_voice_mp3_decodes_at_its_native_48k():
    info = audio.probe(CV_MP3)
    assert info.sample_rate_hz == 48000 and info.num_channels == 1
    assert 2.0 < info.duration_s < 2.6  # the README's estimate from size and bitrate: about 2.3 s
    x = audio.load(CV_MP3)
    # MP3 length in the header is an estimate; decoders differ by the codec's padding (a few ms)
    assert len(x) == pytest.approx(info.duration_s * 16000, abs=160)
    assert np.abs(x).max() > 0.01


def test_opus_segment_is_the_same_stretch_as_in_the_whole_file(tmp_path):
    speech, sr = sf.read(str(FLAC), dtype="float32")
    long = np.tile(speech, 10)  # 33 s of real speech (opus encoding is slow: keep it short)
    path = tmp_path / "long.opus"
    sf.write(str(path), long, sr, format="OGG", subtype="OPUS")
    info = audio.probe(path)
    assert info.sample_rate_hz == sr  # the input rate the Ogg Opus header records
    assert info.duration_s == pytest.approx(len(long) / sr, abs=0.05)
    whole = audio.load(path)
    seg = audio.load(path, offset_s=25.0, duration_s=2.0)
    assert len(seg) == pytest.approx(32000, abs=2)
    inner = slice(800, 32000 - 800)
    np.testing.assert_allclose(seg[inner], whole[25 * 16000 : 27 * 16000][inner], atol=0.02)


def test_a_segment_of_a_long_flac_reads_only_near_the_segment(tmp_path):
    speech, sr = sf.read(str(FLAC), dtype="int16")
    path = tmp_path / "long.flac"
    sf.write(str(path), np.tile(speech, 180), sr)  # 10 min
    before = _bytes_read()
    seg = audio.load(path, offset_s=500.0, duration_s=2.0)
    read = _bytes_read() - before
    assert len(seg) == 32000
    assert read < path.stat().st_size / 10, f"read {read} of {path.stat().st_size} bytes for a 2 s segment"


def test_probe_reads_the_header_not_the_samples(tmp_path):
    speech, sr = sf.read(str(FLAC), dtype="int16")
    for fmt, name in (("WAV", "long.wav"), ("FLAC", "long.flac")):
        path = tmp_path / name
        sf.write(str(path), np.tile(speech, 120), sr, format=fmt)
        before = _bytes_read()
        info = audio.probe(path)
        read = _bytes_read() - before
        assert info.num_frames == len(speech) * 120
        assert read < 256 * 1024 < path.stat().st_size, f"{fmt}: probing read {read} bytes"


def test_bad_files_raise_with_the_reject_reason(tmp_path):
    with pytest.raises(audio.AudioError) as e:
        audio.probe(tmp_path / "nope.flac")
    assert e.value.reason == "missing_audio"
    (tmp_path / "zero.flac").write_bytes(b"")
    with pytest.raises(audio.AudioError) as e:
        audio.probe(tmp_path / "zero.flac")
    assert e.value.reason == "empty_audio"
    (tmp_path / "bad.flac").write_bytes(b"fLaC" + bytes(range(256)) * 4)
    with pytest.raises(audio.AudioError) as e:
        audio.probe(tmp_path / "bad.flac")
    assert e.value.reason == "corrupt_audio"
    sf.write(str(tmp_path / "silent.wav"), np.zeros(0, dtype="int16"), 16000)
    with pytest.raises(audio.AudioError) as e:
        audio.probe(tmp_path / "silent.wav")
    assert e.value.reason == "empty_audio"


def test_flac_header_fast_path_agrees_with_libsndfile_on_real_files():
    files = [JFK, *sorted(LIBRISPEECH.rglob("*.flac"))]
    for path in files:
        head = path.read_bytes()
        fast, lib = audio.flac_info(head), sf.info(str(path))
        assert fast is not None, path
        assert (fast.sample_rate_hz, fast.num_frames, fast.num_channels) == (
            lib.samplerate,
            lib.frames,
            lib.channels,
        )
        assert audio.probe(path, head) == audio.probe(path)
    head = JFK.read_bytes()
    assert audio.flac_info(head[:40]) is None  # too short to settle: libsndfile decides
    assert audio.flac_info(CV_MP3.read_bytes()) is None  # not FLAC


def test_bytes_in_memory_decode_as_the_same_file_on_disk_does(tmp_path):
    for path in (JFK, CV_MP3, FLAC):
        np.testing.assert_array_equal(audio.decode(path.read_bytes(), "upload"), audio.load(path))
    ogg = tmp_path / "tone.ogg"  # Ogg Vorbis at 22.05 kHz
    sf.write(str(ogg), 0.1 * np.sin(np.arange(22050) / 10).astype("float32"), 22050, format="OGG")
    assert len(audio.decode(ogg.read_bytes(), "upload")) == pytest.approx(16000, abs=2)


def test_bytes_that_are_no_audio_or_too_long_raise_naming_the_label():
    for data, reason in ((b"", "empty_audio"), (b"not audio at all", "corrupt_audio")):
        with pytest.raises(audio.AudioError) as e:
            audio.decode(data, "messages[0].content[1]")
        assert e.value.reason == reason
        assert "messages[0].content[1]" in str(e.value) and "BytesIO" not in str(e.value)
    with pytest.raises(audio.AudioError) as e:
        audio.decode(JFK.read_bytes(), "jfk", max_s=10.0)  # 11 s
    assert e.value.reason == "too_long" and "11.0 s" in e.value.detail
    assert len(audio.load(JFK, max_s=11.0)) == pytest.approx(11.0 * 16000, abs=2)
    with pytest.raises(audio.AudioError) as e:
        audio.load(JFK, 1.0, max_s=9.5)  # from 1 s to the end: 10 s
    assert e.value.reason == "too_long"
