"""report.html, the report a person reads: data it quotes (reject details, ids, model answers) never becomes markup;
rates plot on 0 to 100%; on a work directory the whole DAG made (``evaluated``), each worst utterance and each
answer it shows per category has a player whose clip is that utterance as the model heard it, in ``audio/``
beside the report, and plays when the report is opened from disk in chromium."""

from __future__ import annotations

import time
from html.parser import HTMLParser

import numpy as np
import pyarrow.parquet as pq
from helpers_browser import chromium, screenshot

from core import audio
from core.paths import WorkPaths
from stages.evaluate.report import anchor_figure, report_html, table_md, wer_figure

HOSTILE = "<script>alert(1)</script>"
IMG = '<img src=x onerror="alert(2)">'


def test_report_html_escapes_data_in_tables_lists_and_the_title():
    md = "\n".join(
        ["# Evaluation", ""]
        + table_md(["utterance", "answer"], [[IMG, HOSTILE]])
        + ["", "## Rejects", "", f"- `{IMG}` (corpus): corrupt_audio: {HOSTILE}", "", f"> note {IMG}"]
    )
    page = report_html(md, title=f"report {HOSTILE}")
    assert "<script" not in page and "<img" not in page
    assert (
        page.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 3
    )  # the title, the table cell, the reject line
    assert page.count("&lt;img src=x") == 3  # the table cell, the code span, the quote
    # the report's own markup still renders
    assert (
        "<table>" in page
        and "<li><code>" in page
        and "<blockquote>" in page
        and "<h1>Evaluation</h1>" in page
    )


def test_a_link_in_quoted_data_stays_a_link_only_the_report_s_own_clips_play():
    md = "\n".join(
        table_md(
            ["utterance", "audio", "answer"],
            [["u1", "[listen](audio/000-u1.flac)", "[listen](audio/001-evil.flac)"]],
        )
    )
    page = report_html(md, audio_links={"audio/000-u1.flac"})
    assert page.count("<audio") == 1 and 'src="audio/000-u1.flac"' in page
    assert '<a href="audio/001-evil.flac">listen</a>' in page  # a model's answer cannot make a player


def test_rates_plot_on_0_to_100_and_wer_from_0_whatever_the_values():
    import matplotlib.pyplot as plt

    zero = [dict(eval_set="test-clean", category=c, anchor_rate=0.0) for c in ("sentiment", "repeat")]
    half = [dict(eval_set="test-clean", category="sentiment", anchor_rate=0.5)]
    figs = {
        "all zero": anchor_figure(zero, None),  # ran from -0.04 to 0.04 before
        "with a baseline": anchor_figure(half, zero),
    }
    for name, fig in figs.items():
        assert fig.axes[0].get_ylim() == (0.0, 100.0), name
    wer = {
        0.0: wer_figure([dict(eval_set="a", system="lsm", wer=0.0)]),
        0.04: wer_figure([dict(eval_set="a", system="lsm", wer=0.04)]),
        1.32: wer_figure(
            [dict(eval_set="a", system="lsm", wer=1.32), dict(eval_set="a", system="whisper", wer=0.05)]
        ),
    }
    assert wer[0.0].axes[0].get_ylim() == (0.0, 5.0) and wer[0.04].axes[0].get_ylim() == (0.0, 5.0)
    bottom, top = wer[1.32].axes[0].get_ylim()
    assert bottom == 0.0 and 132 < top < 160  # the highest bar and its label fit
    for fig in [*figs.values(), *wer.values()]:
        plt.close(fig)


class _Tables(HTMLParser):
    """The report's table rows: (h2, h3, cell texts, audio sources in the row)."""

    def __init__(self):
        super().__init__()
        self.h2 = self.h3 = ""
        self.rows, self.row, self.cell, self.head = [], None, None, None

    def handle_starttag(self, tag, attrs):
        if tag in ("h2", "h3"):
            self.head = tag
            setattr(self, tag, "")
            if tag == "h2":
                self.h3 = ""
        elif tag == "tr":
            self.row = ([], [])
        elif tag == "td" and self.row is not None:
            self.cell = ""
        elif tag == "audio" and self.row is not None:
            self.row[1].append(dict(attrs)["src"])

    def handle_endtag(self, tag):
        if tag in ("h2", "h3"):
            self.head = None
        elif tag == "td" and self.row is not None:
            self.row[0].append(self.cell)
            self.cell = None
        elif tag == "tr" and self.row is not None:
            if self.row[0]:
                self.rows.append((self.h2, self.h3, *self.row))
            self.row = None

    def handle_data(self, data):
        if self.head:
            setattr(self, self.head, getattr(self, self.head) + data)
        elif self.cell is not None:
            self.cell += data


def test_the_report_plays_each_worst_utterance_and_each_answer_it_shows(evaluated, tmp_path):
    import soundfile as sf

    out = WorkPaths(evaluated).evaluate
    page = out.report_html.read_text()
    assert len(page) < 100_000  # clips are linked, not embedded
    parsed = _Tables()
    parsed.feed(page)
    lsm = [p for p in pq.read_table(out.table("predictions")).to_pylist() if p["system"] == "lsm"]
    probe = pq.read_table(out.table("probe")).to_pylist()
    categories = [r["category"] for r in pq.read_table(out.table("probe_metrics")).to_pylist()]
    clips = {
        (r["split"], r["utt_id"]): r
        for r in pq.read_table(WorkPaths(evaluated).build.examples).to_pylist()
        if r["task"] == "asr"
    }
    assert lsm and probe and categories
    played = {}  # src -> (eval set, utterance)

    def rows(h2: str, h3: str = "") -> list:
        return [(cells, srcs) for a, b, cells, srcs in parsed.rows if a == h2 and b == h3]

    worst = rows("Worst utterances")
    assert sorted(c[0] for c, _ in worst) == sorted(p["utt_id"] for p in lsm)  # 3 clips, worst_n 10
    for cells, srcs in worst:
        assert len(srcs) == 1
        played[srcs[0]] = (cells[1], cells[0])
    shown = rows("What the model answered", "asr")
    assert [c[0] for c, _ in shown] == sorted(p["utt_id"] for p in lsm)[:3]
    hyp = {p["utt_id"]: p["hypothesis"] for p in lsm}
    for cells, srcs in shown:
        assert len(srcs) == 1 and cells[5] == hyp[cells[0]]
        played[srcs[0]] = (cells[1], cells[0])
    for category in categories:
        answers = {r["utt_id"]: r for r in probe if r["category"] == category}
        shown = rows("What the model answered", category)
        assert [c[0] for c, _ in shown] == sorted(answers)[:3]
        for cells, srcs in shown:
            r = answers[cells[0]]
            assert cells[2:6] == [r["instruction"], r["transcript"], r["llm_answer"], r["answer"]]
            assert len(srcs) == 1
            played[srcs[0]] = (r["eval_set"], r["utt_id"])
    # each player's clip is the utterance it stands beside, as the model heard it, in audio/ beside the report
    assert set(played) == {f"audio/{f.name}" for f in out.audio.iterdir()}
    for src, key in played.items():
        assert src.startswith("audio/") and ".." not in src
        info = sf.info(str(out.dir / src))
        assert (info.format, info.samplerate, info.channels) == ("FLAC", 16000, 1)
        heard = audio.load(clips[key]["audio_path"], clips[key]["offset_s"], clips[key]["duration_s"])
        x, _ = sf.read(str(out.dir / src), dtype="float32")
        assert len(x) == len(heard) and np.abs(x - heard).max() < 2e-4, src
    assert "[listen](audio/" in out.report.read_text()  # the Markdown links the same files
    # opened from disk in a browser, every player has its clip
    with chromium() as driver:
        driver.get(out.report_html.as_uri())
        deadline = time.monotonic() + 30
        while True:
            states = driver.execute_script(
                "return Array.from(document.querySelectorAll('audio'))"
                ".map(a => [a.getAttribute('src'), a.readyState, a.duration, a.error && a.error.code])"
            )
            if all(s[1] >= 1 or s[3] for s in states) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert len(states) == len(worst) + sum(
            len(rows("What the model answered", c)) for c in ["asr", *categories]
        )
        for src, ready, duration, error in states:
            key = played[src]
            assert error is None and ready >= 1, src
            assert abs(duration - clips[key]["duration_s"]) < 0.05, src
        driver.execute_script("document.querySelectorAll('h2')[2].scrollIntoView()")
        screenshot(driver, tmp_path, "report.png")
