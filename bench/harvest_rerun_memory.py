"""Memory of an incremental rerun over a corpus that is not grouped by directory, against a baseline commit.

    .venv/bin/python bench/harvest_rerun_memory.py                    # 300,000 rows, this tree vs ff4dee0
    .venv/bin/python bench/harvest_rerun_memory.py --rows 50000 --baseline HEAD~3

Readers without directory units (JSONL/CSV manifests, Common Voice TSVs, GigaSpeech) check every row of a
rerun against the previous table by utterance id. This measures the peak RSS of such a rerun: a JSONL
manifest in the reference's ``{audio, text}`` form over N real-speech FLAC files (hard links to slices of
the bundled LibriSpeech clips), harvested cold, then again after 1% more rows. The baseline is the same
harvest with the code of another commit (by default ff4dee0, which read the previous table whole and
made Python lists of its columns), run from a ``git archive`` of it in a temp dir, in the same run.
Each harvest runs in its own process; peak RSS is that of its process tree (workers included), and of the
harvest process alone, from which the growth per row is taken.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harvest import _templates, checkout, timed_harvest  # noqa: E402

LINKS_PER_FILE = 60_000  # ext4 allows 65,000 links to one inode


def make_clips(root: Path, n: int, templates) -> list[str]:
    """``clips/u{i}.flac`` for i < n (hard links to a few real clips); the manifest line of each."""
    clips = root / "clips"
    clips.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        t = i % len(templates)
        src = root / "_templates" / f"{t}-{i // (LINKS_PER_FILE * len(templates))}.flac"
        if not src.exists():
            src.parent.mkdir(exist_ok=True)
            src.write_bytes(templates[t][0])
        os.link(src, clips / f"u{i:07d}.flac")
        lines.append(json.dumps({"audio": f"clips/u{i:07d}.flac", "text": templates[t][1]}))
    return lines


def rerun_peak(
    root: Path, lines: list[str], n: int, n_added: int, repo: Path, out: Path
) -> tuple[dict, dict]:
    """Harvest a manifest of the first ``n`` rows cold, then with ``n_added`` more rows."""
    manifest = root / "train.jsonl"
    spec = {"kind": "jsonl", "manifest": str(manifest)}
    manifest.write_text("\n".join(lines[:n]) + "\n")
    cold = timed_harvest(root, out, repo, **spec)
    assert cold["transcripts"] == n, cold
    manifest.write_text("\n".join(lines[: n + n_added]) + "\n")
    rerun = timed_harvest(root, out, repo, **spec)
    assert rerun["transcripts"] == n + n_added and rerun["probed"] == n_added, rerun
    shutil.rmtree(out)
    return cold, rerun


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=300_000)
    ap.add_argument("--added", type=float, default=0.01)
    ap.add_argument("--baseline", default="ff4dee0", help="commit whose harvest is the baseline")
    args = ap.parse_args()

    sizes = [args.rows // 4, args.rows]
    base = Path(tempfile.mkdtemp(prefix="bench-rerun-mem-"))
    try:
        root = base / "corpus"
        lines = make_clips(root, args.rows + max(1, int(args.rows * args.added)), _templates(0.5))
        trees = {"baseline " + args.baseline: checkout(args.baseline, base / "baseline"), "this tree": REPO}
        results: dict[str, dict[int, tuple[dict, dict]]] = {}
        for name, repo in trees.items():
            for n in sizes:
                cold, rerun = rerun_peak(root, lines, n, max(1, int(n * args.added)), repo, base / "out")
                results.setdefault(name, {})[n] = (cold, rerun)
                print(
                    f"{name}, {n:,} rows: cold {cold['wall_s']:.1f}s peak {cold['peak_rss'] / 2**20:,.0f} MiB; "
                    f"rerun {rerun['wall_s']:.2f}s peak {rerun['peak_rss'] / 2**20:,.0f} MiB"
                )
    finally:
        shutil.rmtree(base, ignore_errors=True)

    def slope(runs: dict[int, tuple[dict, dict]]) -> float:
        """Bytes of the harvest process's rerun peak per row, from the two sizes (what a bigger corpus adds).
        The process alone: worker processes start only when a rerun has over 2,048 files to probe, so the
        tree's peak jumps by their size between the two sizes, and that is not growth per row."""
        (n0, (_, r0)), (n1, (_, r1)) = sorted(runs.items())
        return (r1["main_peak_rss"] - r0["main_peak_rss"]) / (n1 - n0)

    def at(runs: dict[int, tuple[dict, dict]], rows: int) -> float:
        """The tree's rerun peak at ``rows``: the larger run's, plus the process's growth per row."""
        n1 = max(runs)
        return runs[n1][1]["peak_rss"] + max(slope(runs), 0) * (rows - n1)

    print()
    print(f"{'':34}" + "".join(f"{name:>22}" for name in results))
    table = []
    for n in sizes:
        table += [
            (f"{n:,} rows: cold wall s", lambda r, n=n: f"{r[n][0]['wall_s']:.1f}"),
            (f"{n:,} rows: cold peak MiB", lambda r, n=n: f"{r[n][0]['peak_rss'] / 2**20:,.0f}"),
            (f"{n:,} rows: rerun wall s", lambda r, n=n: f"{r[n][1]['wall_s']:.2f}"),
            (f"{n:,} rows: rerun peak MiB", lambda r, n=n: f"{r[n][1]['peak_rss'] / 2**20:,.0f}"),
            (
                f"{n:,} rows: rerun peak, process",
                lambda r, n=n: f"{r[n][1]['main_peak_rss'] / 2**20:,.0f} MiB",
            ),
        ]
    table += [
        ("rerun peak per 100k more rows", lambda r: f"{slope(r) * 1e5 / 2**20:,.1f} MiB"),
        ("rerun peak at 3M rows (linear)", lambda r: f"{at(r, 3_000_000) / 2**20:,.0f} MiB"),
    ]
    for label, f in table:
        print(f"{label:34}" + "".join(f"{f(runs):>22}" for runs in results.values()))
    print(f"(+{args.added:.0%} rows on each rerun; one run per cell: peak RSS varies little between runs)")
    print()
    ours = results["this tree"]
    peak = ours[args.rows][1]["peak_rss"]
    at_3m = at(ours, 3_000_000)
    print(
        f"goal rerun_peak_rss_{args.rows // 1000}k: {peak / 2**20:,.0f} MiB (target < 1,024 MiB) "
        f"{'met' if peak < 2**30 else 'not met'}"
    )
    print(
        f"goal rerun_peak_rss_3M_projected: {at_3m / 2**20:,.0f} MiB (target < 1,024 MiB) "
        f"{'met' if at_3m < 2**30 else 'not met'}"
    )


if __name__ == "__main__":
    main()
