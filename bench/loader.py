"""Benchmark: utterances/s of our loader against the reference's collator path, on the same clips.

The reference path (``SpeechTextPairedDataCollator`` of the reference): read each clip with soundfile,
resample to 16 kHz, then ``WhisperFeatureExtractor`` on its numpy path, padded to 30 s, 12 clips a batch.
The reference resamples with torchaudio's sox effect, which this environment does not have; both paths
resample with soxr here, so the difference measured is the feature path and the streaming around it.
Ours: ``ExampleLoader`` over build-stage shards of the same clips, ``pad_to="30s"`` (equal features).

Clips: the bundled LibriSpeech clips (16 kHz flac; the goal is measured on these, as the issue's baseline
was), and a mixed set adding LJSpeech (22.05 kHz wav) and each LibriSpeech clip re-encoded as 48 kHz mp3
(Common Voice's format), each repeated to ``--utts`` utterances. Reference and ours run alternately so
both see the same background load.

Figures: utterances/s from the first batch to the last (process start-up is paid once per run, not per
batch), per core (one process, one torch thread) and with DataLoader workers. The 16-worker
figure is measured when the machine has 16 cores, else extrapolated from the per-worker rate (said so).

    .venv/bin/python bench/loader.py [--utts 72] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import soxr  # noqa: E402
import torch  # noqa: E402
from transformers import WhisperFeatureExtractor  # noqa: E402

from core.config import BuildConfig  # noqa: E402
from core.lsm.loader import ExampleLoader  # noqa: E402
from stages.build.examples import example_id  # noqa: E402
from stages.build.shards import write_shards  # noqa: E402

DEMO = REPO / "data" / "demo"
REF_BATCH = 12  # the reference's per-GPU batch


def make_clips(tmp: Path) -> list[Path]:
    files = sorted((DEMO / "LibriSpeech").rglob("*.flac")) + sorted((DEMO / "LJSpeech-1.1").rglob("*.wav"))
    for f in sorted((DEMO / "LibriSpeech").rglob("*.flac")):
        x, sr = sf.read(f, dtype="float32")
        mp3 = tmp / f"{f.stem}-48k.mp3"
        sf.write(mp3, soxr.resample(x, sr, 48_000), 48_000, format="MP3")
        files.append(mp3)
    return files


def make_shards(files: list[Path], n: int, tmp: Path) -> Path:
    rows = []
    for i in range(n):
        f = files[i % len(files)]
        info = sf.info(f)
        rows.append(
            dict(
                example_id=example_id(f.stem, "asr", str(i)),
                utt_id=f.stem,
                split="train",
                task="asr",
                instruction="Transcribe the speech",
                prefix="USER: Transcribe the speech SPEECH:",
                suffix=" ASSISTANT:",
                answer="x",
                transcript="x",
                audio_path=str(f),
                offset_s=0.0,
                duration_s=info.frames / info.samplerate,
                speaker=None,
            )
        )
    write_shards(rows, tmp / "shards", BuildConfig(row_group_rows=16))
    return tmp / "shards"


# ----- the reference's path -----


def ref_read(path: str) -> np.ndarray:
    x, sr = sf.read(path, dtype="float32", always_2d=True)
    x = x.T.mean(axis=0)
    return soxr.resample(x, sr, 16_000, quality="HQ") if sr != 16_000 else x


def ref_extractor() -> WhisperFeatureExtractor:
    fe = WhisperFeatureExtractor()
    fe._torch_extract_fbank_features = fe._np_extract_fbank_features  # the numpy path the reference ran
    return fe


class RefDataset(torch.utils.data.Dataset):
    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.paths[i]


class RefCollator:
    def __init__(self):
        self.fe = ref_extractor()

    def __call__(self, paths):
        raw = [ref_read(p) for p in paths]
        return self.fe(raw, sampling_rate=16_000, return_tensors="pt").input_features


def steady_rate(batches, size) -> tuple[float, float]:
    """(utterances per wall second, per CPU second of this process), from the first batch to the last:
    start-up is paid once per run, not per batch. With no workers, this process does all the work, so
    the CPU-time rate is the per-core rate, and other processes on a shared machine do not change it."""
    it = iter(batches)
    next(it)
    t0, c0, n = time.perf_counter(), time.process_time(), 0
    for b in it:
        n += size(b)
    return n / (time.perf_counter() - t0), n / max(time.process_time() - c0, 1e-9)


def run_reference(paths: list[str], workers: int) -> float:
    dl = torch.utils.data.DataLoader(
        RefDataset(paths), batch_size=REF_BATCH, collate_fn=RefCollator(), num_workers=workers
    )
    return steady_rate(dl, lambda b: b.shape[0])


def run_ours(shards: Path, workers: int) -> float:
    loader = ExampleLoader(
        shards,
        "train",
        num_workers=workers,
        seed=1,
        pad_to="30s",
        batch_seconds=REF_BATCH * 30,
        max_batch_size=REF_BATCH,
        prefetch_batches=4,
    )
    return steady_rate(loader, lambda b: len(b["batch"]))


def side_by_side(ref, ours, runs: int) -> tuple[list, list]:
    """``runs`` alternating runs of each, so that both paths see the same background load."""
    r_all, o_all = [], []
    for _ in range(runs):
        r_all.append(ref())
        o_all.append(ours())
    return r_all, o_all


def med(xs: list[tuple[float, float]], i: int) -> float:
    return statistics.median(x[i] for x in xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--utts", type=int, default=72)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="*", default=None, help="default: 1, 2, ... up to the cores")
    a = ap.parse_args()
    torch.set_num_threads(1)  # per-core figures: one thread in this process (DataLoader workers use one each)
    cores = os.cpu_count() or 1
    workers = a.workers or sorted({1, 2, min(cores, 16)} & set(range(1, cores + 1)))

    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        files = make_clips(tmp)
        sets = {
            # the baseline: LibriSpeech clips (16 kHz flac), the reference's training corpus
            "librispeech": [f for f in files if f.suffix == ".flac"],
            # plus LJSpeech 22.05 kHz wav and Common Voice-like 48 kHz mp3, which must be resampled
            "mixed": files,
        }
        print(
            f"{a.utts} utterances per set, {a.runs} alternating runs per figure, medians; {cores} cores, "
            "torch threads 1 per process. 'cpu' columns: utterances per CPU second of the one process doing "
            "all the work (the per-core rate); 'wall': per elapsed second."
        )
        results = {}
        print(
            f"\n{'set':<12} {'setting':<11} {'ref wall':>9} {'ours wall':>10} {'ref cpu':>8} {'ours cpu':>9} "
            f"{'speed-up (cpu)':>15}   wall runs (ref | ours)"
        )
        for name, clip_files in sets.items():
            (tmp / name).mkdir()
            shards = make_shards(clip_files, a.utts, tmp / name)
            paths = [str(clip_files[i % len(clip_files)]) for i in range(a.utts)]
            run_ours(shards, 0)  # warm-up: imports, mel filters, page cache
            run_reference(paths[: 2 * REF_BATCH], 0)
            for w in [0] + (workers if name == "librispeech" else []):
                r_all, o_all = side_by_side(
                    lambda w=w, p=paths: run_reference(p, w), lambda w=w, s=shards: run_ours(s, w), a.runs
                )
                results[name, w] = (med(r_all, 0), med(o_all, 0), med(r_all, 1), med(o_all, 1))
                rw, ow, rc, oc = results[name, w]
                cpu = f"{rc:>8.1f} {oc:>9.1f} {oc / rc:>14.1f}x" if w == 0 else f"{'-':>8} {'-':>9} {'-':>15}"
                label = "1 process" if w == 0 else f"{w} workers"
                print(
                    f"{name:<12} {label:<11} {rw:>9.1f} {ow:>10.1f} {cpu}   "
                    f"{' '.join(f'{x[0]:.0f}' for x in r_all)} | {' '.join(f'{x[0]:.0f}' for x in o_all)}"
                )

        _, _, ref_cpu, our_cpu = results["librispeech", 0]
        speedup = our_cpu / ref_cpu
        print(f"\ngoal per_core_speedup: {speedup:.1f}x (target 10x) {'met' if speedup >= 10 else 'not met'}")
        if 16 in workers:
            fed, how = results["librispeech", 16][1], "measured with 16 workers"
        else:
            # Workers share nothing but the disk: each does the one-process work per utterance on its own core.
            fed, how = 16 * our_cpu, f"extrapolated: 16 x the per-core rate; {cores} cores here"
        print(f"goal 16_workers: {fed:.0f} utt/s ({how}) (target 2000) {'met' if fed >= 2000 else 'not met'}")


if __name__ == "__main__":
    main()
