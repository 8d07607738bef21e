"""One Prefect task per stage of the registry, each running the stage in the mode ``execution`` picks.

Tasks hold no stage logic. Retries and the GPU concurrency tag come from the stage's contract, applied
here as the task's decorator settings. The tasks use no Prefect result cache: a stage's own reuse check
(content hashes of its inputs, its parameters and its code) is the cache, and it also sees a changed
config file or a deleted output, which a cache keyed on task arguments would not. So a retried or rerun
flow skips every stage that already finished, in any execution mode.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from core.paths import WorkPaths
from core.stage import Stage
from splsm.runner import ExecutionConfig, run_stage_cli
from stages.registry import STAGES

GPU_TAG = "gpu"  # a tag concurrency limit: `prefect concurrency-limit create gpu N`


def _task(stage: Stage):
    def run(
        config: str, workdir: str, force: bool, execution: ExecutionConfig, options: dict | None = None
    ) -> dict:
        summary = run_stage_cli(stage, config, workdir, force, execution, options)
        if stage.publish is not None:
            stage.publish(WorkPaths(workdir))  # in this process, whatever the mode the stage ran in
        return summary

    run.__name__ = run.__qualname__ = f"{stage.name.replace('-', '_')}_task"
    return task(
        name=stage.name,
        cache_policy=NO_CACHE,
        retries=stage.retries,
        retry_delay_seconds=stage.retry_delay_s,
        tags=[GPU_TAG] if stage.gpu else [],
    )(run)


TASKS = {name: _task(s) for name, s in STAGES.items()}
