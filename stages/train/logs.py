"""Rank 0's record of a training run: metrics.jsonl, the experiment trackers, the loss plot, the summary.

Every optimizer step is one JSON line in ``metrics.jsonl`` (a resumed run first cuts the file back to the
step it resumes from, so the file is the run's history without repeats), one point per scalar in each
tracker of ``train.loggers`` (``stages.train.trackers``: TensorBoard, MLflow, W&B), and one printed line that
the launcher's progress bar parses (``STEP_LINE``). The run's settings go to the trackers once, at the start.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from core.atomic import atomic_file, write_text
from core.paths import TrainPaths
from stages.train.trackers import Ending, Tracker, run_ids, step_scalars

STEP_LINE = re.compile(r"^step (\d+)/(?P<total>\d+) \| epoch \d+ \| loss (\S+)")


class TrainLogs:
    def __init__(self, paths: TrainPaths, start_step: int, trackers: list[Tracker], params: dict):
        """``trackers``: opened by ``stages.train.trackers.open_trackers``; ``params``: the run's resolved
        settings, flattened, logged to each of them now."""
        self.paths = paths
        kept = []
        if start_step and paths.metrics.is_file():
            kept = [
                ln
                for ln in paths.metrics.read_text().splitlines()
                if ln and json.loads(ln)["step"] <= start_step
            ]
        write_text(paths.metrics, "".join(ln + "\n" for ln in kept))  # cut back whole, then appended to
        self.metrics = open(paths.metrics, "a")
        self.trackers = trackers
        for t in trackers:
            t.log_params(params)

    def step(self, rec: dict, max_steps: int) -> None:
        self.metrics.write(json.dumps(rec) + "\n")
        self.metrics.flush()
        scalars = step_scalars(rec)
        for t in self.trackers:
            t.log_step(scalars, rec["step"])
        print(
            f"step {rec['step']}/{max_steps} | epoch {rec['epoch']} | "
            f"{'CTC ' if rec.get('objective') == 'ctc' else ''}loss {rec['loss']:.4f} | lr {rec['lr']:.3e} | "
            f"grad-norm {rec['grad_norm']:.3f} | {rec['samples_per_s']:.2f} samples/s | "
            f"{rec['tokens_per_s']:.0f} tokens/s",
            flush=True,
        )

    def validation(self, rec: dict) -> None:
        """One split's validation figures (``core.lsm.probes``) at a step: a line of metrics.jsonl with a
        ``validation`` key (the split), its scalars in each tracker under ``val/SPLIT/``, one printed line."""
        self.metrics.write(json.dumps(rec) + "\n")
        self.metrics.flush()
        split = rec["validation"]
        scalars = {f"val/{split}/{k}": float(v) for k, v in rec.items() if k not in ("step", "validation")}
        for t in self.trackers:
            t.log_step(scalars, rec["step"])
        figures = " | ".join(
            f"{k} {rec[k]:.4f}"
            for k in ("own", "own_first", "own_later", "swapped_later", "swap_gap_later", "zeroed")
            if k in rec
        )
        print(f"validation {split} at step {rec['step']} ({rec['rows']} rows) | {figures}", flush=True)

    def plot(self) -> Path | None:
        return plot_loss(self.paths)

    def summary(self, summary: dict) -> None:
        write_text(self.paths.summary, json.dumps(summary, indent=2))

    def run_ids(self) -> dict[str, str]:
        """The trackers' run ids, for the resumable checkpoint: a resumed run continues these runs."""
        return run_ids(self.trackers)

    def close(self, ending: Ending = "finished") -> None:
        self.metrics.close()
        trackers, self.trackers = self.trackers, []  # closed once, even if close is called again on failure
        for t in trackers:
            t.close(ending)
        self.plot()


def read_metrics(paths: TrainPaths) -> list[dict]:
    """metrics.jsonl's records in order: a step's (``loss``, ``lr``, ...) or a validation's (a ``validation`` key,
    the split); none before the first step is logged."""
    if not paths.metrics.is_file():
        return []
    return [json.loads(x) for x in paths.metrics.read_text().splitlines() if x.strip()]


def plot_loss(paths: TrainPaths) -> Path | None:
    """The learning curves from metrics.jsonl, as a PNG: the training loss, the learning rate and, with
    ``train.validation``, each split's answer-token loss with own, swapped and zeroed speech."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    every = read_metrics(paths)
    recs = [r for r in every if "validation" not in r]
    val = [r for r in every if "validation" in r]
    if not recs and not val:
        return None
    fig, axes = plt.subplots(1, 3 if val else 2, figsize=(15 if val else 10, 3.5))
    ax, ax2 = axes[0], axes[1]
    ax.plot([r["step"] for r in recs], [r["loss"] for r in recs])
    ax.set(xlabel="optimizer step", ylabel="loss (nats per answer token)", title="training loss")
    ax2.plot([r["step"] for r in recs], [r["lr"] for r in recs], color="tab:orange")
    ax2.set(xlabel="optimizer step", ylabel="learning rate", title="learning rate")
    if val:
        ax3 = axes[2]
        for split in dict.fromkeys(r["validation"] for r in val):
            mine = [r for r in val if r["validation"] == split]
            for key, style in (("own", "-"), ("swapped", "--"), ("zeroed", ":")):
                pts = [(r["step"], r[key]) for r in mine if key in r]
                if pts:
                    ax3.plot(*zip(*pts, strict=True), style, marker=".", label=f"{split}: {key} speech")
        ax3.set(xlabel="optimizer step", ylabel="loss (nats per answer token)", title="validation")
        ax3.set_ylim(bottom=0)
        ax3.legend(fontsize="small")
    for a in axes:
        a.set_xlim(left=0)
    fig.tight_layout()
    with atomic_file(paths.loss_plot) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return paths.loss_plot
