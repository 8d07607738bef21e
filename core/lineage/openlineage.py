"""The lineage store as OpenLineage run events, sent through the OpenLineage client's own transports.

Every recorded run becomes a START event and, once it ended, a COMPLETE or FAIL event, with its inputs
and outputs as datasets and the Prefect flow run as its parent. The events are the client's typed classes
(``openlineage.client.event_v2`` and the standard facets of ``facet_v2``), so the client's validators and
serializer, not hand-written JSON, decide what a valid event looks like; ``send_openlineage`` hands them to
an ``OpenLineageClient`` over any of its transports: a file (JSON lines), an HTTP endpoint (Marquez's
``/api/v1/lineage``), or the console. The store itself (``core.lineage.store``) knows nothing of this format.

What each event carries, beyond the required fields:

  run facets      ``parent`` (the Prefect flow run), ``processing_engine`` (splsm and its version),
                  ``executionParameters`` (the run's parameters, each value as JSON: the client's serializer
                  drops nulls, which would change a parameter), ``errorMessage`` on FAIL, and ``splsm_run``
                  (code version, git commit, image and digest, host, Prefect ids)
  job facets      ``jobType`` (a batch stage of splsm)
  dataset facets  ``version`` (the content hash: one dataset version per hash, as in the store),
                  ``splsm_dataset`` (kind, role, content hash, table schema), and the row count as
                  ``inputStatistics`` / ``outputStatistics``
"""

from __future__ import annotations

import json
import logging
import os
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version

import attr
from openlineage.client import OpenLineageClient
from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
from openlineage.client.facet_v2 import (
    DatasetFacet,
    RunFacet,
    dataset_version_dataset,
    error_message_run,
    execution_parameters_run,
    input_statistics_input_dataset,
    job_type_job,
    output_statistics_output_dataset,
    parent_run,
    processing_engine_run,
)
from openlineage.client.transport import Transport
from openlineage.client.transport.console import ConsoleConfig, ConsoleTransport
from openlineage.client.transport.file import FileConfig, FileTransport
from openlineage.client.transport.http import ApiKeyTokenProvider, HttpConfig, HttpTransport, TokenProvider

from core import __version__
from core.atomic import atomic_file
from core.lineage.store import LineageStore

PRODUCER = "https://github.com/splsm/splsm"
_SPLSM_FACETS = PRODUCER + "/facets/{}.json#/$defs/{}"


class OpenLineageSendError(RuntimeError):
    """A transport refused an event; the message names the event and how many went before it."""


@attr.define
class SplsmRunFacet(RunFacet):
    """Where a run came from, as the store's ``runs`` row records it (no standard facet holds these)."""

    codeVersion: str | None = attr.field(default=None)  # noqa: N815 (OpenLineage's field style)
    gitCommit: str | None = attr.field(default=None)  # noqa: N815
    image: str | None = attr.field(default=None)
    imageDigest: str | None = attr.field(default=None)  # noqa: N815
    host: str | None = attr.field(default=None)
    prefectFlowRunId: str | None = attr.field(default=None)  # noqa: N815
    prefectTaskRunId: str | None = attr.field(default=None)  # noqa: N815

    @staticmethod
    def _get_schema() -> str:
        return _SPLSM_FACETS.format("SplsmRunFacet", "SplsmRunFacet")


@attr.define
class SplsmDatasetFacet(DatasetFacet):
    """A dataset version as the store's ``datasets`` row and ``run_io`` edge record it."""

    kind: str = attr.field()
    contentHash: str = attr.field()  # noqa: N815
    role: str | None = attr.field(default=None)
    schemaName: str | None = attr.field(default=None)  # noqa: N815
    schemaVersion: int | None = attr.field(default=None)  # noqa: N815

    @staticmethod
    def _get_schema() -> str:
        return _SPLSM_FACETS.format("SplsmDatasetFacet", "SplsmDatasetFacet")


def _ol_uuid(hex_id: str) -> str:
    """OpenLineage run ids are UUIDs; ours are UUID hex strings, Prefect's are UUIDs already."""
    return str(uuid.UUID(hex_id))


def _client_version() -> str | None:
    try:
        return version("openlineage-python")
    except PackageNotFoundError:
        return None


def _dataset_facets(row: dict) -> dict:
    return {
        "version": dataset_version_dataset.DatasetVersionDatasetFacet(
            datasetVersion=row["content_hash"], producer=PRODUCER
        ),
        "splsm_dataset": SplsmDatasetFacet(
            kind=row["kind"],
            contentHash=row["content_hash"],
            role=row["role"] or None,
            schemaName=row["schema_name"],
            schemaVersion=row["schema_version"],
            producer=PRODUCER,
        ),
    }


def _input(row: dict) -> InputDataset:
    stats = {}
    if row["row_count"] is not None:
        stats["inputStatistics"] = input_statistics_input_dataset.InputStatisticsInputDatasetFacet(
            rowCount=row["row_count"], producer=PRODUCER
        )
    return InputDataset(
        namespace="file", name=row["location"], facets=_dataset_facets(row), inputFacets=stats
    )


def _output(row: dict) -> OutputDataset:
    stats = {}
    if row["row_count"] is not None:
        stats["outputStatistics"] = output_statistics_output_dataset.OutputStatisticsOutputDatasetFacet(
            rowCount=row["row_count"], producer=PRODUCER
        )
    return OutputDataset(
        namespace="file", name=row["location"], facets=_dataset_facets(row), outputFacets=stats
    )


def _run_facets(r: dict, namespace: str) -> dict:
    params = json.loads(r["params"]) if r["params"] else {}
    facets: dict = {
        "processing_engine": processing_engine_run.ProcessingEngineRunFacet(
            version=__version__,
            name="splsm",
            openlineageAdapterVersion=_client_version(),
            producer=PRODUCER,
        ),
        "executionParameters": execution_parameters_run.ExecutionParametersRunFacet(
            parameters=[
                execution_parameters_run.ExecutionParameter(
                    key=k, value=json.dumps(v, sort_keys=True, default=str)
                )
                for k, v in sorted(params.items())
            ],
            producer=PRODUCER,
        ),
        "splsm_run": SplsmRunFacet(
            codeVersion=r["code_version"],
            gitCommit=r["git_commit"],
            image=r["image"],
            imageDigest=r["image_digest"],
            host=r["host"],
            prefectFlowRunId=r["flow_run_id"],
            prefectTaskRunId=r["task_run_id"],
            producer=PRODUCER,
        ),
    }
    if r["flow_run_id"]:
        try:
            parent_id = _ol_uuid(r["flow_run_id"])
        except ValueError:  # a flow run id that is no UUID (a test's, a hand-set one): no parent facet
            parent_id = None
        if parent_id:
            facets["parent"] = parent_run.ParentRunFacet(
                run=parent_run.Run(runId=parent_id),
                job=parent_run.Job(namespace=namespace, name=r["flow_name"] or "prefect-flow"),
                producer=PRODUCER,
            )
    return facets


def _job(stage: str, namespace: str) -> Job:
    return Job(
        namespace=namespace,
        name=stage,
        facets={
            "jobType": job_type_job.JobTypeJobFacet(
                processingType="BATCH", integration="SPLSM", jobType="STAGE", producer=PRODUCER
            )
        },
    )


def openlineage_events(store: LineageStore, namespace: str = "splsm") -> list[RunEvent]:
    """Every recorded run as OpenLineage events: START, then COMPLETE or FAIL (none yet while running).

    Stage runs under a Prefect flow run carry it as their ``parent`` run, so Marquez groups them.
    """
    runs = store.dicts("SELECT * FROM runs ORDER BY started_at, run_id")
    io = store.dicts(
        """SELECT io.run_id, io.direction, io.role, d.location, d.kind, d.content_hash, d.schema_name,
                  d.schema_version, d.row_count
           FROM run_io io JOIN datasets d USING (dataset_id) ORDER BY d.location"""
    )
    by_run: dict[str, dict[str, list[dict]]] = {}
    for row in io:
        by_run.setdefault(row["run_id"], {"input": [], "output": []})[row["direction"]].append(row)
    events: list[RunEvent] = []
    for r in runs:
        ios = by_run.get(r["run_id"], {"input": [], "output": []})

        # each event gets its own objects: the client adds facets to the event it emits, in place
        events.append(
            RunEvent(
                eventType=RunState.START,
                eventTime=r["started_at"].isoformat(),
                run=Run(runId=_ol_uuid(r["run_id"]), facets=_run_facets(r, namespace)),
                job=_job(r["stage"], namespace),
                producer=PRODUCER,
                inputs=[_input(d) for d in ios["input"]],
                outputs=[],
            )
        )
        if r["status"] == "running":
            continue
        end_facets = _run_facets(r, namespace)
        if r["status"] == "failed":
            end_facets["errorMessage"] = error_message_run.ErrorMessageRunFacet(
                message=r["error"] or "", programmingLanguage="python", producer=PRODUCER
            )
        events.append(
            RunEvent(
                eventType=RunState.COMPLETE if r["status"] == "succeeded" else RunState.FAIL,
                eventTime=(r["ended_at"] or r["started_at"]).isoformat(),
                run=Run(runId=_ol_uuid(r["run_id"]), facets=end_facets),
                job=_job(r["stage"], namespace),
                producer=PRODUCER,
                inputs=[_input(d) for d in ios["input"]],
                outputs=[_output(d) for d in ios["output"]],
            )
        )
    return events


# ----- transports -----


def http_transport(
    url: str,
    endpoint: str = "api/v1/lineage",
    api_key: str | None = None,
    timeout_s: float = 5.0,
    retries: int = 5,
) -> HttpTransport:
    """The client's HTTP transport: each event POSTed as JSON to ``url``/``endpoint`` (Marquez's default)."""
    return HttpTransport(
        HttpConfig(
            url=url,
            endpoint=endpoint,
            timeout=timeout_s,
            auth=ApiKeyTokenProvider({"apiKey": api_key}) if api_key else TokenProvider({}),
            retry={
                "total": retries,
                "read": retries,
                "connect": retries,
                "backoff_factor": 0.3,
                "status_forcelist": [500, 502, 503, 504],
                "allowed_methods": ["HEAD", "POST"],
            },
        )
    )


def console_transport() -> ConsoleTransport:
    """The client's console transport: it logs each event as one JSON line (``console_output`` shows them)."""
    return ConsoleTransport(ConsoleConfig())


@contextmanager
def console_output(stream=None) -> Iterator[None]:
    """Send what the console transport logs (one event a line, at INFO) to ``stream`` (stdout), and only
    that: the client logs nothing else through this logger, and the root logger is left as it was."""
    logger = logging.getLogger("openlineage.client.transport.console")
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def send_openlineage(store: LineageStore, transport: Transport, namespace: str = "splsm") -> int:
    """Emit every recorded run's events through an ``OpenLineageClient`` on ``transport``; returns the count.

    The client's own source-code-location facet is turned off: it would describe the checkout this command
    runs in, not the code each run ran (``splsm_run.gitCommit`` says that). The user's OpenLineage config
    (``openlineage.yml``, ``OPENLINEAGE__*``) still applies its filters and tags.
    """
    events = openlineage_events(store, namespace)
    client = OpenLineageClient(
        transport=transport, config={"facets": {"source_code_location": {"disabled": True}}}
    )
    try:
        for i, event in enumerate(events):
            try:
                client.emit(event)
            except Exception as e:
                raise OpenLineageSendError(
                    f"OpenLineage {transport.kind} transport failed on event {i + 1} of {len(events)} "
                    f"({event.job.name} {event.eventType.value}, run {event.run.runId}); {i} sent before it: "
                    f"{type(e).__name__}: {e}"
                ) from e
    finally:
        client.close()
    return len(events)


def export_openlineage(store: LineageStore, out: str | os.PathLike, namespace: str = "splsm") -> int:
    """Write every run's events to ``out`` as JSON lines through the client's file transport (appending to a
    temporary that then becomes ``out``: whole or not at all); returns the event count."""
    with atomic_file(out) as tmp:
        tmp.touch()  # a store without runs still gives a (empty) file
        return send_openlineage(
            store, FileTransport(FileConfig(log_file_path=str(tmp), append=True)), namespace
        )
