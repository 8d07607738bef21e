"""Every stage, in the order the whole DAG runs them. The CLI, the flows and the container runner all
iterate this: a new stage is one package under ``stages/`` and one line here."""

from __future__ import annotations

from core.stage import Stage
from stages.build.stage import STAGE as BUILD
from stages.evaluate.stage import STAGE as EVALUATE
from stages.generate.stage import STAGE as GENERATE
from stages.harvest.stage import STAGE as HARVEST
from stages.import_reference.stage import STAGE as IMPORT_REFERENCE
from stages.pretrained.stage import STAGE as PRETRAINED
from stages.reference_checkpoint.stage import STAGE as REFERENCE_CHECKPOINT
from stages.tiny_models.stage import STAGE as TINY_MODELS
from stages.train.stage import STAGE as TRAIN

STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        PRETRAINED,
        REFERENCE_CHECKPOINT,  # a trained model from elsewhere: evaluate reads it with --checkpoint
        HARVEST,
        TINY_MODELS,
        GENERATE,
        IMPORT_REFERENCE,
        BUILD,
        TRAIN,
        EVALUATE,
    )
}


def stage(name: str) -> Stage:
    if name not in STAGES:
        raise KeyError(f"no stage {name!r}; the stages are {', '.join(STAGES)}")
    return STAGES[name]
