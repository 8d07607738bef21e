"""The lineage store as OpenLineage run events (JSON lines), for Marquez and similar tools.

Every recorded run becomes a START event and, once it ended, a COMPLETE or FAIL event, with its inputs
and outputs as datasets and the Prefect flow run as its parent. The store itself (``core.lineage.store``)
knows nothing of this format.
"""

from __future__ import annotations

import json
import os
import uuid

from core.atomic import atomic_file
from core.lineage.store import LineageStore

OPENLINEAGE_SCHEMA_URL = "https://openlineage.io/spec/2-0-2/OpenLineage.json#/definitions/RunEvent"
PRODUCER = "https://github.com/splsm/splsm"
_FACET_SCHEMA = "https://openlineage.io/spec/facets/{}/{}.json#/$defs/{}"


def _ol_uuid(hex_id: str) -> str:
    """OpenLineage run ids are UUIDs; ours are UUID hex strings, Prefect's are UUIDs already."""
    return str(uuid.UUID(hex_id))


def _ol_dataset(row: dict, output: bool) -> dict:
    facets: dict = {
        "splsm_dataset": {
            "_producer": PRODUCER,
            "_schemaURL": PRODUCER + "/facets/splsm_dataset.json",
            "kind": row["kind"],
            "role": row["role"],
            "contentHash": row["content_hash"],
            "schemaName": row["schema_name"],
            "schemaVersion": row["schema_version"],
        }
    }
    ds = {"namespace": "file", "name": row["location"], "facets": facets}
    if output and row["row_count"] is not None:
        ds["outputFacets"] = {
            "outputStatistics": {
                "_producer": PRODUCER,
                "_schemaURL": _FACET_SCHEMA.format(
                    "1-0-2", "OutputStatisticsOutputDatasetFacet", "OutputStatisticsOutputDatasetFacet"
                ),
                "rowCount": row["row_count"],
            }
        }
    elif not output and row["row_count"] is not None:
        facets["splsm_dataset"]["rowCount"] = row["row_count"]
    return ds


def openlineage_events(store: LineageStore, namespace: str = "splsm") -> list[dict]:
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
    events = []
    for r in runs:
        run_facets: dict = {
            "splsm_run": {
                "_producer": PRODUCER,
                "_schemaURL": PRODUCER + "/facets/splsm_run.json",
                "params": json.loads(r["params"]) if r["params"] else {},
                "codeVersion": r["code_version"],
                "gitCommit": r["git_commit"],
                "image": r["image"],
                "imageDigest": r["image_digest"],
                "host": r["host"],
                "prefectFlowRunId": r["flow_run_id"],
                "prefectTaskRunId": r["task_run_id"],
            }
        }
        if r["flow_run_id"]:
            try:
                parent_id = _ol_uuid(r["flow_run_id"])
            except ValueError:
                parent_id = None
            if parent_id:
                run_facets["parent"] = {
                    "_producer": PRODUCER,
                    "_schemaURL": _FACET_SCHEMA.format("1-0-1", "ParentRunFacet", "ParentRunFacet"),
                    "run": {"runId": parent_id},
                    "job": {"namespace": namespace, "name": r["flow_name"] or "prefect-flow"},
                }
        ios = by_run.get(r["run_id"], {"input": [], "output": []})
        base = {
            "run": {"runId": _ol_uuid(r["run_id"]), "facets": run_facets},
            "job": {"namespace": namespace, "name": r["stage"], "facets": {}},
            "producer": PRODUCER,
            "schemaURL": OPENLINEAGE_SCHEMA_URL,
        }
        events.append(
            {
                "eventType": "START",
                "eventTime": r["started_at"].isoformat(),
                **base,
                "inputs": [_ol_dataset(d, False) for d in ios["input"]],
                "outputs": [],
            }
        )
        if r["status"] == "running":
            continue
        end = {**base, "run": {"runId": base["run"]["runId"], "facets": dict(run_facets)}}
        if r["status"] == "failed":
            end["run"]["facets"]["errorMessage"] = {
                "_producer": PRODUCER,
                "_schemaURL": _FACET_SCHEMA.format("1-0-1", "ErrorMessageRunFacet", "ErrorMessageRunFacet"),
                "message": r["error"] or "",
                "programmingLanguage": "python",
            }
        events.append(
            {
                "eventType": "COMPLETE" if r["status"] == "succeeded" else "FAIL",
                "eventTime": (r["ended_at"] or r["started_at"]).isoformat(),
                **end,
                "inputs": [_ol_dataset(d, False) for d in ios["input"]],
                "outputs": [_ol_dataset(d, True) for d in ios["output"]],
            }
        )
    return events


def export_openlineage(store: LineageStore, out: str | os.PathLike, namespace: str = "splsm") -> int:
    """Write ``openlineage_events`` to ``out`` as JSON lines (whole or not at all); returns the event count."""
    events = openlineage_events(store, namespace)
    with atomic_file(out) as tmp, open(tmp, "w") as f:
        for e in events:
            f.write(json.dumps(e, sort_keys=True, default=str) + "\n")
    return len(events)
