"""Fault injection: harvest, generate, build and train, each a real `splsm` process killed with SIGKILL at
points a seed chooses, then run again; and killed once more with the newest file it wrote cut to zero bytes
(a power loss after a rename reached the disk and its data did not) before the rerun. Each time the final
outputs equal those of an uninterrupted run, row for row (nothing lost, nothing twice), and the kill leaves
no process of the stage behind."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from core.paths import WorkPaths
from core.tables import read_table
from schemas import EXAMPLES, GENERATE_STATS, REJECTS, RESPONSES, SHARDS, TRANSCRIPTS

pytestmark = pytest.mark.slow
TINY = REPO / "configs" / "tiny.yaml"
SEED = 17  # chooses the kill points; another seed, other points
ORDER = [("harvest",), ("models", "tiny"), ("generate",), ("build",), ("train",)]
STAGE_DIRS = {"harvest": "harvest", "generate": "generate", "build": "build", "train": "train"}


def _config(dst: Path) -> Path:
    """configs/tiny.yaml with one request in flight: a batch's padding changes a random model's greedy answers,
    and an interrupted run batches its remaining requests otherwise than an uninterrupted one."""
    import yaml

    cfg = yaml.safe_load(TINY.read_text())
    for c in cfg["corpora"]:
        for key in ("root", "manifest"):
            if key in c:
                c[key] = str((TINY.parent / c[key]).resolve())
    cfg["generate"]["backend"]["concurrency"] = 1
    dst.write_text(yaml.safe_dump(cfg))
    return dst


def _cli(words: tuple[str, ...], work: Path) -> subprocess.Popen:
    config = work.parent / "tiny-one-in-flight.yaml"
    return subprocess.Popen(
        [sys.executable, "-m", "splsm.cli", *words, "--config", str(config), "--workdir", str(work)],
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _run(words, work) -> tuple[float, str]:
    """Run to the end; returns the seconds from the stage's start line to its exit, and its output."""
    proc = _cli(words, work)
    started, out = None, []
    for line in proc.stdout:
        out.append(line)
        if started is None and f"{words[0]} (run " in line:
            started = time.monotonic()
    rc = proc.wait(timeout=900)
    text = "".join(out)
    assert rc == 0, f"splsm {' '.join(words)} failed:\n{text[-4000:]}"
    return time.monotonic() - (started or time.monotonic()), text


def _kill_after(words, work, delay_s: float) -> bool:
    """Start the stage, SIGKILL it ``delay_s`` after its start line; False if it finished first."""
    proc = _cli(words, work)
    for line in proc.stdout:
        if f"{words[0]} (run " in line:
            break
    deadline = time.monotonic() + delay_s
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    finished = proc.poll() is not None
    if not finished:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stdout.close()
    return not finished


def _left_behind(work: Path) -> list[str]:
    """Processes whose command line names this work directory (a server, torchrun, its workers)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(work) in cmd and int(pid) != os.getpid():
            found.append(f"{pid}: {cmd[:200]}")
    return found


def _wait_gone(work: Path, timeout_s: float = 60) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while (left := _left_behind(work)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def _outputs(stage: str, work: Path) -> dict:
    """What a stage's user reads, in a form two runs can be compared by: tables as rows, weights as values;
    the work directory's own path (a local model's served name holds it) written as WORK."""
    out = _raw_outputs(stage, work)

    def norm(v):
        if isinstance(v, str):
            return v.replace(str(work), "WORK")
        if isinstance(v, dict):
            return {k: norm(x) for k, x in v.items()}
        if isinstance(v, list):
            return [norm(x) for x in v]
        return v

    return norm(out)


def _raw_outputs(stage: str, work: Path) -> dict:
    p = WorkPaths(work)
    if stage == "harvest":
        rows = read_table(p.harvest.transcripts, TRANSCRIPTS).to_pylist()
        for r in rows:
            r.pop("file_mtime_ns")  # the copied corpus files are the same bytes
        return {"transcripts": rows, "rejects": read_table(p.harvest.rejects, REJECTS).to_pylist()}
    if stage == "generate":
        return {
            "responses": read_table(p.generate.responses, RESPONSES).to_pylist(),
            "stats": read_table(p.generate.stats, GENERATE_STATS).to_pylist(),
        }
    if stage == "build":
        shards = {
            s.name: read_table(s, EXAMPLES).to_pylist()
            for s in sorted(p.build.shards.glob("*.parquet"))
            if s.name != "manifest.parquet"
        }
        manifest = read_table(p.build.shards / "manifest.parquet", SHARDS).to_pylist()
        return {
            "examples": read_table(p.build.examples, EXAMPLES).to_pylist(),
            "shards": shards,
            "manifest": manifest,
        }
    from safetensors.torch import load_file

    ckpt = p.train.checkpoint
    weights = load_file(ckpt / "model.safetensors")
    return {
        "weights": {k: v.double().sum().item() for k, v in sorted(weights.items())},
        "steps": [json.loads(x)["step"] for x in (p.train.dir / "metrics.jsonl").read_text().splitlines()],
    }


def _same(stage: str, got: dict, want: dict) -> None:
    if stage != "train":
        for name in want:
            assert got[name] == want[name], f"{stage} {name} differ from the uninterrupted run's"
        return
    # training resumes from its last checkpoint on the same data order and RNG streams: the same trajectory
    # (gloo's reductions on CPU are deterministic; the sums leave room only for float association)
    assert got["weights"].keys() == want["weights"].keys()
    for k, v in want["weights"].items():
        assert got["weights"][k] == pytest.approx(v, rel=1e-5, abs=1e-5), k
    # every step logged once, in order, however often the run was stopped
    assert sorted(set(got["steps"])) == want["steps"]


def _newest_file(d: Path) -> Path | None:
    files = [f for f in d.rglob("*") if f.is_file() and f.stat().st_size > 0]
    return max(files, key=lambda f: f.stat().st_mtime_ns, default=None)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The whole chain once, uninterrupted: each stage's outputs and how long its work took."""
    work = tmp_path_factory.mktemp("straight") / "work"
    _config(work.parent / "tiny-one-in-flight.yaml")
    took = {}
    for words in ORDER:
        took[words[0]], _ = _run(words, work)
    return work, took


@pytest.mark.parametrize("stage", ["harvest", "generate", "build", "train"])
def test_killed_at_seeded_points_then_rerun_gives_the_uninterrupted_outputs(stage, straight, tmp_path):
    ref, took = straight
    want = _outputs(stage, ref)
    rng = random.Random(f"{SEED}:{stage}")
    work = tmp_path / "work"
    shutil.copytree(ref, work, symlinks=True)
    _config(tmp_path / "tiny-one-in-flight.yaml")
    shutil.rmtree(work / STAGE_DIRS[stage])  # its outputs, markers, caches, checkpoints: a first run
    words = next(w for w in ORDER if w[0] == stage)
    killed = []
    for _ in range(2):
        point = rng.uniform(0.1, 0.9) * took[stage]
        killed.append(_kill_after(words, work, point))
        assert not (left := _wait_gone(work)), f"{stage} killed, still running:\n" + "\n".join(left)
    # then a power loss: killed once more, its newest file cut to zero bytes
    _kill_after(words, work, rng.uniform(0.1, 0.9) * took[stage])
    assert not _wait_gone(work)
    newest = _newest_file(work / STAGE_DIRS[stage])
    if newest is not None:
        newest.write_bytes(b"")
    _, out = _run(words, work)
    _same(stage, _outputs(stage, work), want)
    assert any(killed), (
        f"{stage} finished before every kill point: the points ({took[stage]:.1f}s of work) missed"
    )
    if newest is not None and newest.name.endswith((".parquet", ".json")) and "cannot be read" in out:
        assert str(newest.name) in out  # the warning names what it made again
