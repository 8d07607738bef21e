"""``Stage.run`` as a stage's user meets it: a missing input named with the command that makes it, a rerun that
reuses, ``force`` that does not, a changed parameter that reruns, and a stage's own ``record`` hook called with
what the runner was given."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict

from core.stage import Artifact, MissingInput, Stage, StageResult


class Opts(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n: int = 1


def _toy(tmp_path: Path, runs: list[int], record=None, inputs=None) -> Stage:
    out = tmp_path / "made" / "out.txt"

    def body(ctx):
        runs.append(ctx.options.n)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(f"n={ctx.options.n}\n")
        return {"n": ctx.options.n}

    return Stage(
        name="toy",
        help="a stage for tests",
        package="stages.build",
        inputs=lambda ctx: inputs or [],
        outputs=lambda ctx: [Artifact("out", out, "file")],
        params=lambda ctx: {"n": ctx.options.n},
        body=body,
        options=Opts,
        needs_config=False,
        record=record,
    )


def test_a_missing_input_names_its_role_path_and_the_command_that_makes_it(tmp_path):
    made = Artifact("transcripts", tmp_path / "t.parquet", "table", made_by="harvest")
    assert (
        str(made.missing())
        == f"transcripts {tmp_path / 't.parquet'} does not exist; run `splsm harvest` first"
    )
    assert isinstance(made.missing(), MissingInput)
    bare = Artifact("model", tmp_path / "m", "model")
    assert str(bare.missing()) == f"model {tmp_path / 'm'} does not exist"
    (tmp_path / "m").mkdir()
    assert bare.missing() is None

    runs: list[int] = []
    stage = _toy(tmp_path, runs, inputs=[made])
    with pytest.raises(MissingInput, match=r"does not exist; run `splsm harvest` first$"):
        stage.run(stage.context(None, tmp_path / "w"))
    assert runs == []


def test_a_rerun_reuses_force_reruns_and_a_new_parameter_reruns(tmp_path):
    runs: list[int] = []
    stage = _toy(tmp_path, runs)
    ctx = stage.context(None, tmp_path / "w", {"n": 1})
    first = stage.run(ctx)
    assert (first.reused, first.summary, runs) == (False, {"n": 1}, [1])
    again = stage.run(ctx)  # force defaults to False
    assert (again.reused, again.run_id, again.summary, runs) == (True, first.run_id, {"n": 1}, [1])
    forced = stage.run(ctx, force=True)
    assert (forced.reused, runs) == (False, [1, 1])
    assert forced.run_id != first.run_id
    other = stage.run(stage.context(None, tmp_path / "w", {"n": 2}))  # the params are part of the key
    assert (other.reused, other.summary, runs) == (False, {"n": 2}, [1, 1, 2])
    assert (tmp_path / "made" / "out.txt").read_text() == "n=2\n"


@pytest.mark.parametrize("force", [False, True])
def test_a_stage_that_records_its_own_runs_gets_the_stage_the_context_and_force(tmp_path, force):
    got = []

    def record(stage, ctx, f):
        got.append((stage, ctx, f))
        return StageResult("toy", False, "rid", {}, 0.0, {"recorded": True})

    runs: list[int] = []
    stage = _toy(tmp_path, runs, record=record)
    ctx = stage.context(None, tmp_path / "w", {"n": 3})
    result = stage.run(ctx, force)
    assert got == [(stage, ctx, force)] and got[0][2] is force
    assert result.summary == {"recorded": True} and runs == []  # the hook runs the body, not the runner
    assert stage.run(ctx).summary == {"recorded": True}
    assert got[1][2] is False  # force defaults to False
