"""OpenLineage events of real stage runs, sent through the OpenLineage client's HTTP transport to a local server.

The events are checked against the OpenLineage client's own attrs classes, not the OpenLineage JSON schema: no
copy of ``OpenLineage.json`` ships in openlineage-python (the installed 1.54 wheel, the 1.39 sdist) or in the
other OpenLineage packages on PyPI (openlineage-integration-common, openlineage-airflow,
apache-airflow-providers-openlineage), so there is no schema to validate against offline. The classes are
generated from that schema by the OpenLineage project, and ``_structure_as_client_classes`` rebuilds every
received event from them strictly: each field must exist on the class its ``_schemaURL`` names, hold the type the
class declares (the client's validators check run ids and times), and a round trip must give the same JSON.
"""

from __future__ import annotations

import enum
import json
import threading
import types
import typing
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import attr
import pytest
from click.testing import CliRunner
from openlineage.client import facet_v2
from openlineage.client.event_v2 import RunEvent
from openlineage.client.facet_v2 import BaseFacet
from openlineage.client.serde import Serde

from conftest import copy_librispeech, run_stage
from core.config import CorpusConfig
from core.digest import sha256_file
from core.lineage import openlineage as ol
from core.lineage.store import LineageStore
from core.paths import WorkPaths
from core.tables import table_identity
from splsm.cli import main

FIRST = ["1988-24833-0000", "2412-153948-0002", "3752-4944-0000"]
ADDED = ["1988-24833-0001"]


def _facet_classes() -> dict[str, type]:
    """Every facet class the client knows (and splsm's two), by the schema URL its JSON carries."""
    found: dict[str, type] = {}
    for name in facet_v2.__all__:
        module = getattr(facet_v2, name)
        if not isinstance(module, types.ModuleType):
            continue
        for cls in vars(module).values():
            if isinstance(cls, type) and attr.has(cls) and issubclass(cls, BaseFacet):
                found[cls._get_schema()] = cls
    for cls in (ol.SplsmRunFacet, ol.SplsmDatasetFacet):
        found[cls._get_schema()] = cls
    return found


FACETS = _facet_classes()


def _structure_as_client_classes(tp, data, where: str = "event"):
    """``data`` (parsed JSON) rebuilt as the client's attrs type ``tp``, failing on any field the type lacks,
    any required field missing, any value of another type, and any value the client's validators refuse."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if data is None:
            assert type(None) in args, f"{where}: null where {tp} is required"
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _structure_as_client_classes(inner, data, where)
    if origin is list:
        assert isinstance(data, list), f"{where}: {data!r} is not a list"
        return [_structure_as_client_classes(args[0], v, f"{where}[{i}]") for i, v in enumerate(data)]
    if origin is dict:
        assert isinstance(data, dict), f"{where}: {data!r} is not an object"
        return {k: _structure_as_client_classes(args[1], v, f"{where}.{k}") for k, v in data.items()}
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp(data)
    if isinstance(tp, type) and attr.has(tp):
        assert isinstance(data, dict), f"{where}: {data!r} is not an object"
        if issubclass(tp, BaseFacet):
            cls = FACETS.get(data.get("_schemaURL"))
            assert cls is not None, f"{where}: no facet class has schema {data.get('_schemaURL')}"
            assert issubclass(cls, tp), f"{where}: a {cls.__name__} where a {tp.__name__} belongs"
            tp = cls
        hints = typing.get_type_hints(tp)
        fields = {a.name: a for a in attr.fields(tp)}
        kwargs = {}
        for key, value in data.items():
            a = fields.get(key)
            assert a is not None, f"{where}: {tp.__name__} has no field {key}"
            if not a.init:  # the schema URLs: set by the class itself
                assert value == tp._get_schema(), f"{where}.{key}: {value} is not {tp.__name__}'s schema"
                continue
            kwargs[a.alias] = _structure_as_client_classes(hints[a.name], value, f"{where}.{key}")
        return tp(**kwargs)
    if tp is float:
        assert isinstance(data, (int, float)) and not isinstance(data, bool), (
            f"{where}: {data!r} not a number"
        )
        return data
    if tp in (str, int, bool):
        assert type(data) is tp, f"{where}: {data!r} is not a {tp.__name__}"
        return data
    if tp is typing.Any:
        return data
    raise AssertionError(f"{where}: no rule for type {tp}")


class _Collector(BaseHTTPRequestHandler):
    """An OpenLineage endpoint as Marquez serves it: POST JSON, answer 201."""

    received: list[tuple[str, dict, dict]]

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.received.append((self.path, dict(self.headers), json.loads(body)))
        self.send_response(201)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture
def collector():
    handler = type("Handler", (_Collector,), {"received": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.received
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_openlineage_http_send_of_two_harvest_runs_reaches_a_local_server(tmp_path, tiny_config, collector):
    url, received = collector
    root = copy_librispeech(tmp_path / "corpus", FIRST)
    cfg = tiny_config.model_copy(update={"corpora": [CorpusConfig(name="ls", kind="librispeech", root=root)]})
    work = tmp_path / "work"
    paths = WorkPaths(work).harvest
    first = run_stage("harvest", cfg, work)
    v1 = table_identity(paths.transcripts)[0]
    copy_librispeech(root, ADDED)
    second = run_stage("harvest", cfg, work)
    v2 = table_identity(paths.transcripts)[0]
    assert v1 != v2

    res = CliRunner().invoke(
        main,
        ["lineage", "export-openlineage", "--url", url, "--api-key", "k3y", "--workdir", str(work)],
    )
    assert res.exit_code == 0, res.output
    assert "4 OpenLineage events sent" in res.output

    assert {path for path, _, _ in received} == {"/api/v1/lineage"}
    assert {h["Authorization"] for _, h, _ in received} == {"Bearer k3y"}
    events = [e for _, _, e in received]
    assert [(e["job"]["name"], e["eventType"], e["run"]["runId"]) for e in events] == [
        ("harvest", "START", str(uuid.UUID(first.run_id))),
        ("harvest", "COMPLETE", str(uuid.UUID(first.run_id))),
        ("harvest", "START", str(uuid.UUID(second.run_id))),
        ("harvest", "COMPLETE", str(uuid.UUID(second.run_id))),
    ]

    def io(e, side):
        return {
            (d["name"], d["facets"]["splsm_dataset"]["role"], d["facets"]["version"]["datasetVersion"])
            for d in e[side]
        }

    corpus, transcripts = str(root.resolve()), str(paths.transcripts.resolve())
    start1, end1, start2, end2 = events
    # the first run read the corpus only; the second also its own previous table (version v1)
    assert {(n, r) for n, r, _ in io(start1, "inputs")} == {(corpus, "corpus:ls")}
    assert io(start2, "inputs") >= {(transcripts, "previous_transcripts", v1)}
    assert {(n, r) for n, r, _ in io(start2, "inputs")} == {
        (corpus, "corpus:ls"),
        (transcripts, "previous_transcripts"),
    }
    corpus_versions = [v for e in (start1, start2) for n, _, v in io(e, "inputs") if n == corpus]
    assert corpus_versions[0] != corpus_versions[1]  # a clip was added between the runs
    assert start1["outputs"] == start2["outputs"] == []
    assert io(end1, "inputs") == io(start1, "inputs") and io(end2, "inputs") == io(start2, "inputs")
    rejects = str(paths.rejects.resolve())
    assert io(end1, "outputs") >= {(transcripts, "transcripts", v1)}
    assert io(end2, "outputs") == {
        (transcripts, "transcripts", v2),
        (rejects, "rejects", "sha256:" + sha256_file(paths.rejects)),
    }
    rows = {d["name"]: d["outputFacets"]["outputStatistics"]["rowCount"] for d in end2["outputs"]}
    assert rows[transcripts] == len(FIRST) + len(ADDED)
    (prev,) = [d for d in end2["inputs"] if d["name"] == transcripts]
    assert prev["inputFacets"]["inputStatistics"]["rowCount"] == len(FIRST)
    params = {
        p["key"]: json.loads(p["value"]) for p in end2["run"]["facets"]["executionParameters"]["parameters"]
    }
    assert params["corpora"][0]["root"] == str(root)

    for e in events:
        rebuilt = _structure_as_client_classes(RunEvent, e)
        assert Serde.to_dict(rebuilt) == e


def test_openlineage_structure_check_refuses_a_broken_event(tmp_path):
    """The check above can fail: a run id that is no UUID, a field a facet lacks, a missing required field."""
    src = tmp_path / "in.txt"
    src.write_text("x")
    store = LineageStore(tmp_path / "lineage.duckdb")
    from core.lineage.store import DatasetRef, RunContext

    flow_run = str(uuid.uuid4())
    run_id = store.start_run("s", {"k": 1}, RunContext("v", flow_run_id=flow_run, flow_name="pipeline"))
    store.finish_run(run_id, [DatasetRef(str(src), "file", "sha256:00", "in")], [])
    good = Serde.to_dict(ol.openlineage_events(store)[1])
    assert good["run"]["facets"]["parent"]["run"]["runId"] == flow_run  # the Prefect flow run, for Marquez
    assert good["run"]["facets"]["parent"]["job"]["name"] == "pipeline"
    assert Serde.to_dict(_structure_as_client_classes(RunEvent, good)) == good

    bad_id = json.loads(json.dumps(good))
    bad_id["run"]["runId"] = "run-1"
    with pytest.raises(ValueError):
        _structure_as_client_classes(RunEvent, bad_id)
    extra = json.loads(json.dumps(good))
    extra["inputs"][0]["facets"]["version"]["colour"] = "red"
    with pytest.raises(AssertionError, match="no field colour"):
        _structure_as_client_classes(RunEvent, extra)
    missing = json.loads(json.dumps(good))
    del missing["inputs"][0]["facets"]["splsm_dataset"]["kind"]
    with pytest.raises(TypeError):
        _structure_as_client_classes(RunEvent, missing)


def test_openlineage_http_error_names_the_event_and_the_console_prints_json_lines(tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("x")
    from core.lineage.store import DatasetRef, RunContext

    store = LineageStore(tmp_path / "lineage.duckdb")
    run_id = store.start_run("s", {}, RunContext("v"))
    store.finish_run(run_id, [DatasetRef(str(src), "file", "sha256:00", "in")], [])

    class Refuse(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(400)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        res = CliRunner().invoke(
            main,
            [
                "lineage",
                "export-openlineage",
                "--url",
                f"http://127.0.0.1:{server.server_address[1]}",
                "--workdir",
                str(tmp_path),
            ],
        )
    finally:
        server.shutdown()
        server.server_close()
    assert res.exit_code == 1
    assert "event 1 of 2 (s START" in res.output and "400" in res.output

    import io

    out = io.StringIO()
    with ol.console_output(out):
        assert ol.send_openlineage(store, ol.console_transport()) == 2
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(e["job"]["name"], e["eventType"]) for e in lines] == [("s", "START"), ("s", "COMPLETE")]

    res = CliRunner().invoke(main, ["lineage", "export-openlineage", "--workdir", str(tmp_path)])
    assert res.exit_code == 2 and "exactly one of OUT, --url URL or --console" in res.output
