"""Rank 0's record of a training run: metrics.jsonl, TensorBoard events, the loss plot, the summary.

Every optimizer step is one JSON line in ``metrics.jsonl`` (a resumed run first cuts the file back to the
step it resumes from, so the file is the run's history without repeats), one point per scalar in
TensorBoard, and one printed line that the launcher's progress bar parses (``STEP_LINE``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from core.atomic import atomic_file, write_text
from core.paths import TrainPaths

STEP_LINE = re.compile(r"^step (\d+)/(?P<total>\d+) \| epoch \d+ \| loss (\S+)")
SCALARS = ("loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s")


class TrainLogs:
    def __init__(self, paths: TrainPaths, start_step: int, tensorboard: bool):
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
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RuntimeError(
                    "train.tensorboard is on but the tensorboard package is missing: pip install tensorboard"
                ) from e
            self.writer = SummaryWriter(
                str(paths.tensorboard), purge_step=start_step + 1 if start_step else None
            )

    def step(self, rec: dict, max_steps: int) -> None:
        self.metrics.write(json.dumps(rec) + "\n")
        self.metrics.flush()
        if self.writer is not None:
            for k in SCALARS:
                self.writer.add_scalar(f"train/{k}", rec[k], rec["step"])
        print(
            f"step {rec['step']}/{max_steps} | epoch {rec['epoch']} | loss {rec['loss']:.4f} | lr {rec['lr']:.3e} | "
            f"grad-norm {rec['grad_norm']:.3f} | {rec['samples_per_s']:.2f} samples/s | "
            f"{rec['tokens_per_s']:.0f} tokens/s",
            flush=True,
        )

    def plot(self) -> Path | None:
        return plot_loss(self.paths)

    def summary(self, summary: dict) -> None:
        write_text(self.paths.summary, json.dumps(summary, indent=2))

    def close(self) -> None:
        self.metrics.close()
        if self.writer is not None:
            self.writer.close()
        self.plot()


def plot_loss(paths: TrainPaths) -> Path | None:
    """The loss and learning-rate curves from metrics.jsonl, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = (
        [json.loads(x) for x in paths.metrics.read_text().splitlines() if x]
        if paths.metrics.is_file()
        else []
    )
    if not recs:
        return None
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax.plot([r["step"] for r in recs], [r["loss"] for r in recs])
    ax.set(xlabel="optimizer step", ylabel="loss", title="training loss")
    ax2.plot([r["step"] for r in recs], [r["lr"] for r in recs], color="tab:orange")
    ax2.set(xlabel="optimizer step", ylabel="learning rate", title="learning rate")
    fig.tight_layout()
    with atomic_file(paths.loss_plot) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return paths.loss_plot
