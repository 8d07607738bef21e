"""Training and decoding throughput of this tree beside the tree at a baseline commit, in one run.

    .venv/bin/python bench/throughput.py                        # baseline: the throughput issue's start (73a3abf)
    .venv/bin/python bench/throughput.py --runs 3 --steps 6 --variants frozen,lora,full --base 73a3abf

1. Data as the reproduction makes it (``bench/reproduce.py``, ``configs/reproduce.yaml``), smaller: espeak-ng reads
   the first ``--utterances`` transcripts of the reference's manifest (about 10% held out), SmolLM2-135M-Instruct
   answers one instruction per utterance, build writes the examples. Made once with this tree, in
   ``work/throughput/``; a rerun reuses it.
2. Training: the reproduction's training settings (Whisper tiny.en encoder frozen, Q-Former 256 wide, SmolLM2,
   2 processes x batch 4, ``--steps`` steps) through ``stages.train.launcher.train`` (torchrun), once in a
   ``git worktree`` of ``--base`` and once in this tree, alternately, ``--runs`` times each, per variant: the LLM
   frozen (the reproduction's), LoRA r8 on the LLM, the whole LLM trained. A run's figure is the median
   ``samples_per_s`` over its steps after the first (warm-up); the table quotes the median over runs. This tree
   keeps the encoder's outputs in a cache (``train.encoder_cache``): its first run fills it (quoted apart, "cold
   cache"), the timed runs read it, as every later epoch, the other arm of a reproduction and evaluation do. The
   per-step losses of both trees are printed side by side (dropout draws differ where fewer windows go through
   the Q-Former, so they agree to the noise of dropout, not to the bit; ``tests/test_model_fast_paths.py`` checks
   equality with dropout off).
3. Decoding: the LSM of this tree's frozen-LLM run and Whisper tiny.en alone transcribe the same held-out and real
   clips (``stages.evaluate.decoding.decode`` and ``stages.evaluate.reference.decode``, the evaluate stage's own),
   at batch 1 and 16, in each tree, no encoder cache (new clips). A model trained for a few steps does not stop at
   the transcript's end: each LSM row is made to emit exactly its transcript's token count plus eos
   (``min_new_tokens``), what a model that transcribes emits. RTFx = audio seconds / decoding seconds.
4. The reproduction's cost (``bench/reproduce.py``: 300 steps of 8 samples per arm) estimated from these figures.

Ends with the goal lines.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

BASE = "73a3abf"  # main when the throughput issue began
WORK = REPO / "work" / "throughput"
VARIANTS = {
    "frozen": {"freeze_llm": True},
    "lora": {"freeze_llm": False, "lora": {"r": 8, "alpha": 16, "dropout": 0.05}},
    "full": {"freeze_llm": False, "lr": 5e-5},
}
TARGETS = {"frozen": 2.5, "lora": 1.5, "full": 1.5}  # training samples/s, this tree over the baseline
REPRO_STEPS, REPRO_SAMPLES = 300, 8  # bench/reproduce.py's training per arm


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, text=True, **kw)


def worktree(rev: str) -> Path:
    """A checkout of ``rev`` beside the work dir (made once)."""
    sha = sh(["git", "rev-parse", "--short", rev], cwd=REPO, capture_output=True).stdout.strip()
    path = WORK / f"tree-{sha}"
    if not (path / "core").is_dir():
        sh(["git", "worktree", "prune"], cwd=REPO)
        sh(["git", "worktree", "add", "--detach", "--force", str(path), sha], cwd=REPO, capture_output=True)
    return path


def prepare(utterances: int) -> dict:
    """Speech, models, answers and examples, made once with this tree."""
    import yaml
    from reproduce import synthesize

    from core.config import load_config
    from core.paths import WorkPaths

    speech = synthesize(WORK / "speech", limit=utterances)
    data = WORK / "data"
    cfg = yaml.safe_load((REPO / "configs" / "reproduce.yaml").read_text())
    root = str(WORK / "speech")
    cfg["corpora"] = [
        c
        for c in cfg["corpora"]
        if c["kind"] != "manifest"  # the real clips stay (a second held-out set); the espeak ones come from here
    ] + [
        {"name": "espeak-train", "kind": "manifest", "root": root, "manifest": f"{root}/train.jsonl", "split": "train",
         "columns": {"audio": "audio", "text": "text", "id": "id"}},
        {"name": "espeak-heldout", "kind": "manifest", "root": root, "manifest": f"{root}/heldout.jsonl",
         "split": "heldout", "columns": {"audio": "audio", "text": "text", "id": "id"}},
    ]  # fmt: skip
    for c in cfg["corpora"]:
        for k in ("root", "manifest"):
            if c.get(k) and not Path(c[k]).is_absolute():
                c[k] = str((REPO / "configs" / c[k]).resolve())
    data.mkdir(parents=True, exist_ok=True)
    path = data / "throughput.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    splsm = str(Path(sys.executable).with_name("splsm"))
    for stage in (["models", "pretrained"], ["harvest"], ["generate"], ["build"]):
        t0 = time.monotonic()
        with open(data / "prepare.log", "a") as log:
            sh(
                [splsm, *stage, "--config", str(path), "--workdir", str(data)],
                cwd=REPO,
                stdout=log,
                stderr=log,
            )
        print(f"prepare: {' '.join(stage)} {time.monotonic() - t0:.0f}s", flush=True)
    conf = load_config(path)
    whisper, llm = WorkPaths(data).model_dirs(conf)
    return {
        "config": path,
        "train": cfg["train"],
        "whisper": whisper,
        "llm": llm,
        "examples": WorkPaths(data).build.examples,
        "speech": speech,
    }


TRAIN_SNIPPET = """
import json, sys
from pathlib import Path
from core.config import TrainConfig
from stages.train import launcher
a = json.loads(sys.argv[1])
kw = {"encoder_cache": Path(a["cache"])} if a.get("cache") else {}
s = launcher.train(TrainConfig.model_validate(a["train"]), Path(a["whisper"]), Path(a["llm"]), Path(a["examples"]),
                   Path(a["out"]), **kw)
"""


def train_once(tree: Path, prep: dict, variant: str, steps: int, out: Path, cache: Path | None) -> dict:
    """One training in ``tree`` (its own code, through its own launcher); its per-step figures."""
    train = {k: v for k, v in prep["train"].items() if k not in ("timeout_s",)}
    train.update(VARIANTS[variant])
    train.update({"max_steps": steps, "checkpoint_every": 0, "loggers": [], "warmup_steps": 2})
    arg = {
        "train": train,
        "whisper": str(prep["whisper"]),
        "llm": str(prep["llm"]),
        "examples": str(prep["examples"]),
        "out": str(out),
        "cache": str(cache) if cache else None,
    }
    env = {**os.environ, "PYTHONPATH": str(tree)}
    with open(out.with_suffix(".log"), "w") as log:
        sh([sys.executable, "-c", TRAIN_SNIPPET, json.dumps(arg)], cwd=tree, env=env, stdout=log, stderr=log)
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "samples_per_s" in r]
    return {
        "samples_per_s": statistics.median(r["samples_per_s"] for r in recs[1:]),
        "losses": [r["loss"] for r in recs],
        "checkpoint": str(out / "checkpoint"),
    }


DECODE_SNIPPET = """
import json, statistics, sys, time
import torch
from pathlib import Path
torch.set_num_threads(2)
from core.lsm.model import LSMForConditionalGeneration
from stages.evaluate import decoding, reference
a = json.loads(sys.argv[1])
items = [decoding.Item(**it) for it in a["items"]]
model = LSMForConditionalGeneration.from_pretrained(a["checkpoint"]).eval()
plain = model.generate
def forced(*args, **kw):  # every row emits the batch's bound: its transcript's token count + eos, as a model that
    return plain(*args, min_new_tokens=args[4], **kw)  # transcribes would (decode passes the bound 5th)
model.generate = forced
out = {}
for bs in a["batches"]:
    for who in ("lsm", "whisper"):
        rtf = []
        for _ in range(a["runs"]):
            if who == "lsm":
                d = decoding.decode(model, items, bs, label=f"lsm b{bs}")
            else:
                d = reference.decode(Path(a["whisper"]), items, bs)
            rtf.append(sum(d.audio_s.values()) / sum(d.decode_s.values()))
        out[f"{who}/{bs}"] = {"rtfx": statistics.median(rtf), "runs": rtf}
print("RESULT " + json.dumps(out))
"""


def decode_items(prep: dict, n: int) -> list[dict]:
    """Up to ``n`` held-out and real ASR clips, each bounded by its transcript's token count plus eos."""
    from transformers import AutoTokenizer

    from core.tables import read_table
    from schemas import EXAMPLES

    tok = AutoTokenizer.from_pretrained(str(prep["llm"]))
    rows = [r for r in read_table(prep["examples"], EXAMPLES).to_pylist() if r["task"] == "asr"]
    rows = sorted((r for r in rows if r["split"] in ("heldout", "real")), key=lambda r: r["example_id"])[:n]
    return [
        dict(
            key=r["example_id"],
            group=r["split"],
            audio_path=r["audio_path"],
            offset_s=r["offset_s"],
            duration_s=r["duration_s"],
            prefix=r["prefix"],
            suffix=r["suffix"],
            max_new_tokens=len(tok(r["answer"], add_special_tokens=False)["input_ids"]) + 1,
            utt_id=r["utt_id"],
        )
        for r in rows
    ]


def decode_rtfx(tree: Path, checkpoint: str, prep: dict, items: list[dict], runs: int) -> dict:
    arg = {
        "checkpoint": checkpoint,
        "whisper": str(prep["whisper"]),
        "items": items,
        "batches": [1, 16],
        "runs": runs,
    }
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = sh([sys.executable, "-c", DECODE_SNIPPET, json.dumps(arg)], cwd=tree, env=env, capture_output=True)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=BASE, help="the baseline commit (default: the issue's start)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--utterances", type=int, default=160, help="transcripts of the seed manifest to speak")
    ap.add_argument("--variants", default="frozen,lora,full")
    ap.add_argument("--decode-clips", type=int, default=16)
    ap.add_argument("--skip-decode", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    WORK.mkdir(parents=True, exist_ok=True)
    base, here = worktree(args.base), REPO
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    head_sha = head.stdout.strip()
    print(f"baseline {args.base} in {base}; this tree {REPO} at {head_sha} (plus uncommitted changes)")
    prep = prepare(args.utterances)
    import pyarrow.parquet as pq

    ex = pq.read_table(prep["examples"], columns=["split", "task"]).to_pylist()
    print(
        f"data: {sum(r['split'] == 'train' for r in ex)} train examples, {prep['speech']['utterances']} utterances"
    )

    runs_dir = WORK / "runs" / time.strftime("%Y%m%d-%H%M%S")
    runs_dir.mkdir(parents=True, exist_ok=True)
    cache = runs_dir / "encoder-cache"
    results: dict[str, dict] = {}
    goals = []
    for variant in args.variants.split(","):
        t0 = time.monotonic()
        cold = train_once(here, prep, variant, args.steps, runs_dir / f"{variant}-new-cold", cache)
        b, n = [], []
        for r in range(args.runs):  # alternate, so that a busy spell hits both trees
            b.append(train_once(base, prep, variant, args.steps, runs_dir / f"{variant}-base-{r}", None))
            n.append(train_once(here, prep, variant, args.steps, runs_dir / f"{variant}-new-{r}", cache))
        res = {
            "base": statistics.median(x["samples_per_s"] for x in b),
            "new": statistics.median(x["samples_per_s"] for x in n),
            "cold": cold["samples_per_s"],
            "base_runs": [x["samples_per_s"] for x in b],
            "new_runs": [x["samples_per_s"] for x in n],
            "base_losses": b[0]["losses"],
            "new_losses": n[0]["losses"],
            "checkpoint": n[0]["checkpoint"],
            "minutes": (time.monotonic() - t0) / 60,
        }
        results[variant] = res
        print(
            f"{variant}: baseline {res['base']:.2f} samples/s {[f'{x:.2f}' for x in res['base_runs']]}, this tree "
            f"{res['new']:.2f} {[f'{x:.2f}' for x in res['new_runs']]} (cold cache {res['cold']:.2f}), "
            f"x{res['new'] / res['base']:.2f}; {res['minutes']:.1f} min",
            flush=True,
        )

    report: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        report.append(text)

    say("\n### Training samples per second (2 processes x batch 4, medians)\n")
    say("| LLM | baseline | this tree (cold cache) | this tree | ratio |")
    say("|---|---:|---:|---:|---:|")
    for v, r in results.items():
        say(f"| {v} | {r['base']:.2f} | {r['cold']:.2f} | {r['new']:.2f} | {r['new'] / r['base']:.2f}x |")
    say("\n### Losses per step, baseline / this tree\n")
    for v, r in results.items():
        pairs = " ".join(f"{a:.3f}/{c:.3f}" for a, c in zip(r["base_losses"], r["new_losses"], strict=False))
        diff = max(abs(a - c) for a, c in zip(r["base_losses"], r["new_losses"], strict=False))
        say(f"- {v}: {pairs} (largest difference {diff:.3f})")

    dec = {}
    if not args.skip_decode and "frozen" in results:
        items = decode_items(prep, args.decode_clips)
        audio_s = sum(it["duration_s"] for it in items)
        say(
            f"\n### Decoding RTFx ({len(items)} clips, {audio_s:.1f} s of audio; medians of {args.runs} runs)\n"
        )
        ckpt = results["frozen"]["checkpoint"]
        dec["base"] = decode_rtfx(base, ckpt, prep, items, args.runs)
        dec["new"] = decode_rtfx(here, ckpt, prep, items, args.runs)
        say("| batch | Whisper tiny.en | LSM baseline | LSM this tree | LSM / Whisper (this tree) |")
        say("|---:|---:|---:|---:|---:|")
        for bs in (1, 16):
            w = dec["new"][f"whisper/{bs}"]["rtfx"]
            lb, ln = dec["base"][f"lsm/{bs}"]["rtfx"], dec["new"][f"lsm/{bs}"]["rtfx"]
            say(f"| {bs} | {w:.2f} | {lb:.2f} | {ln:.2f} | {ln / w:.2f} |")

    if "frozen" in results:
        r = results["frozen"]
        samples = REPRO_STEPS * REPRO_SAMPLES
        per_arm_base, per_arm_new = samples / r["base"] / 60, samples / r["new"] / 60
        say(
            f"\n### bench/reproduce.py, estimated from these figures\n\n- training, one arm ({REPRO_STEPS} steps of "
            f"{REPRO_SAMPLES}): baseline {per_arm_base:.1f} min, this tree {per_arm_new:.1f} min (cache warm; the "
            f"first pass over a clip costs as the cold-cache run: {samples / r['cold'] / 60:.1f} min if every clip "
            f"were new)\n- per 1,000 training samples: baseline {1000 / r['base'] / 60:.1f} min, this tree "
            f"{1000 / r['new'] / 60:.1f} min"
        )
    say()
    for v, r in results.items():
        ratio = r["new"] / r["base"]
        ok = "met" if ratio >= TARGETS[v] else "not met"
        goals.append(f"goal train_{v}_speedup: {ratio:.2f}x (target {TARGETS[v]}x) {ok}")
    for bs in (1, 16) if dec else ():
        w = dec["new"][f"whisper/{bs}"]["rtfx"]
        ln = dec["new"][f"lsm/{bs}"]["rtfx"]
        ok = "met" if ln >= w / 2 else "not met"
        goals.append(f"goal decode_rtfx_batch{bs}: LSM {ln:.2f} vs Whisper {w:.2f} (target >= half) {ok}")
    (runs_dir / "results.json").write_text(json.dumps({"train": results, "decode": dec}, indent=2))
    for g in goals:
        say(g)
    import platform
    from datetime import datetime, timezone

    head = [
        "## Throughput: training and decoding (`bench/throughput.py`)",
        "",
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {platform.machine()}, "
        f"{os.cpu_count()} CPU cores, no GPU; this tree at {head_sha}, baseline {args.base}",
        f"- command: `.venv/bin/python bench/throughput.py {' '.join(sys.argv[1:])}`",
    ]
    (REPO / "bench" / "results").mkdir(exist_ok=True)
    (REPO / "bench" / "results" / "throughput.md").write_text("\n".join(head + report) + "\n")


if __name__ == "__main__":
    main()
