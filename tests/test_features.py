"""Our torch log-mel against Hugging Face's WhisperFeatureExtractor on real clips."""

from pathlib import Path

import numpy as np
import pytest
from transformers import WhisperFeatureExtractor

from core import audio
from core.lsm.features import log_mel

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"
# The reference's collator runs the extractor's numpy path; torch's path differs from it by float32 rounding.
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def clips():
    files = sorted(DEMO.rglob("*.flac"))[:5] + sorted((DEMO / "LJSpeech-1.1").rglob("*.wav"))[:2]
    out = [audio.load(f) for f in files]
    # one clip longer than Whisper's 30 s window: both must cut it the same way
    out.append(np.concatenate([out[0]] * 12)[: 16_000 * 35])
    return out


def _numpy_extractor(n_mels: int) -> WhisperFeatureExtractor:
    fe = WhisperFeatureExtractor(feature_size=n_mels)
    fe._torch_extract_fbank_features = fe._np_extract_fbank_features  # the reference's numpy path
    return fe


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_padded_to_30s_matches_whisper_feature_extractor(clips, n_mels):
    ours, lengths = log_mel(clips, n_mels=n_mels, pad_to="30s")
    assert ours.dtype.is_floating_point and ours.shape == (len(clips), n_mels, 3000)
    for fe in (_numpy_extractor(n_mels), WhisperFeatureExtractor(feature_size=n_mels)):
        ref = fe(clips, sampling_rate=16_000, return_tensors="np").input_features
        assert ref.shape == tuple(ours.shape)
        assert np.abs(ref - ours.numpy()).max() < TOLERANCE
    assert lengths.tolist() == [min(len(c), 480_000) // 160 for c in clips]


def test_log_mel_for_a_shorter_chunk_matches_an_extractor_of_that_chunk(clips):
    """A tiny Whisper may take 5 s instead of 30 (the learning check's): cut and padding follow its chunk."""
    ours, lengths = log_mel(clips, pad_to="30s", chunk_s=5)
    ref = WhisperFeatureExtractor(chunk_length=5)(
        clips, sampling_rate=16_000, return_tensors="np"
    ).input_features
    assert ref.shape == tuple(ours.shape) == (len(clips), 80, 500)
    assert np.abs(ref - ours.numpy()).max() < TOLERANCE
    assert lengths.tolist() == [min(len(c), 80_000) // 160 for c in clips]


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_padded_to_the_longest_clip_matches_whisper_feature_extractor(clips, n_mels):
    batch = clips[:4]
    ours, _ = log_mel(batch, n_mels=n_mels, pad_to="longest")
    fe = _numpy_extractor(n_mels)
    ref = fe(batch, sampling_rate=16_000, padding="longest", return_tensors="np").input_features
    assert ref.shape == tuple(ours.shape) and ours.shape[-1] == max(len(c) for c in batch) // 160
    assert np.abs(ref - ours.numpy()).max() < TOLERANCE
    # a clip's features do not depend on its batch-mates (the floor is per clip); only its last two frames,
    # whose windows reach past its end, see the STFT's reflection alone and zeros in a batch
    alone, _ = log_mel([batch[0]], n_mels=n_mels, pad_to="longest")
    n = alone.shape[-1] - 2
    assert np.abs(alone[0, :, :n].numpy() - ours[0, :, :n].numpy()).max() < TOLERANCE


def test_log_mel_rejects_a_bad_padding_option(clips):
    with pytest.raises(ValueError, match="pad_to"):
        log_mel(clips[:1], pad_to="20s")
