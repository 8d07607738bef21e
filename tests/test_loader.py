"""The streaming loader over real shards of real clips: partition, shuffle, batching, resume, bad audio."""

import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from transformers import WhisperFeatureExtractor

from core.config import BuildConfig, LoaderConfig
from core.lsm.features import log_mel
from core.lsm.loader import ExampleLoader
from core.paths import WorkPaths
from core.tables import read_table
from schemas import TRANSCRIPTS
from stages.build.examples import example_id
from stages.build.shards import write_shards

N_ROWS = 48


def _rows(transcripts: Path, n: int, split: str = "train") -> list[dict]:
    """``n`` examples cycling over the real harvested clips, each with its own id."""
    tr = read_table(transcripts, TRANSCRIPTS).to_pylist()
    rows = []
    for i in range(n):
        t = tr[i % len(tr)]
        rows.append(
            dict(
                example_id=example_id(t["utt_id"], "asr", str(i)),
                utt_id=t["utt_id"],
                split=split,
                task="asr",
                instruction="Transcribe the speech",
                prefix="USER: Transcribe the speech SPEECH:",
                suffix=" ASSISTANT:",
                answer=t["text"],
                transcript=t["text"],
                audio_path=t["audio_path"],
                offset_s=t["offset_s"],
                duration_s=t["duration_s"],
                speaker=t["speaker"],
            )
        )
    return rows


@pytest.fixture(scope="module")
def shards(harvested, tmp_path_factory) -> Path:
    """Real shards (written by the build stage's writer): a train split in 4 shards of 4-row groups, and a dev split."""
    rows = _rows(WorkPaths(harvested).harvest.transcripts, N_ROWS)
    rows += _rows(WorkPaths(harvested).harvest.transcripts, 5, split="dev")
    out = tmp_path_factory.mktemp("shards") / "shards"
    write_shards(rows, out, BuildConfig(rows_per_shard=15, row_group_rows=4))
    return out


def _ids(batches) -> list[str]:
    return [r["example_id"] for b in batches for r in b["rows"]]


def _opts(**kw):
    return dict(seed=3, batch_seconds=40.0, max_batch_size=4, shuffle_buffer=16, pad_to="longest") | kw


def test_two_ranks_of_two_workers_see_every_row_exactly_once_per_epoch(shards):
    all_ids = {
        r["example_id"] for r in _rows_from(shards, "train")
    }  # what build wrote, read back from the shards themselves
    assert len(all_ids) == N_ROWS
    per_epoch = []
    for epoch in range(2):
        seen = []
        for rank in range(2):
            loader = ExampleLoader(shards, "train", rank=rank, world_size=2, num_workers=2, **_opts())
            loader.set_epoch(epoch)
            got = _ids(list(loader))
            assert len(got) == loader.num_rows
            seen += got
        assert Counter(seen) == Counter(all_ids)  # every row once: no loss, no overlap
        per_epoch.append(seen)
    assert per_epoch[0] != per_epoch[1]  # a new epoch, a new order


def test_the_plan_counts_each_ranks_batches_without_reading_audio(shards):
    for epoch in range(2):
        counts = []
        for rank in range(2):
            loader = ExampleLoader(shards, "train", rank=rank, world_size=2, num_workers=2, **_opts())
            loader.set_epoch(epoch)
            counts.append(len(list(loader)))  # the batches this rank really delivers
        # every rank computes the same list from the metadata alone
        for rank in range(2):
            other = ExampleLoader(shards, "train", rank=rank, world_size=2, num_workers=2, **_opts())
            assert other.batches_per_rank(epoch) == counts


def _rows_from(shards: Path, split: str) -> list[dict]:
    import pyarrow.parquet as pq

    rows = []
    for f in sorted(shards.glob("*.parquet")):
        if f.name != "manifest.parquet":
            rows += [r for r in pq.read_table(f).to_pylist() if r["split"] == split]
    return rows


def test_the_order_is_deterministic_per_seed_and_epoch(shards):
    def order(seed, epoch):
        loader = ExampleLoader(shards, "train", **_opts(seed=seed))
        loader.set_epoch(epoch)
        return _ids(list(loader))

    a, b = order(3, 0), order(4, 0)
    assert a == order(3, 0) and sorted(a) == sorted(b)
    assert a != b and a != order(3, 1)


def test_batches_follow_the_duration_budget(shards):
    loader = ExampleLoader(shards, "train", **_opts(batch_seconds=30.0, max_batch_size=3))
    sizes = []
    for b in loader:
        n = len(b["rows"])
        sizes.append(n)
        durs = [min(r["duration_s"], 30.0) for r in b["rows"]]
        assert n <= 3 and (n == 1 or n * max(durs) <= 30.0)
        assert b["batch"].input_features.shape == (n, 80, b["batch"].feature_lengths.max().item())
        assert np.allclose(b["batch"].durations_s.numpy(), durs, atol=1e-3)
    assert sum(sizes) == N_ROWS and len(set(sizes)) > 1


def test_a_resumed_epoch_continues_exactly_where_it_stopped(shards):
    opts = _opts(num_workers=2)
    full = list(ExampleLoader(shards, "train", rank=1, world_size=2, **opts))
    first = ExampleLoader(shards, "train", rank=1, world_size=2, **opts)
    head = []
    for b in first:
        head.append(b)
        if len(head) == 3:  # an odd count: the two workers have delivered unequal numbers of batches
            break
    state = first.state_dict()
    resumed = ExampleLoader(shards, "train", rank=1, world_size=2, **opts)
    resumed.load_state_dict(state)
    tail = list(resumed)
    assert _ids(head + tail) == _ids(full)
    assert all(
        np.array_equal(a["batch"].input_features.numpy(), b["batch"].input_features.numpy())
        for a, b in zip(head + tail, full, strict=True)
    )
    assert resumed.state_dict()["epoch"] == 1  # a finished pass moves on to the next epoch
    with pytest.raises(ValueError, match="num_workers is 2 in the saved state but 0 here"):
        ExampleLoader(shards, "train", rank=1, world_size=2, **(opts | {"num_workers": 0})).load_state_dict(
            state
        )


def test_features_in_a_batch_equal_whisper_feature_extractor_padded_to_30s(shards):
    loader = ExampleLoader(shards, "dev", **_opts(pad_to="30s", batch_seconds=150.0, max_batch_size=5))
    (b,) = list(loader)
    from core import audio

    clips = [audio.load(r["audio_path"], r["offset_s"], r["duration_s"]) for r in b["rows"]]
    ref = WhisperFeatureExtractor()(clips, sampling_rate=16_000, return_tensors="np").input_features
    assert b["batch"].input_features.shape == (5, 80, 3000)
    assert np.abs(ref - b["batch"].input_features.numpy()).max() < 1e-4


def test_an_unreadable_clip_is_skipped_with_a_counted_warning(harvested, tmp_path):
    rows = _rows(WorkPaths(harvested).harvest.transcripts, 12)
    corrupt = tmp_path / "corrupt.flac"
    corrupt.write_bytes(b"fLaC not really a flac file")
    rows[2]["audio_path"] = str(corrupt)
    rows[7]["audio_path"] = str(tmp_path / "gone.flac")
    # values no harvest writes, in a table someone else made: a segment nowhere in any file
    rows[4]["offset_s"] = float("nan")
    rows[9]["duration_s"] = -1.0
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"RIFF\xff\xff\xff\x7fWAVEfmt \x10\x00\x00\x00\x01\x00\x01\x00" + bytes(40))
    rows[11]["audio_path"] = str(garbage)
    write_shards(rows, tmp_path / "shards", BuildConfig(row_group_rows=5))
    loader = ExampleLoader(tmp_path / "shards", "train", **_opts(max_batch_size=2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(loader)
    bad = {rows[i]["example_id"] for i in (2, 4, 7, 9, 11)}
    assert sorted(_ids(batches)) == sorted(r["example_id"] for r in rows if r["example_id"] not in bad)
    assert sum(b["skipped"] for b in batches) == 5
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any(rows[2]["example_id"] in m and "corrupt.flac" in m for m in messages)
    assert any(rows[7]["example_id"] in m and "gone.flac" in m for m in messages)
    assert any(rows[4]["example_id"] in m and "bad_segment" in m for m in messages)
    assert any(rows[9]["example_id"] in m and "bad_segment" in m for m in messages)
    assert any(rows[11]["example_id"] in m and "garbage.wav" in m for m in messages)


def test_tokens_come_from_the_tokenizer_and_the_config_builds_a_loader(shards, tiny_models_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_models_dir / "llm")
    cfg = LoaderConfig(num_workers=0, batch_seconds=150.0)
    (b,) = list(
        ExampleLoader.from_config(shards, cfg, split="dev", tokenizer=tok, max_batch_size=5, pad_to="longest")
    )
    r = b["rows"][0]
    assert b["batch"].answer_ids[0] == tok(r["answer"], add_special_tokens=False)["input_ids"] + [
        tok.eos_token_id
    ]
    assert tok.decode(b["batch"].prefix_ids[0], skip_special_tokens=True).strip() == r["prefix"]


def test_a_split_with_no_rows_is_a_clear_error(shards):
    with pytest.raises(ValueError, match="no rows with split 'test'"):
        ExampleLoader(shards, "test")


def test_a_48k_mp3_clip_goes_through_the_shared_audio_loader(harvested, tmp_path):
    import soundfile as sf
    import soxr

    rows = _rows(WorkPaths(harvested).harvest.transcripts, 1)
    x, sr = sf.read(rows[0]["audio_path"], dtype="float32")
    mp3 = tmp_path / "clip-48k.mp3"  # Common Voice's format
    sf.write(mp3, soxr.resample(x, sr, 48_000), 48_000, format="MP3")
    rows[0]["audio_path"] = str(mp3)
    write_shards(rows, tmp_path / "shards", BuildConfig())
    (b,) = list(ExampleLoader(tmp_path / "shards", "train", **_opts()))
    assert b["skipped"] == 0 and abs(b["batch"].durations_s[0].item() - len(x) / sr) < 0.01
    direct, _ = log_mel([x if sr == 16_000 else soxr.resample(x, sr, 16_000)], pad_to="longest")
    n = min(direct.shape[-1], b["batch"].input_features.shape[-1]) - 2
    # mp3 is lossy: the features are close to the original's, not equal
    assert (b["batch"].input_features[0, :, :n] - direct[0, :, :n]).abs().mean() < 0.1
