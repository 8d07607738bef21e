"""Compare two evaluated workdirs: WER, anchor rate and self-consistency per category, QA accuracy.

The typical use is the probe comparison of the demo: the ASR-only model (configs/demo-asr-only.yaml)
as A, the self-powered one (configs/demo.yaml) as B. Figures are read from each workdir's evaluate
tables; the comparison also says when the two probes did not ask the same (utterance, category) items,
since rates over different items do not compare.
"""

from __future__ import annotations

from pathlib import Path

from core.atomic import write_text
from core.paths import WorkPaths
from core.tables import read_table
from schemas import METRICS, PROBE, PROBE_METRICS, QA_METRICS
from stages.evaluate.report import num, pct, plot_anchor, table_md


def load(workdir: Path) -> dict:
    d = WorkPaths(workdir).evaluate
    if not d.table("metrics").exists():
        raise FileNotFoundError(
            f"{workdir}: no evaluation found ({d.table('metrics')} does not exist); run `splsm evaluate` there first"
        )
    return dict(
        metrics=read_table(d.table("metrics"), METRICS).to_pylist(),
        probe=read_table(d.table("probe"), PROBE).to_pylist(),
        probe_metrics=read_table(d.table("probe_metrics"), PROBE_METRICS).to_pylist(),
        qa=read_table(d.table("qa_metrics"), QA_METRICS).to_pylist(),
    )


def _diff(a: float | None, b: float | None) -> float:
    return float("nan") if a is None or b is None else b - a


def compare(workdir_a: Path, workdir_b: Path) -> dict:
    """Rows side by side (A, B, B - A); keys the rows of either side, missing values as None."""
    a, b = load(workdir_a), load(workdir_b)

    def join(key, rows_a, rows_b, fields):
        ia, ib = ({key(r): r for r in rows} for rows in (rows_a, rows_b))
        out = []
        for k in sorted(set(ia) | set(ib)):
            row = dict(zip(("eval_set", "name"), k, strict=True))
            for f in fields:
                va = ia[k][f] if k in ia else None
                vb = ib[k][f] if k in ib else None
                row[f] = (va, vb, _diff(va, vb))
            out.append(row)
        return out

    items = {
        w: {(p["eval_set"], p["utt_id"], p["category"]) for p in d["probe"]} for w, d in (("a", a), ("b", b))
    }
    return dict(
        a=str(workdir_a),
        b=str(workdir_b),
        wer=join(
            lambda r: (
                r["eval_set"],
                r["task"] if r["system"] == "lsm" else f"{r['task']} ({r['system']} alone)",
            ),
            a["metrics"],
            b["metrics"],
            ["wer", "rtfx"],
        ),
        probe=join(
            lambda r: (r["eval_set"], r["category"]),
            a["probe_metrics"],
            b["probe_metrics"],
            ["anchor_rate", "anchor_rate_own", "self_consistency_chrf", "n_items"],
        ),
        qa=join(lambda r: (r["eval_set"], r["source"]), a["qa"], b["qa"], ["accuracy", "n_questions"]),
        only_in_a=len(items["a"] - items["b"]),
        only_in_b=len(items["b"] - items["a"]),
        probe_metrics=(a["probe_metrics"], b["probe_metrics"]),
    )


def markdown(c: dict, name_a: str = "A", name_b: str = "B") -> str:
    lines = ["# Evaluation comparison", "", f"- {name_a}: `{c['a']}`", f"- {name_b}: `{c['b']}`", ""]
    if c["only_in_a"] or c["only_in_b"]:
        lines += [
            f"> **The probes differ**: {c['only_in_a']} items only in {name_a}, {c['only_in_b']} only in {name_b}; rates are over different items.",
            "",
        ]
    lines += ["## WER %", ""]
    lines += table_md(
        ["eval set", "task", name_a, name_b, f"{name_b} - {name_a}"],
        [[r["eval_set"], r["name"], pct(r["wer"][0]), pct(r["wer"][1]), pct(r["wer"][2])] for r in c["wer"]],
        "llrrr",
    )
    lines += ["", "## Speech-anchor-bias probe", ""]
    lines += table_md(
        [
            "eval set",
            "category",
            "items",
            f"anchor rate % {name_a}",
            f"anchor rate % {name_b}",
            f"{name_b} - {name_a}",
            f"own-ASR anchor rate % {name_a}",
            f"own-ASR anchor rate % {name_b}",
            f"chrF {name_a}",
            f"chrF {name_b}",
            f"{name_b} - {name_a}",
        ],
        [
            [
                r["eval_set"],
                r["name"],
                "/".join("n/a" if v is None else str(v) for v in r["n_items"][:2]),
                pct(r["anchor_rate"][0]),
                pct(r["anchor_rate"][1]),
                pct(r["anchor_rate"][2]),
                pct(r["anchor_rate_own"][0]),
                pct(r["anchor_rate_own"][1]),
                num(r["self_consistency_chrf"][0]),
                num(r["self_consistency_chrf"][1]),
                num(r["self_consistency_chrf"][2]),
            ]
            for r in c["probe"]
        ],
        "llrrrrrrrrr",
    )
    lines += ["", "## Spoken QA accuracy %", ""]
    lines += table_md(
        ["eval set", "question set", name_a, name_b, f"{name_b} - {name_a}"],
        [
            [r["eval_set"], r["name"], pct(r["accuracy"][0]), pct(r["accuracy"][1]), pct(r["accuracy"][2])]
            for r in c["qa"]
        ],
        "llrrr",
    )
    return "\n".join(lines) + "\n"


def write(c: dict, out_dir: Path, name_a: str = "A", name_b: str = "B") -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = write_text(
        out_dir / "compare.md",
        markdown(c, name_a, name_b) + "\n![Anchor rate per category](anchor_rate.png)\n",
    )
    a_rows, b_rows = c["probe_metrics"]
    plot_anchor(out_dir / "anchor_rate.png", b_rows, a_rows, names=(name_b, name_a))
    return [md, out_dir / "anchor_rate.png"]
