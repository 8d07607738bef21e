"""The paper's central result in miniature: an LSM tuned on ASR alone answers other instructions with the
transcript (speech anchor bias); one tuned on its own LLM's answers (self-powered) follows them.

    .venv/bin/python bench/reproduce.py                       # cold: synthesis, generation, two trainings, evaluation
    .venv/bin/python bench/reproduce.py --rerun-lr 5e-4       # then: only the training settings change
    .venv/bin/python bench/reproduce.py --quick               # a smoke run: 200 utterances, a few steps

1. Speech: espeak-ng (``-s 140``, en-us) reads the 2,099 real transcripts of the reference's own manifest
   (``../shared/seed-data/raw_manifest_example.jsonl``; GigaSpeech's spaced punctuation and tags made plain
   first, ``core.text.readable``), once, into ``data/reproduce/``; about 10% are held out by utterance hash.
   The bundled real clips (LibriSpeech dev-clean and test-clean) are a second held-out set.
2. Two experiments, identical but for their data (``configs/reproduce.yaml``, ``configs/reproduce-asr-only.yaml``):
   Whisper tiny.en's encoder frozen; a window-level Q-Former and projection first learn CTC over SmolLM2's
   vocabulary (the warm start, trained once and shared), then they and LoRA on SmolLM2-135M-Instruct learn the
   answers.
   The self-powered one trains on ASR plus SmolLM2's answer to one instruction per utterance (drawn with the
   seed, as the reference's per-category manifests); the ASR-only one on ASR alone. The second experiment
   takes the first's harvest and answer cache, so SmolLM2 answers each prompt once.
3. Both are evaluated on both held-out sets: WER (beside Whisper tiny.en's own, measured in the same run),
   anchor rate per category (an answer within WER 0.3 of the transcript is a transcript), chrF against
   SmolLM2's own answers to the same instructions about the true transcripts, spoken yes/no QA. A third row
   is SmolLM2 itself on the text transcripts: its own anchor rate (the floor) and chrF 100 by definition.

``--recipe reference`` runs the same two experiments with the reference code's own recipe (the options
``configs/paper.yaml`` selects: its prompt layout, wordings, Whisper-normalized transcripts, per-batch windows,
WarmupDecayLR, weight decay on everything, the answer-length rule, its fixed ASR prompt; ``docs/reference.md``)
into ``work/reproduce-reference``.

Writes its recipe's section of ``bench/RESULTS-reproduce.md`` (the other recipe's section, when it has one, stays
beside it) and ``bench/reproduce-anchor-rate[-reference].png``, and ends with the goal lines.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SEED_MANIFEST = REPO.parent / "shared" / "seed-data" / "raw_manifest_example.jsonl"
SPEECH = REPO / "data" / "reproduce"
CONFIGS = {
    "self-powered": REPO / "configs" / "reproduce.yaml",
    "asr-only": REPO / "configs" / "reproduce-asr-only.yaml",
}
NON_ASR = ("keywords", "intent", "sentiment", "continuation", "translation")  # the goal's categories
RESULTS = REPO / "bench" / "RESULTS-reproduce.md"
WORKS: dict[str, Path] = {}  # the experiments' work dirs, once main has them
SECTIONS = REPO / "bench" / "results"  # one section of RESULTS per recipe: reproduce-{recipe}.md
RECIPES = ("default", "reference")
# The reference code's recipe as overrides of the reproduce configs (each a named option; docs/reference.md).
REFERENCE_RECIPE = {
    "generate.prompt_format": "reference",
    "generate.catalog": "reference",
    "generate.transcript_form": "reference",
    "build.answer_tokens_between": [5, 2048],
    "train.qformer.window_mode": "per_batch",
    "train.lr_schedule": "warmup_decay",
    "train.weight_decay_on": "all",
    "evaluate.asr_prompt": "fixed",
    "train.qformer.dropout": 0.1,
    "build.asr_answer": "transcript",
    "train.ctc_warmup_steps": 0,  # the reference has no warm start: every step is an ordinary one
    "train.qformer.proj_init": "torch_default",
    "train.loader.batching": "shuffled",
    "evaluate.asr_length": "cap",
    "evaluate.asr_min_new_tokens": 1,
    "evaluate.order": "dataset",
    # the LLM and the connector as the reference trains them: the whole LLM at its lr, no overlapping windows, no
    # CTC anywhere (the defaults' LoRA, warm start and CTC mixing are this project's, docs/levers.md)
    "train.freeze_llm": False,
    "train.lora": None,
    "train.lr": 2.0e-5,
    "train.ctc_lr": None,
    "train.ctc_schedule": "shared",
    "train.qformer.stride_s": 0.33333,
    "train.qformer.ctc_shrink": False,
    "train.qformer.ctc_mix": False,
}


def plot_path(recipe: str) -> Path:
    return (
        REPO
        / "bench"
        / ("reproduce-anchor-rate.png" if recipe == "default" else f"reproduce-anchor-rate-{recipe}.png")
    )


def held_out(utt_id: str) -> bool:
    return int.from_bytes(hashlib.sha256(utt_id.encode()).digest()[:8], "big") % 10 == 0


# "More speech": the other renditions of a training transcript (synthesize's ``renditions``), each an espeak-ng
# voice, speed (words a minute) and pitch (0-99) drawn from these by the utterance's id and the rendition's number.
VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp", "en-us+m3", "en-us+f2", "en-gb+f4")
RATES_WPM = (120, 190)
PITCHES = (25, 75)


def rendition(utt: str, k: int) -> tuple[str, int, int]:
    """The voice, speed and pitch of rendition ``k`` (1, 2, ...) of utterance ``utt``: the same every run."""
    h = hashlib.sha256(f"{utt}/{k}".encode()).digest()
    return (
        VOICES[h[0] % len(VOICES)],
        RATES_WPM[0] + h[1] % (RATES_WPM[1] - RATES_WPM[0] + 1),
        PITCHES[0] + h[2] % (PITCHES[1] - PITCHES[0] + 1),
    )


def synthesize(
    out: Path, limit: int | None = None, rate: int = 140, voice: str = "en-us", renditions: int = 1
) -> dict:
    """espeak-ng speech of the seed manifest's transcripts, once: ``out/{train,heldout}.jsonl`` + ``out/wav/``.

    ``renditions`` > 1 adds, for each training transcript, that many minus one more clips of it in other voices,
    speeds and pitches (``rendition``), as ``out/train-more.jsonl`` (ids ``UTT~K``); held-out transcripts keep one.

    A finished synthesis leaves ``out/done.json`` (what it read and how); a run with the same settings reuses it.
    """
    from core.text import readable

    rows = [json.loads(line) for line in SEED_MANIFEST.read_text().splitlines() if line.strip()]
    rows = rows[:limit] if limit else rows
    settings = {
        "source": str(SEED_MANIFEST),
        "source_sha256": hashlib.sha256(SEED_MANIFEST.read_bytes()).hexdigest(),
        "rows": len(rows),
        "rate": rate,
        "voice": voice,
        "espeak": subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True).stdout.strip(),
    }
    if renditions > 1:  # one rendition keeps the settings (and the speech) of runs before renditions existed
        settings.update(
            renditions=renditions, voices=list(VOICES), rates_wpm=list(RATES_WPM), pitches=list(PITCHES)
        )
    done = out / "done.json"
    if done.is_file() and json.loads(done.read_text()).get("settings") == settings:
        return json.loads(done.read_text())
    shutil.rmtree(out, ignore_errors=True)
    (out / "wav").mkdir(parents=True)
    items = []
    for i, r in enumerate(rows):
        text = readable(r["text"])
        if text:
            items.append((f"rp{i:04d}", text))

    more = [
        (f"{utt}~{k}", text, *rendition(utt, k))
        for utt, text in items
        if not held_out(utt)
        for k in range(1, renditions)
    ]

    def speak(item: tuple) -> None:
        utt, text, v, s, p = item
        subprocess.run(
            ["espeak-ng", "-s", str(s), "-v", v, "-p", str(p), "-w", str(out / "wav" / f"{utt}.wav"), text],
            check=True,
            capture_output=True,
        )

    t0 = time.monotonic()
    with ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:
        list(pool.map(speak, [(utt, text, voice, rate, 50) for utt, text in items] + more))
    if more:
        lines = [json.dumps({"id": utt, "audio": f"wav/{utt}.wav", "text": text}) for utt, text, *_ in more]
        (out / "train-more.jsonl").write_text("\n".join(lines) + "\n")
    for name, keep in (("train", False), ("heldout", True)):
        lines = [
            json.dumps({"id": utt, "audio": f"wav/{utt}.wav", "text": text})
            for utt, text in items
            if held_out(utt) == keep
        ]
        (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    state = {
        "settings": settings,
        "utterances": len(items),
        "more_clips": len(more),
        "seconds": time.monotonic() - t0,
    }
    done.write_text(json.dumps(state, indent=2))
    return state


def set_dotted(cfg: dict, key: str, value) -> None:
    """``cfg["a"]["b"] = value`` for ``key`` ``a.b``, making the dicts on the way."""
    *parents, leaf = key.split(".")
    for p in parents:
        cfg = cfg.setdefault(p, {})
    cfg[leaf] = value


def experiment_config(name: str, work: Path, overrides: dict) -> Path:
    """The experiment's config with ``overrides`` applied (nested keys by dots), written into its work dir."""
    import yaml

    cfg = yaml.safe_load(CONFIGS[name].read_text())
    for key, value in overrides.items():
        set_dotted(cfg, key, value)
    # paths stay relative to the bundled config's folder
    for c in cfg["corpora"]:
        for k in ("root", "manifest"):
            if c.get(k):
                c[k] = str((CONFIGS[name].parent / c[k]).resolve())
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_experiment(config: Path, work: Path, until: str = "evaluate") -> float:
    """The DAG, whole or up to ``until``, through ``splsm run`` in its own process (a Prefect flow); returns its
    wall seconds."""
    t0 = time.monotonic()
    log = work / "run.log"
    with open(log, "w") as f:
        proc = subprocess.run(
            [str(Path(sys.executable).with_name("splsm")), "run", str(config), "--workdir", str(work)]
            + ["--until", until],
            cwd=REPO,
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    if proc.returncode != 0:
        sys.exit(f"reproduce: {config.name} failed (exit {proc.returncode}); see {log}")
    return time.monotonic() - t0


def share_cached_work(src: Path, dst: Path) -> None:
    """The second experiment starts from the first's converted models, harvest, answer cache and encoder cache
    (hard links where the filesystem allows): SmolLM2 answers each prompt once, and Whisper encodes each clip once."""
    from core.paths import WorkPaths

    a, b = WorkPaths(src), WorkPaths(dst)
    for d in (a.models.dir, a.harvest.dir, a.generate.dir, a.stage_dir("pretrained")):
        target = b.root / d.relative_to(a.root)
        if d.exists() and not target.exists():
            shutil.copytree(d, target, copy_function=os.link)
    if a.encoder_cache.exists():  # entries are immutable files: link each one the second has not got
        shutil.copytree(a.encoder_cache, b.encoder_cache, copy_function=_link_new, dirs_exist_ok=True)


def _link_new(src: str, dst: str) -> None:
    if not os.path.exists(dst):
        os.link(src, dst)


def shared_warm_start(train, warm: Path) -> tuple[dict, dict] | None:
    """The overrides of a CTC warm start trained once (a training that is the warm start alone, on the ASR-only
    examples: CTC's target is each row's transcript whatever its task) and of the two arms that start from its
    checkpoint (``train.init_from``) and run only the answer steps. The same trainings as each arm's own warm start
    when the schedule restarts after it (``train.ctc_schedule: restart``), so None otherwise, and without one."""
    k = train.ctc_warmup_steps
    if not k or train.ctc_schedule != "restart" or train.epochs is not None:
        return None
    warm_start = {
        "train.max_steps": k,
        # the warm start's curve: the held-out rows' losses with the CTC posteriors mixed in, every 250 steps
        "train.validation.every": max(1, min(250, k)),
    }
    arms = {
        "train.ctc_warmup_steps": 0,
        "train.max_steps": train.max_steps - k,
        "train.init_from": str(warm / "train" / "checkpoint"),
    }
    return warm_start, arms


def llm_ceiling(work: Path, eval_sets: list[str], threshold: float) -> dict[str, float]:
    """SmolLM2 itself on the text transcripts: how often its own answers are the transcript, per category."""
    from core.paths import WorkPaths
    from core.tables import read_table
    from core.text import normalize
    from schemas import EXAMPLES, RESPONSES
    from stages.evaluate.wer import utterance_wer

    p = WorkPaths(work)
    evals = {
        e["utt_id"]: e["transcript"]
        for e in read_table(p.build.examples, EXAMPLES).to_pylist()
        if e["split"] in eval_sets and e["task"] == "asr"
    }
    hits: dict[str, list[bool]] = {}
    for r in read_table(p.generate.responses, RESPONSES).to_pylist():
        if r["utt_id"] in evals and r["rejected_by"] is None:
            ref = normalize(evals[r["utt_id"]])
            if ref.split():
                hits.setdefault(r["task"], []).append(utterance_wer(ref, normalize(r["answer"])) < threshold)
    return {task: sum(h) / len(h) for task, h in hits.items()}


SHARED = (
    "pretrained",
    "harvest",
    "generate",
)  # run once, in the first experiment (the warm start's, or the self-powered one); the others reuse them
RERUN = ("train", "evaluate")  # what a change of training settings alone runs again, in both experiments


def stage_seconds(work: Path) -> dict[str, float]:
    """Wall seconds of the run that made each stage's current outputs, from the work dir's lineage store: a
    stage reused from an earlier invocation still counts what it cost when it ran."""
    import duckdb

    con = duckdb.connect(str(work / "lineage.duckdb"), read_only=True)
    try:
        rows = con.execute(
            "SELECT stage, epoch(ended_at) - epoch(started_at) FROM runs WHERE status = 'succeeded' "
            "QUALIFY row_number() OVER (PARTITION BY stage ORDER BY ended_at DESC) = 1"
        ).fetchall()
    finally:
        con.close()
    return {stage: float(s) for stage, s in rows}


def costs(works: dict[str, Path], speech: dict) -> dict:
    """Minutes of a cold run and of a training-settings rerun, each the sum of the stage runs it needs. The first
    experiment run (``works``' first) makes the shared stages' outputs; a shared warm start counts as training."""
    per = {name: stage_seconds(w) for name, w in works.items()}
    first = next(iter(works))
    cold = speech["seconds"] + sum(
        s
        for name, stages in per.items()
        for stage, s in stages.items()
        if name == first or stage not in SHARED
    )
    rerun = sum(s for stages in per.values() for stage, s in stages.items() if stage in RERUN)
    return {"stages": per, "cold_s": cold, "rerun_s": rerun}


def grounding(work: Path, eval_set: str, n: int = 48, batch: int = 8) -> dict[str, float]:
    """Does the trained model use the speech? Answer-token losses (``core.lsm.probes``) on ``n`` held-out ASR
    examples with their own speech, with each row's speech swapped for another clip's (the next row's inside each
    batch), and with zeros; the first answer token and the later ones apart. Equal own and swapped losses: the
    connector passes nothing the LLM can use, whatever the prompt says."""
    import torch

    from core import audio
    from core.lsm.batch import Collate
    from core.lsm.model import LSMForConditionalGeneration
    from core.lsm.probes import SpeechProbe, probe_batch
    from core.paths import WorkPaths
    from core.tables import read_table
    from schemas import EXAMPLES

    p = WorkPaths(work)
    rows = [
        r
        for r in read_table(p.build.examples, EXAMPLES).to_pylist()
        if r["split"] == eval_set and r["task"] == "asr"
    ]
    rows = sorted(rows, key=lambda r: r["example_id"])[:n]
    model = LSMForConditionalGeneration.from_pretrained(p.train.checkpoint).eval()
    collate = Collate.for_model(model)
    probe = SpeechProbe()
    for i in range(0, len(rows), batch):
        part = rows[i : i + batch]
        b = collate(part, [audio.load(r["audio_path"], r["offset_s"], r["duration_s"]) for r in part], True)
        with torch.no_grad():
            probe_batch(model, b, probe)
    return {**probe.summary(), "n": len(rows)}


def learning_curve(work: Path) -> list[dict]:
    """The training's validation records (``train.validation``), one per split and step, from metrics.jsonl."""
    from core.paths import WorkPaths
    from stages.train.logs import read_metrics

    return [r for r in read_metrics(WorkPaths(work).train) if "validation" in r]


def collect(work: Path) -> dict:
    from core.paths import WorkPaths
    from core.tables import read_table
    from schemas import METRICS, PROBE_METRICS, QA_METRICS

    e = WorkPaths(work).evaluate
    return {
        "metrics": read_table(e.table("metrics"), METRICS).to_pylist(),
        "probe": read_table(e.table("probe_metrics"), PROBE_METRICS).to_pylist(),
        "qa": read_table(e.table("qa_metrics"), QA_METRICS).to_pylist(),
    }


def mean(xs) -> float:
    xs = [x for x in xs if x == x]
    return statistics.mean(xs) if xs else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--recipe", choices=RECIPES, default="default", help="the project's defaults or the reference's"
    )
    ap.add_argument("--workdir", type=Path, default=None, help="default: work/reproduce[-reference]")
    ap.add_argument("--quick", action="store_true", help="200 utterances, 20 steps: checks the bench runs")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the configs')")
    ap.add_argument(
        "--freeze-llm", action="store_true", help="keep SmolLM2 as it is (no LoRA): only the connector learns"
    )
    ap.add_argument("--rerun-lr", type=float, default=None, help="rerun with only this learning rate changed")
    ap.add_argument(
        "--own-warm-start",
        action="store_true",
        help="each arm trains its own CTC warm start (default: one, shared, where train.ctc_schedule is restart)",
    )
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any setting of both arms' configs, dotted (train.qformer.window_s=0.2); repeatable")  # fmt: skip
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="write the report from the work dirs as they stand, run nothing",
    )
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not shutil.which("espeak-ng"):
        sys.exit("espeak-ng is not installed: scripts/setup.sh installs it (apt-get)")

    t_start = time.monotonic()
    speech = synthesize(SPEECH, limit=200 if args.quick else None)
    print(f"speech: {speech['utterances']} utterances in {SPEECH} ({speech['seconds']:.0f}s to synthesize)")
    args.workdir = args.workdir or REPO / "work" / (
        "reproduce" if args.recipe == "default" else f"reproduce-{args.recipe}"
    )
    overrides: dict = dict(REFERENCE_RECIPE) if args.recipe == "reference" else {}
    if args.quick:
        overrides.update({"train.max_steps": 20, "train.checkpoint_every": 0, "train.warmup_steps": 2})
        overrides.setdefault("train.ctc_warmup_steps", 5)  # the reference recipe's 0 stays
    if args.steps:
        overrides["train.max_steps"] = args.steps
    if args.freeze_llm:
        overrides.update({"train.freeze_llm": True, "train.lora": None})
    if args.rerun_lr is not None:
        overrides["train.lr"] = args.rerun_lr
    import yaml

    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            ap.error(f"--set {item!r}: give SECTION.KEY=VALUE, e.g. train.lr=1e-3")
        overrides[key] = yaml.safe_load(value)
    from core.config import load_config

    # the configs as given: what the report describes
    cfg = load_config(experiment_config("self-powered", args.workdir, overrides))
    warm = args.workdir / "warm-start"
    plan = None if args.own_warm_start else shared_warm_start(cfg.train, warm)
    works = {name: args.workdir / name for name in CONFIGS}
    if plan is not None:
        works = {"warm-start": warm, **works}
    timings = {name: float("nan") for name in works}
    WORKS.update(works)
    names = list(works)
    for i, name in enumerate(() if args.report_only else names):
        # each experiment starts from the one before: models, harvest, answers and encoder cache made once
        if i:
            share_cached_work(works[names[i - 1]], works[name])
        if name == "warm-start":
            config = experiment_config("asr-only", warm, {**overrides, **plan[0]})
            timings[name] = run_experiment(config, warm, until="train")
        else:
            config = experiment_config(name, works[name], {**overrides, **(plan[1] if plan else {})})
            timings[name] = run_experiment(config, works[name])
        print(f"{name}: {timings[name] / 60:.1f} min ({works[name]})")
    total = time.monotonic() - t_start

    eval_sets, threshold = cfg.evaluate.eval_sets, cfg.evaluate.anchor_wer_threshold
    res = {name: collect(works[name]) for name in CONFIGS}
    ceiling = llm_ceiling(works["self-powered"], eval_sets, threshold)
    report(res, ceiling, eval_sets, timings, total, speech, args, cfg, costs(works, speech))


def report(
    res: dict,
    ceiling: dict,
    eval_sets: list[str],
    timings: dict,
    total: float,
    speech: dict,
    args,
    cfg,
    cost: dict,
):
    def wer(name: str, s: str, system: str = "lsm") -> float:
        return next(
            (m["wer"] for m in res[name]["metrics"] if m["eval_set"] == s and m["system"] == system),
            float("nan"),
        )

    def probe(name: str, s: str, cat: str, key: str) -> float:
        return probe_value(res, name, s, cat, key)

    def qa(name: str, s: str) -> float:
        return next((r["accuracy"] for r in res[name]["qa"] if r["eval_set"] == s), float("nan"))

    cats = sorted({r["category"] for n in res for r in res[n]["probe"]})
    title = (
        "Project defaults"
        if args.recipe == "default"
        else "The reference code's recipe (`--recipe reference`)"
    )
    lines = [
        f"## {title}",
        "",
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {platform.machine()}, "
        f"{len(os.sched_getaffinity(0))} CPU cores, no GPU; python {platform.python_version()}",
        f"- command: `.venv/bin/python bench/reproduce.py {' '.join(sys.argv[1:])}`".rstrip(),
        f"- speech: espeak-ng -s 140 en-us, {speech['utterances']} utterances of the reference's manifest; "
        "held out by utterance hash (`heldout`); the bundled real clips (`real`)",
        f"- models: Whisper tiny.en (encoder frozen) + Q-Former + SmolLM2-135M-Instruct "
        f"({f'LoRA r{cfg.train.lora.r}' if cfg.train.lora else 'frozen' if cfg.train.freeze_llm else 'fully fine-tuned'}); {cfg.train.max_steps} steps of {cfg.train.batch_size} x "
        f"{cfg.train.nproc_per_node} processes ({cfg.train.ctc_warmup_steps} of them the connector's CTC warm start), "
        f"lr {cfg.train.lr:g}{f' (the warm start: {cfg.train.ctc_lr:g})' if cfg.train.ctc_lr else ''}, Q-Former dropout {cfg.train.qformer.dropout:g}; ASR answers as `{cfg.build.asr_answer}`",
        (
            "- report rebuilt from the work dirs (--report-only)"
            if args.report_only
            else "- this invocation's wall time: "
            + ", ".join(f"{name} {sec / 60:.1f} min" for name, sec in timings.items())
            + f", in all {total / 60:.1f} min (stages whose outputs were up to date were reused)"
        ),
        *(
            [
                f"- the CTC warm start ({cfg.train.ctc_warmup_steps} steps) trained once, in `warm-start/` on the "
                "ASR-only examples, and both arms started from its checkpoint (`train.init_from`) for their "
                f"{cfg.train.max_steps - cfg.train.ctc_warmup_steps} answer steps"
            ]
            if "warm-start" in WORKS
            else []
        ),
        f"- what each stage's current outputs cost when they were made (minutes, from the lineage store; speech "
        f"synthesis {speech['seconds'] / 60:.1f}): "
        + "; ".join(
            f"{name}: " + ", ".join(f"{st} {sec / 60:.1f}" for st, sec in stages.items())
            for name, stages in cost["stages"].items()
        ),
        f"- a cold run (synthesis, then every stage of both experiments, the shared ones once): "
        f"{cost['cold_s'] / 60:.1f} min; a rerun that changes only training settings (train and evaluate of "
        f"both): {cost['rerun_s'] / 60:.1f} min. Both leave out each flow's start-up (about 20 s).",
        "",
        "### WER % (Whisper tiny.en alone, measured in the same run, beside the LSMs)",
        "",
        "| eval set | Whisper tiny.en | ASR-only LSM | self-powered LSM |",
        "|---|---:|---:|---:|",
    ]
    for s in eval_sets:
        lines.append(
            f"| {s} | {100 * wer('self-powered', s, 'whisper'):.1f} | {100 * wer('asr-only', s):.1f} | "
            f"{100 * wer('self-powered', s):.1f} |"
        )
    lines += [
        "",
        "### Anchor rate % (lower: the model does the task instead of transcribing) and chrF vs SmolLM2",
        "",
    ]
    lines += [
        "| eval set | category | SmolLM2 on text (floor) | ASR-only | self-powered | ASR-only (own ASR) | "
        "self-powered (own ASR) | chrF ASR-only | chrF self-powered |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in eval_sets:
        for c in cats:
            own = [probe(n, s, c, "anchor_rate_own") for n in ("asr-only", "self-powered")]
            lines.append(
                f"| {s} | {c} | {100 * ceiling.get(c, float('nan')):.1f} | "
                f"{100 * probe('asr-only', s, c, 'anchor_rate'):.1f} | {100 * probe('self-powered', s, c, 'anchor_rate'):.1f} | "
                f"{100 * own[0]:.1f} | {100 * own[1]:.1f} | "
                f"{probe('asr-only', s, c, 'self_consistency_chrf'):.1f} | {probe('self-powered', s, c, 'self_consistency_chrf'):.1f} |"
            )
    lines += [
        "",
        "### Spoken yes/no QA accuracy %",
        "",
        "| eval set | ASR-only | self-powered |",
        "|---|---:|---:|",
    ]
    for s in eval_sets:
        lines.append(f"| {s} | {100 * qa('asr-only', s):.1f} | {100 * qa('self-powered', s):.1f} |")
    lines += ["", f"![Anchor rate per category]({plot_path(args.recipe).name})", ""]
    lines += [
        "### Does the model use the speech?",
        "",
        "Answer-token loss (nats) on each held-out set's first 48 ASR examples with their own speech, with each "
        "row's speech swapped for another clip's, and with zeros; `later` counts the answer tokens after the first, "
        "where a model that only recalls a sentence from its first word gains nothing from the speech. Equal own "
        "and swapped losses mean the connector passes nothing the LLM can use.",
        "",
        "| eval set | model | own | swapped | zeroed | own, later | swapped, later | swap gap | later-token gap | examples |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    gaps: dict[tuple[str, str], dict] = {}
    for s in eval_sets:
        for name in ("asr-only", "self-powered"):
            g = gaps[s, name] = grounding(WORKS[name], s)
            lines.append(
                f"| {s} | {name} | {g['own']:.3f} | {g['swapped']:.3f} | {g['zeroed']:.3f} | {g['own_later']:.3f} | "
                f"{g['swapped_later']:.3f} | {g['swap_gap']:.3f} | {g['swap_gap_later']:.3f} | {g['n']} |"
            )
    curves = {
        name: learning_curve(WORKS[name])
        for name in ("warm-start", "asr-only", "self-powered")
        if name in WORKS
    }
    if any(curves.values()):
        lines += [
            "",
            "### Learning curve (train.validation: the held-out rows' loss while training)",
            "",
            "| model | step | split | rows | own | swapped | zeroed | later-token gap |",
            "|---|---:|---|---:|---:|---:|---:|---:|",
        ]
        for name, recs in curves.items():
            lines += [
                f"| {name} | {r['step']} | {r['validation']} | {r['rows']} | {r['own']:.3f} | "
                f"{r.get('swapped', float('nan')):.3f} | {r.get('zeroed', float('nan')):.3f} | "
                f"{r.get('swap_gap_later', float('nan')):.3f} |"
                for r in recs
            ]
    lines.append("")

    # goals, as issue 29 states them: on every held-out set
    goals = []
    for s in eval_sets:
        anchor = {n: mean(probe(n, s, c, "anchor_rate") for c in NON_ASR) for n in res}
        anchor_own = {n: mean(probe(n, s, c, "anchor_rate_own") for c in NON_ASR) for n in res}
        chrf = {n: mean(probe(n, s, c, "self_consistency_chrf") for c in cats) for n in res}
        w_whisper = wer("self-powered", s, "whisper")
        for n in ("asr-only", "self-powered"):
            key = n.replace("-", "_")
            goals.append(
                (
                    f"wer_{key}_{s}",
                    f"{100 * wer(n, s):.1f}% vs Whisper tiny.en {100 * w_whisper:.1f}%",
                    "<= Whisper + 15 points",
                    wer(n, s) <= w_whisper + 0.15,
                )
            )
            gap = gaps[s, n]["swap_gap"]
            goals.append((f"swap_gap_{key}_{s}", f"{gap:.2f} nats", ">= 1", gap >= 1.0))
        asr_only = max(anchor["asr-only"], anchor_own["asr-only"])
        goals.append(
            (
                f"asr_only_anchor_rate_{s}",
                f"{100 * anchor['asr-only']:.1f}% (own-ASR measure {100 * anchor_own['asr-only']:.1f}%)",
                ">= 20% by either measure",
                asr_only >= 0.20,
            )
        )
        goals.append(
            (
                f"anchor_rate_halved_{s}",
                f"self-powered {100 * anchor['self-powered']:.1f}% / {100 * anchor_own['self-powered']:.1f}% vs "
                f"ASR-only {100 * anchor['asr-only']:.1f}% / {100 * anchor_own['asr-only']:.1f}% (transcript / own ASR)",
                "self-powered <= half of ASR-only by both measures, with an ASR-only rate above 0 to halve",
                # 0 <= 0 / 2 would read as met when neither model transcribes at all: that shows no effect
                all(
                    a["asr-only"] > 0 and a["self-powered"] <= a["asr-only"] / 2 for a in (anchor, anchor_own)
                ),
            )
        )
        goals.append(
            (
                f"chrf_above_asr_only_{s}",
                f"self-powered {chrf['self-powered']:.1f} vs ASR-only {chrf['asr-only']:.1f}",
                "self-powered above",
                chrf["self-powered"] > chrf["asr-only"],
            )
        )
        goals.append(
            (
                f"wer_self_powered_vs_asr_only_{s}",
                f"{100 * (wer('self-powered', s) - wer('asr-only', s)):+.1f} points",
                "<= +5 points",
                wer("self-powered", s) <= wer("asr-only", s) + 0.05,
            )
        )
        acc = qa("self-powered", s)
        goals.append((f"qa_above_chance_{s}", f"{100 * acc:.1f}%", "> 50% (yes/no)", acc > 0.5))
    goals.append(("cold_minutes", f"{cost['cold_s'] / 60:.1f}", "<= 120", cost["cold_s"] <= 7200))
    goals.append(("rerun_minutes", f"{cost['rerun_s'] / 60:.1f}", "<= 60", cost["rerun_s"] <= 3600))
    lines += ["### Goals", ""] + [
        f"- goal {g}: {m} (target {t}) {'met' if ok else 'not met'}" for g, m, t, ok in goals
    ]
    SECTIONS.mkdir(exist_ok=True)
    (SECTIONS / f"reproduce-{args.recipe}.md").write_text("\n".join(lines) + "\n")
    parts = [SECTIONS / f"reproduce-{r}.md" for r in RECIPES if (SECTIONS / f"reproduce-{r}.md").exists()]
    if (SECTIONS / "throughput.md").exists():  # what training and decoding cost now (bench/throughput.py)
        parts.insert(0, SECTIONS / "throughput.md")
    RESULTS.write_text(
        "# The paper's central result in miniature\n\n"
        "Each section comes from one `bench/reproduce.py` invocation (its command and date are in it).\n\n"
        + "\n".join(p.read_text() for p in parts)
    )
    plot(res, cats, eval_sets[0], ceiling, plot_path(args.recipe))
    print("\n".join(lines[8:]))
    for g, m, t, ok in goals:
        print(f"goal {g}: {m} (target {t}) {'met' if ok else 'not met'}")


def probe_value(res: dict, name: str, s: str, cat: str, key: str) -> float:
    """One figure of experiment ``name``'s probe metrics for eval set ``s`` and category ``cat`` (nan if none)."""
    return next(
        (r.get(key, float("nan")) for r in res[name]["probe"] if r["eval_set"] == s and r["category"] == cat),
        float("nan"),
    )


def plot(res: dict, cats: list[str], s: str, ceiling: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.27
    rows = [("SmolLM2 on text", [ceiling.get(c, float("nan")) for c in cats])]
    rows += [
        (label, [probe_value(res, name, s, c, "anchor_rate") for c in cats])
        for name, label in (("asr-only", "ASR-only"), ("self-powered", "self-powered"))
    ]
    for k, (label, vals) in enumerate(rows):
        ax.bar(
            [i + (k - 1) * width for i in range(len(cats))],
            [100 * (v if v == v else 0) for v in vals],
            width,
            label=label,
        )
    ax.set_xticks(range(len(cats)))
    ax.set_xticklabels(cats, rotation=20)
    ax.set_ylabel("anchor rate %")
    ax.set_title(f"Speech anchor bias on the {s} set: answers that are the transcript")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
