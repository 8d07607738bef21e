"""The evaluation report: Markdown and HTML with tables and PNG plots, and Prefect artifacts in a flow.

Everything here reads the stage's tables (or rows shaped like them); nothing is computed that the
tables do not hold, so the report and the Parquet files cannot disagree. Beside each worst utterance and each
example answer the HTML has an audio player: the clip as the model heard it (16 kHz mono FLAC) in the folder
``audio/`` beside the report, linked by relative path so the report plays when opened from disk.
"""

from __future__ import annotations

import math
import re
import textwrap
from pathlib import Path

from core import audio
from core.atomic import atomic_dir, atomic_file
from core.paths import EvaluatePaths

PLOTS = EvaluatePaths.PLOTS  # role -> file name; the report links them by name, side by side with it
EXAMPLES_PER_CATEGORY = 3  # answers shown per category ("What the model answered")


def pct(x: float | None) -> str:
    return "n/a" if x is None or x != x else f"{100 * x:.1f}"


def num(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None or x != x else f"{x:.{digits}f}"


def _cell(s: object) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def table_md(header: list[str], rows: list[list[object]], align: str = "") -> list[str]:
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---:" if a == "r" else "---" for a in align]
    return [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join(sep) + " |",
        *("| " + " | ".join(_cell(c) for c in r) + " |" for r in rows),
    ]


def worst_utterances(preds: list[dict], n: int) -> list[dict]:
    """The n utterances with the highest WER (most errors first among equals); empty references excluded."""
    scored = [p for p in preds if p["ref_words"] > 0]
    return sorted(scored, key=lambda p: (-p["errors"] / p["ref_words"], -p["errors"], p["utt_id"]))[:n]


def answer_examples(preds: list[dict], probe_rows: list[dict], n: int = EXAMPLES_PER_CATEGORY) -> dict:
    """A few answers per category, the first ``n`` by (eval set, utterance): ``asr`` from the model's
    transcripts (``preds``), each probe category from ``probe_rows`` (the probe table's rows)."""
    out = {"asr": sorted(preds, key=lambda p: (p["eval_set"], p["utt_id"]))[:n]}
    for r in sorted(probe_rows, key=lambda r: (r["eval_set"], r["utt_id"])):
        rows = out.setdefault(r["category"], [])
        if len(rows) < n:
            rows.append(r)
    return out


def _clip_name(n: int, utt_id: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", utt_id)[:60].strip("._") or "clip"
    return f"{n:03d}-{safe}.flac"


def write_clips(folder: Path, wanted: list[tuple[str, str]], where: dict[tuple[str, str], tuple]) -> dict:
    """Write each wanted (eval set, utterance)'s clip as the model heard it (16 kHz mono, 16-bit FLAC) into
    ``folder``, replaced whole; ``where`` maps a key to (audio path, offset s, duration s). Returns key -> the
    link relative to the report; a clip that cannot be read gets none."""
    import soundfile as sf

    links: dict[tuple[str, str], str] = {}
    with atomic_dir(folder) as tmp:
        for key in dict.fromkeys(wanted):
            if key not in where:
                continue
            path, offset_s, duration_s = where[key]
            try:
                x = audio.load(path, offset_s, duration_s)
            except audio.AudioError:
                continue
            name = _clip_name(len(links), key[1])
            sf.write(str(tmp / name), x, audio.TARGET_SR, format="FLAC", subtype="PCM_16")
            links[key] = f"{folder.name}/{name}"
    return links


def _listen(links: dict, eval_set: str, utt_id: str) -> str:
    href = links.get((eval_set, utt_id))
    return f"[listen]({href})" if href else "n/a"


def bar_figure(
    labels: list[str],
    series: dict[str, list[float]],
    title: str,
    ylabel: str,
    ylim: tuple[float, float] | None = None,
):
    """A bar chart (a matplotlib Figure) of ``series`` per label, each bar labelled with its value. ``ylim``:
    the y range (a rate's 0 to 100); by default 0 to a little over the highest bar, at least 0 to 5."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(labels) * max(1, len(series)) + 2), 3.6))
    if not labels:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
    else:
        width = 0.8 / max(1, len(series))
        for k, (name, values) in enumerate(series.items()):
            xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(labels))]
            ys = [0.0 if v is None or v != v else v for v in values]
            bars = ax.bar(xs, ys, width, label=name)
            for b, v in zip(bars, values, strict=True):
                text = "n/a" if v is None or v != v else f"{v:.1f}"
                ax.annotate(
                    text,
                    (b.get_x() + b.get_width() / 2, b.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
        ax.set_xticks(range(len(labels)))
        # Utterance ids and set/category names are long: slant them rather than let them overlap.
        slant = len(labels) > 4 or max(len(x) for x in labels) * len(labels) > 40
        ax.set_xticklabels(labels, rotation=30 if slant else 0, ha="right" if slant else "center")
        if len(series) > 1:
            ax.legend(fontsize=8)
    if ylim is None:
        values = [v for vs in series.values() for v in vs if v is not None and v == v]
        ylim = (0.0, max(5.0, 1.15 * max(values, default=0.0)))
    ax.set_ylim(*ylim)
    ax.set_title("\n".join(textwrap.wrap(title, 55)))  # a narrow figure keeps all of a long title
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    return fig


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def wer_figure(metrics: list[dict]):
    """WER per eval set: the speech-text model, and its Whisper alone beside it where there is that row."""
    sets = list(dict.fromkeys(m["eval_set"] for m in metrics))
    by = {(m["eval_set"], m["system"]): m["wer"] for m in metrics}
    series = {"LSM WER %": [100 * by.get((s, "lsm"), float("nan")) for s in sets]}
    if any(sys_ == "whisper" for _, sys_ in by):
        series["Whisper alone WER %"] = [100 * by.get((s, "whisper"), float("nan")) for s in sets]
    return bar_figure(sets, series, "WER per eval set", "WER %")


def anchor_figure(probe: list[dict], baseline: list[dict] | None, names=("this model", "baseline")):
    """Anchor rate per category on 0 to 100% (beside a baseline's where given)."""
    labels = [
        f"{r['category']}" if len({p["eval_set"] for p in probe}) < 2 else f"{r['eval_set']}/{r['category']}"
        for r in probe
    ]
    series = {names[0]: [100 * r["anchor_rate"] for r in probe]}
    if baseline is not None:
        base = {(r["eval_set"], r["category"]): r["anchor_rate"] for r in baseline}
        series[names[1]] = [100 * base.get((r["eval_set"], r["category"]), float("nan")) for r in probe]
    return bar_figure(
        labels,
        series,
        "Speech anchor rate per category (lower follows the instruction)",
        "anchor rate %",
        ylim=(0.0, 100.0),  # a rate: 0 to 100 whatever the values (all zero too)
    )


def worst_figure(worst: list[dict]):
    return bar_figure(
        [p["utt_id"] for p in worst],
        {"WER %": [100 * p["errors"] / p["ref_words"] for p in worst]},
        "Worst utterances",
        "WER %",
    )


def plot_anchor(
    path: Path, probe: list[dict], baseline: list[dict] | None, names=("this model", "baseline")
) -> None:
    _save(anchor_figure(probe, baseline, names), path)


def write_plots(out: EvaluatePaths, metrics, probe, baseline, worst) -> None:
    _save(wer_figure(metrics), out.plot("wer_plot"))
    _save(anchor_figure(probe, baseline), out.plot("anchor_plot"))
    _save(worst_figure(worst), out.plot("worst_plot"))


def report_markdown(ctx: dict) -> str:
    """ctx: checkpoint, examples, examples_hash, settings, metrics, preds (the LSM's), reference_note, probe,
    probe_note, qa, qa_note, rejects, missing_sets, baseline (probe metrics or None), baseline_name, worst;
    optional: answers (``answer_examples``), audio_links ((eval set, utterance) -> link, ``write_clips``)."""
    m, rejects = ctx["metrics"], ctx["rejects"]
    links = ctx.get("audio_links") or {}
    lines = ["# Evaluation report", ""]
    partial = []
    if rejects:
        partial.append(
            f"{len(rejects)} eval rows or questions were rejected and are not in the figures below"
        )
    if ctx["missing_sets"]:
        partial.append("eval sets with no rows: " + ", ".join(ctx["missing_sets"]))
    if partial:
        lines += [f"> **Partial data**: {'; '.join(partial)}.", ""]
    lines += [
        f"- checkpoint: `{ctx['checkpoint']}`",
        f"- eval data: `{ctx['examples']}` ({ctx['examples_hash'][:19]})",
        f"- decoding: {ctx['settings']}",
        "",
        "## WER",
        "",
        "WER (%) after openai-whisper's English text normalizer on both sides, corpus-level per eval set "
        "(all errors over all reference words). RTFx: seconds of audio per second of decoding. System `lsm` is "
        "the speech-text model; `whisper` is the Whisper its encoder came from, transcribing the same clips on "
        "its own (the reference row).",
        "",
    ]
    if ctx.get("reference_note"):
        lines += [f"Whisper reference row: not run: {ctx['reference_note']}.", ""]
    lines += table_md(
        [
            "eval set",
            "system",
            "task",
            "utterances",
            "ref words",
            "sub",
            "del",
            "ins",
            "hits",
            "WER %",
            "empty refs",
            "rejected (audio)",
            "audio s",
            "decode s",
            "RTFx",
        ],
        [
            [
                r["eval_set"],
                r["system"],
                r["task"],
                r["n_utterances"],
                r["n_ref_words"],
                r["substitutions"],
                r["deletions"],
                r["insertions"],
                r["hits"],
                pct(r["wer"]),
                r["empty_references"],
                r["rejected"],
                num(r["audio_s"]),
                num(r["decode_s"], 2),
                num(r["rtfx"], 2),
            ]
            for r in m
        ],
        "lll" + "r" * 12,
    )
    lines += ["", f"![WER per eval set]({PLOTS['wer_plot']})", "", "## Speech-anchor-bias probe", ""]
    if ctx["probe"]:
        lines += [
            "The model gets each non-ASR instruction with the speech. Anchored: the answer's WER against the "
            f"transcript is below {ctx['probe'][0]['anchor_wer_threshold']:g} (the model transcribed instead). "
            "Anchored (own ASR): the same test against the model's own transcription of the clip, which holds "
            "when its ASR is imperfect (an answer that is its transcription, errors and all, counts); these are "
            "the project's definitions, the paper's is in words only. "
            "Self-consistency: corpus chrF (0-100) of the answers against the LLM's own text answers.",
            "",
        ]
        base = {(r["eval_set"], r["category"]): r for r in ctx["baseline"] or []}
        header = [
            "eval set",
            "category",
            "items",
            "anchored",
            "anchor rate %",
            "anchor rate % (own ASR)",
            "chrF",
            "empty transcripts",
            "rejected",
        ]
        if ctx["baseline"] is not None:
            header += [f"anchor rate % ({ctx['baseline_name']})", f"chrF ({ctx['baseline_name']})"]
        rows = []
        for r in ctx["probe"]:
            row = [
                r["eval_set"],
                r["category"],
                r["n_items"],
                r["n_anchored"],
                pct(r["anchor_rate"]),
                pct(r["anchor_rate_own"]),
                num(r["self_consistency_chrf"]),
                r["empty_transcripts"],
                r["rejected"],
            ]
            if ctx["baseline"] is not None:
                b = base.get((r["eval_set"], r["category"]))
                row += [pct(b["anchor_rate"]), num(b["self_consistency_chrf"])] if b else ["n/a", "n/a"]
            rows.append(row)
        lines += table_md(header, rows, "ll" + "r" * (len(header) - 2))
        lines += ["", f"![Anchor rate per category]({PLOTS['anchor_plot']})"]
    else:
        lines += [f"Not run: {ctx['probe_note']}"]
    lines += _answers_md(ctx.get("answers") or {}, links)
    lines += ["", "## Spoken yes/no QA", ""]
    if ctx["qa"]:
        lines += table_md(
            ["eval set", "question set", "questions", "correct", "unparsed", "accuracy %", "rejected"],
            [
                [
                    r["eval_set"],
                    r["source"],
                    r["n_questions"],
                    r["n_correct"],
                    r["n_unparsed"],
                    pct(r["accuracy"]),
                    r["rejected"],
                ]
                for r in ctx["qa"]
            ],
            "llrrrrr",
        )
    else:
        lines += [f"Not run: {ctx['qa_note']}"]
    lines += ["", "## Worst utterances", ""]
    if ctx["worst"]:
        lines += table_md(
            [
                "utterance",
                "eval set",
                "audio",
                "WER %",
                "errors",
                "reference (normalized)",
                "hypothesis (normalized)",
            ],
            [
                [
                    p["utt_id"],
                    p["eval_set"],
                    _listen(links, p["eval_set"], p["utt_id"]),
                    pct(p["errors"] / p["ref_words"]),
                    p["errors"],
                    p["reference_norm"],
                    p["hypothesis_norm"],
                ]
                for p in ctx["worst"]
            ],
            "lllrrll",
        )
        lines += ["", f"![Worst utterances]({PLOTS['worst_plot']})"]
    else:
        lines += ["No scored utterances."]
    lines += ["", "## Rejects", "", f"{len(rejects)} eval rows rejected" + (":" if rejects else ".")]
    lines += [f"- `{rj['utt_id']}` ({rj['corpus']}): {rj['reason']}: {rj['detail']}" for rj in rejects[:50]]
    if len(rejects) > 50:
        lines.append(f"- ... and {len(rejects) - 50} more in rejects.parquet")
    return "\n".join(lines) + "\n"


def _answers_md(answers: dict, links: dict) -> list[str]:
    """The section "What the model answered": a few answers per category, each beside its clip."""
    if not answers:
        return []
    lines = [
        "",
        "## What the model answered",
        "",
        f"The first {EXAMPLES_PER_CATEGORY} eval utterances of each category (by utterance id), with the clip as "
        "the model heard it. ASR: the model's transcript beside the reference. Other categories: the model's "
        "answer from the speech beside the LLM's own answer from the transcript (what it was taught to give); "
        "anchored: the answer is the transcript (see the probe above).",
    ]
    for category, rows in answers.items():
        lines += ["", f"### {category}", ""]
        if not rows:
            lines.append("No answers.")
        elif category == "asr":
            lines += table_md(
                ["utterance", "eval set", "audio", "WER %", "reference", "the model's transcript"],
                [
                    [
                        p["utt_id"],
                        p["eval_set"],
                        _listen(links, p["eval_set"], p["utt_id"]),
                        pct(p["errors"] / p["ref_words"]) if p["ref_words"] else "n/a",
                        p["reference"],
                        p["hypothesis"],
                    ]
                    for p in rows
                ],
                "lllrll",
            )
        else:
            lines += table_md(
                [
                    "utterance",
                    "audio",
                    "instruction",
                    "transcript",
                    "the LLM's answer (from the text)",
                    "the model's answer (from the speech)",
                    "anchored",
                ],
                [
                    [
                        r["utt_id"],
                        _listen(links, r["eval_set"], r["utt_id"]),
                        r["instruction"],
                        r["transcript"],
                        r["llm_answer"],
                        r["answer"],
                        "yes" if r["anchored"] else "no",
                    ]
                    for r in rows
                ],
                "lllllll",
            )
    return lines


def report_html(
    markdown_text: str, title: str = "Evaluation report", audio_links: frozenset[str] | set[str] = frozenset()
) -> str:
    """The Markdown report as one HTML page; each link to one of ``audio_links`` (the clips ``write_clips``
    wrote) becomes an audio player."""
    import html
    import xml.etree.ElementTree as ET

    import markdown
    from markdown.treeprocessors import Treeprocessor

    class Players(Treeprocessor):
        def run(self, root):
            for a in list(root.iter("a")):
                href = a.get("href")
                if href in audio_links:
                    a.tag, a.text = "audio", None
                    a.attrib.clear()
                    a.attrib.update(controls="controls", preload="metadata", src=href)
                    fallback = ET.SubElement(a, "a", href=href)  # where audio does not play: the file
                    fallback.text = "listen"

    # The report quotes data (reject details, ids, model answers): none of it may become markup in the page.
    # Python-Markdown passes raw HTML through; without its two raw-HTML rules it escapes it as text.
    md = markdown.Markdown(extensions=["tables"])
    md.preprocessors.deregister("html_block")
    md.inlinePatterns.deregister("html")
    md.treeprocessors.register(Players(md), "players", 5)  # after the inline patterns made the links
    body = md.convert(markdown_text)
    title = html.escape(title)
    style = (
        "body{font-family:sans-serif;max-width:72em;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.25em .6em}"
        "th{background:#f3f3f3}blockquote{background:#fff4e0;border-left:4px solid #e90;margin:0;padding:.5em 1em}"
        "audio{height:2em;width:16em;vertical-align:middle}"
    )
    return f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{title}</title><style>{style}</style></head>\n<body>\n{body}\n</body></html>\n'


def _jsonable(rows: list[dict]) -> list[dict]:
    return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]


def publish_artifacts(out: EvaluatePaths) -> bool:
    """Publish a finished evaluation (report and summary tables) as Prefect artifacts; False outside a run.

    The flow's evaluate task calls this after the stage, in the flow's own process, so the artifacts
    appear whether the stage ran in-process, in a subprocess or in a container, and for reused outputs.
    """
    from prefect.context import FlowRunContext, TaskRunContext

    from core.tables import read_table
    from schemas import METRICS, PROBE_METRICS, QA_METRICS

    if FlowRunContext.get() is None and TaskRunContext.get() is None:
        return False
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    create_markdown_artifact(
        markdown=out.report.read_text(),
        key="evaluation-report",
        description=f"Evaluation report ({out.dir})",
    )
    for name, schema in (("metrics", METRICS), ("probe_metrics", PROBE_METRICS), ("qa_metrics", QA_METRICS)):
        rows = read_table(out.table(name), schema).to_pylist()
        create_table_artifact(
            table=_jsonable(rows),
            key=f"evaluation-{name.replace('_', '-')}",
            description=f"{name} ({out.dir})",
        )
    return True
