"""What each torchrun process runs: ``python -m stages.train.worker --args TRAIN_ARGS_JSON``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

from core.paths import TrainPaths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m stages.train.worker", description="One torchrun process of the train stage."
    )
    parser.add_argument("--args", type=Path, required=True, help="train_args.json written by the launcher")
    ns = parser.parse_args(argv)
    trainer = None
    try:
        from transformers.utils import logging as hf_logging

        from stages.train.launcher import STOPPED_EXIT
        from stages.train.trainer import Trainer

        hf_logging.disable_progress_bar()
        trainer = Trainer(json.loads(ns.args.read_text())).setup()
        summary = trainer.fit()
        trainer.cleanup(stopped=bool(summary.get("stopped")))
        # Everything is written and every rank has passed the final barrier. Leave without running any
        # destructor: freeing the trainer tears down DDP's reducer and with it the gloo process group, which
        # joins gloo's worker thread while holding the GIL, and that thread may be waiting for the GIL to free
        # a tensor (a deadlock seen on CPU runs). So the trainer stays referenced here until os._exit.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(STOPPED_EXIT if summary.get("stopped") else 0)
    except BaseException as e:
        # The trackers' runs end as failed rather than left running (rank 0 only has logs).
        if trainer is not None and trainer.logs is not None:
            try:
                trainer.logs.close("failed")
            except Exception as close_error:  # said, then the run's own error goes on
                print(f"closing the trackers failed too: {close_error!r}", file=sys.stderr, flush=True)
        # Leave the traceback where the launcher finds it: torchrun's own report buries it in the output.
        rank = os.environ.get("RANK", "0")
        try:
            paths = TrainPaths(Path(json.loads(ns.args.read_text())["out_dir"]))
            paths.errors.mkdir(parents=True, exist_ok=True)
            paths.error(rank).write_text("".join(traceback.format_exception(e)))
        except Exception:
            pass
        raise


if __name__ == "__main__":
    main()
