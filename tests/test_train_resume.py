"""Resumable training on CPU with 2 gloo processes: checkpoints every N steps, SIGTERM, exact resume, FSDP."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers_lsm import build_models, experiment, write_examples
from safetensors.torch import load_file

from core.lsm.model import LSMForConditionalGeneration
from core.paths import REPO_ROOT, TrainPaths
from stages.train import checkpoint
from stages.train import launcher as train

# 20 train rows, 2 processes x batch 2: 5 steps an epoch, so 6 steps cross into a second epoch.
STEPS, EVERY = 6, 3


def settings(**kw):
    base = dict(max_steps=STEPS, checkpoint_every=EVERY, warmup_steps=2, lr=1e-3, loggers=["tensorboard"])
    base.update(kw)
    return experiment(**base).train


def losses(out) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    work = tmp_path_factory.mktemp("lsm-resume")
    whisper_dir, llm_dir = build_models(work / "models")
    examples = write_examples(work / "examples.parquet")
    return dict(work=work, whisper=whisper_dir, llm=llm_dir, examples=examples)


@pytest.fixture(scope="module")
def straight(setup):
    out = setup["work"] / "straight"
    summary = train.train(settings(), setup["whisper"], setup["llm"], setup["examples"], out)
    return out, summary


LAUNCH = """
import sys
from pathlib import Path
from core.config import TrainConfig
from stages.train import launcher as train
cfg = TrainConfig.model_validate_json(sys.argv[1])
train.train(cfg, *map(Path, sys.argv[2:]))
"""


def run_until_sigterm(setup, out, after_step: int) -> subprocess.CompletedProcess:
    """The train stage in a process of its own, sent SIGTERM (as a cancelled flow run or a stopped container
    is) once ``after_step`` is logged: it must stop its torchrun workers, which checkpoint before they exit."""
    proc = subprocess.Popen(
        [sys.executable, "-c", LAUNCH, settings().model_dump_json()]
        + [str(setup[k]) for k in ("whisper", "llm", "examples")]
        + [str(out)],
        cwd=REPO_ROOT,
        env=train.worker_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= after_step):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=180)
    return subprocess.CompletedProcess(proc.args, proc.returncode, output)


@pytest.mark.slow
def test_checkpoint_every_n_steps_holds_the_whole_training_state(straight):
    out, summary = straight
    assert summary["steps"] == STEPS and summary["resumed_from_step"] == 0
    ckpt = out / "checkpoints" / f"step-{EVERY:08d}"
    names = {p.name for p in ckpt.iterdir()}
    assert {
        "model.safetensors",
        "optimizer.safetensors",
        "optimizer.json",
        "scheduler.json",
        "trainer_state.json",
    } <= names
    assert {"rng-rank0.safetensors", "rng-rank1.safetensors", "rng-rank0.json", "rng-rank1.json"} <= names
    assert {"loader-rank0.json", "loader-rank1.json"} <= names  # each rank's own data position
    state = json.loads((ckpt / "trainer_state.json").read_text())
    # 3 steps of one batch per process: the data position is batch 3 of epoch 0
    assert (state["step"], state["epoch"], state["batch_in_epoch"], state["samples_seen"]) == (3, 0, 3, 12)
    # the two ranks draw from different streams: their RNG states differ
    r0, r1 = (load_file(ckpt / f"rng-rank{r}.safetensors")["torch"] for r in (0, 1))
    assert r0.dtype == torch.uint8 and not torch.equal(r0, r1)
    model = load_file(ckpt / "model.safetensors")
    assert any(k.startswith("qformer.") for k in model) and "proj.weight" in model
    assert not any(k.startswith("encoder.") for k in model)  # frozen and pretrained: not repeated
    opt = load_file(ckpt / "optimizer.safetensors")
    assert "proj.weight::exp_avg" in opt and float(opt["proj.weight::step"]) == EVERY
    assert json.loads((ckpt / "scheduler.json").read_text())["last_epoch"] == EVERY
    # metrics, TensorBoard events and the loss curve
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    assert all(r["tokens_per_s"] > r["samples_per_s"] > 0 and r["grad_norm"] > 0 for r in recs)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_continues_the_same_trajectory(setup, straight):
    out_straight, summary = straight
    out = setup["work"] / "stopped"
    proc = run_until_sigterm(setup, out, after_step=1)
    assert proc.returncode != 0 and "stopped by signal" in proc.stdout  # stopped, not finished
    ckpt = checkpoint.latest(TrainPaths(out))
    assert ckpt is not None and not (out / "checkpoint").exists()
    stopped_at = json.loads((ckpt / "trainer_state.json").read_text())["step"]
    assert 1 <= stopped_at < STEPS

    resumed = train.train(settings(), setup["whisper"], setup["llm"], setup["examples"], out)
    assert resumed["resumed_from_step"] == stopped_at and resumed["steps"] == STEPS
    assert resumed["final_loss"] == pytest.approx(summary["final_loss"], abs=1e-5)
    a, b = losses(out_straight), losses(out)
    assert sorted(b) == list(range(1, STEPS + 1))  # the log continues where it stopped, no step twice
    for step in range(1, STEPS + 1):
        assert b[step] == pytest.approx(a[step], abs=1e-5), step
    m1 = LSMForConditionalGeneration.from_pretrained(out_straight / "checkpoint")
    m2 = LSMForConditionalGeneration.from_pretrained(out / "checkpoint")
    for (k, v), v2 in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        assert torch.allclose(v, v2, atol=1e-6), k


def test_checkpoints_of_other_settings_or_a_finished_run_are_not_resumed(setup, straight, tmp_path):
    out_straight, _ = straight
    cases = [
        (settings(), None),  # same settings, unfinished: resumed
        (settings(lr=5e-4), "other settings"),
        (settings(resume=False), "resume is off"),
        (settings(max_steps=EVERY), "already finished"),
    ]
    for cfg, why in cases:
        out = tmp_path / f"case-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(out_straight / "checkpoints", out / "checkpoints")
        train.write_args(cfg, setup["whisper"], setup["llm"], setup["examples"], out)
        assert (checkpoint.latest(TrainPaths(out)) is None) == (why is not None), why
    # settings that change only how often or how long do not block a resume
    out = tmp_path / "exempt"
    shutil.copytree(out_straight / "checkpoints", out / "checkpoints")
    cfg = settings(checkpoint_every=1, timeout_s=10.0, keep_checkpoints=5)
    train.write_args(cfg, setup["whisper"], setup["llm"], setup["examples"], out)
    assert checkpoint.latest(TrainPaths(out)) is not None


@pytest.mark.slow
def test_fsdp_matches_ddp_and_resumes(setup, straight):
    out_ddp, _ = straight
    out = setup["work"] / "fsdp"
    cfg = settings(strategy="fsdp", max_steps=2, checkpoint_every=1)
    s = train.train(cfg, setup["whisper"], setup["llm"], setup["examples"], out)
    assert s["strategy"] == "fsdp" and s["steps"] == 2
    ddp, fsdp = losses(out_ddp), losses(out)
    assert fsdp[1] == pytest.approx(ddp[1], abs=1e-6)  # the same model before any update
    assert fsdp[2] == pytest.approx(ddp[2], abs=1e-4)  # and after one, up to reduction order
    model = LSMForConditionalGeneration.from_pretrained(out / "checkpoint")
    assert model.config.llm_config.model_type == "llama"
    # the sharded state gathered into the step-1 checkpoint, resumed: step 2 again, the same loss
    assert checkpoint.latest(TrainPaths(out)).name == "step-00000001"
    again = train.train(cfg, setup["whisper"], setup["llm"], setup["examples"], out)
    assert again["resumed_from_step"] == 1
    assert again["final_loss"] == pytest.approx(s["final_loss"], abs=1e-5)
