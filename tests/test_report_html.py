"""report.html quotes data it does not control (reject details, utterance and question ids, model answers): none of
it may become markup in the page."""

from __future__ import annotations

from stages.evaluate.report import report_html, table_md

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
