"""The page ``splsm serve`` shows at ``/``, in a real headless chromium (selenium): on a checkpoint the whole DAG
trained (``evaluated``), behind an API key, the page asks a bundled clip, an uploaded file and a microphone
recording, and each streamed answer is the one the model's own greedy ``generate`` gives (computed here without
the serving code); its lineage panel shows what the lineage store and the evaluation's tables hold (read here
with DuckDB and pyarrow). Screenshots: the test's tmp folder, and ``$SPLSM_TEST_ARTIFACTS`` where set."""

from __future__ import annotations

import base64
import io
import json
import shutil
import time

import duckdb
import httpx
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from helpers_browser import chromium, screenshot
from helpers_serving import MP3, WAV, Reference, running

from core import audio
from core.lineage.card import checkpoint_card
from core.paths import WorkPaths, lineage_path
from splsm.serving.app import ServeSettings, create_app
from splsm.serving.engine import Engine
from splsm.serving.page import bundled_clips, lineage_store_for

KEY = "page-test-key-7f3a"
MODEL = "demo-lsm"
N = 12  # tokens per answer
CLIP = "test-clean-1089-134686-0001"


@pytest.fixture(scope="module")
def site(evaluated):
    ckpt = WorkPaths(evaluated).train.checkpoint
    engine = Engine(ckpt, "cpu", max_new_tokens=64)
    settings = ServeSettings(MODEL, api_key=KEY, lineage_store=lineage_path(evaluated), batch_wait_ms=1)
    with running(create_app(engine, settings)) as url:
        yield dict(
            engine=engine,
            work=evaluated,
            ckpt=ckpt,
            url=url,
            ref=Reference(ckpt),
            recipe=json.loads((ckpt / "recipe.json").read_text()),
        )


def _until(driver, what, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(what)


def _state(driver) -> str:
    return driver.find_element("id", "status").get_attribute("data-state")


@pytest.fixture(scope="module")
def page(site):
    """The page open in chromium, its key given (it asks for it: nothing loads before, a wrong one is refused)."""
    with chromium() as driver:
        driver.get(site["url"] + "/")
        _until(driver, lambda d: d.find_element("id", "key-box").is_displayed())
        assert "API key" in driver.find_element("id", "model-line").text
        assert len(driver.find_elements("css selector", "#clip option")) == 1  # nothing listed yet
        driver.find_element("id", "key").send_keys("wrong")
        driver.find_element("id", "key-go").click()
        _until(driver, lambda d: "refused" in d.find_element("id", "model-line").text)
        assert "the API key is wrong" in driver.find_element("id", "model-line").text
        driver.find_element("id", "key").clear()
        driver.find_element("id", "key").send_keys(KEY)
        driver.find_element("id", "key-go").click()
        _until(driver, lambda d: len(d.find_elements("css selector", "#clip option")) > 1)
        assert not driver.find_element("id", "key-box").is_displayed()
        yield driver


def _ask(driver, instruction: str | None = None, task: str | None = None) -> str:
    from selenium.webdriver.support.ui import Select

    if task is not None:
        Select(driver.find_element("id", "task")).select_by_value(task)
    if instruction is not None:
        Select(driver.find_element("id", "task")).select_by_value("")
        box = driver.find_element("id", "instruction")
        box.clear()
        box.send_keys(instruction)
    n = driver.find_element("id", "max-tokens")
    n.clear()
    n.send_keys(str(N))
    # count the answer's updates: a streamed answer grows piece by piece
    driver.execute_script(
        "window.updates = 0; new MutationObserver(() => window.updates++).observe("
        "document.getElementById('answer'), {childList: true, characterData: true, subtree: true});"
    )
    _until(driver, lambda d: d.find_element("id", "ask-go").is_enabled())
    driver.find_element("id", "ask-go").click()
    _until(driver, lambda d: _state(d) in ("done", "error"))
    status = driver.find_element("id", "status").text
    assert _state(driver) == "done", status
    return driver.find_element("id", "answer").get_property("textContent")


def test_a_bundled_clip_streams_the_answer_greedy_decoding_gives(page, site, tmp_path):
    from selenium.webdriver.support.ui import Select

    Select(page.find_element("id", "clip")).select_by_value(CLIP)
    _until(page, lambda d: d.find_element("id", "audio-line").text.startswith("LibriSpeech test-clean"))
    wording = site["recipe"]["instructions"]["sentiment"][0]
    answer = _ask(page, task="sentiment")
    assert page.find_element("id", "instruction").get_property("value") == wording
    clip = audio.load(WAV)
    want = site["ref"].answer(clip, wording, N, site["recipe"]["prompt_format"])
    assert want and answer == want
    assert page.execute_script("return window.updates") > 2  # it streamed in pieces
    transcript = page.find_element("id", "clip-transcript").text
    assert transcript.startswith("Transcript: AFTER EARLY NIGHTFALL")
    shot = screenshot(page, tmp_path, "web-page.png")
    assert shot.stat().st_size > 10_000


def test_an_uploaded_file_with_a_typed_instruction(page, site):
    page.find_element("id", "file").send_keys(str(MP3))
    _until(page, lambda d: d.find_element("id", "audio-line").text.startswith(MP3.name))
    answer = _ask(page, instruction="Summarize the speech")
    want = site["ref"].answer(audio.load(MP3), "Summarize the speech", N, site["recipe"]["prompt_format"])
    assert want and answer == want


def test_a_microphone_recording_is_sent_as_16khz_wav(page, site, tmp_path):
    page.find_element("id", "record").click()  # chromium's fake microphone: a beep
    time.sleep(1.5)
    page.find_element("id", "record").click()
    _until(page, lambda d: d.find_element("id", "audio-line").text.startswith("Your recording"))
    wav = base64.b64decode(
        page.execute_async_script(
            "const done = arguments[arguments.length - 1]; const r = new FileReader();"
            "r.onload = () => done(String(r.result).split(',')[1]); r.readAsDataURL(audio.blob);"
        )
    )
    info = sf.info(io.BytesIO(wav))
    assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
    assert 1.0 < info.duration < 3.0
    answer = _ask(page, instruction="")  # no instruction: the recipe's ASR wording
    asr = site["recipe"]["instructions"]["asr"][0]
    want = site["ref"].answer(audio.decode(wav, "recording"), asr, N, site["recipe"]["prompt_format"])
    assert want and answer == want
    screenshot(page, tmp_path, "web-page-recording.png")


def test_the_lineage_panel_shows_what_the_store_and_the_evaluation_recorded(page, site):
    work, ckpt = site["work"], site["ckpt"]
    con = duckdb.connect(str(lineage_path(work)), read_only=True)

    def one(sql: str, *args):
        rows = con.execute(sql, list(args)).fetchall()
        assert len(rows) == 1, (sql, rows)
        return rows[0]

    (train_run,) = one(
        "SELECT r.run_id FROM runs r JOIN run_io io USING (run_id) JOIN datasets d USING (dataset_id) "
        "WHERE d.location = ? AND io.direction = 'output' AND r.stage = 'train'",
        str(ckpt.resolve()),
    )
    (llm,) = one(
        "SELECT d.location FROM runs r JOIN run_io io USING (run_id) JOIN datasets d USING (dataset_id) "
        "WHERE r.stage = 'generate' AND io.direction = 'input' AND io.role = 'llm'"
    )
    (harvest_params,) = one("SELECT params FROM runs WHERE stage = 'harvest'")
    (max_steps,) = one("SELECT json_extract(params, '$.max_steps') FROM runs WHERE run_id = ?", train_run)
    con.close()
    corpora = [c["name"] for c in json.loads(harvest_params)["corpora"]]
    metrics = pq.read_table(WorkPaths(work).evaluate.table("metrics")).to_pylist()
    probe = pq.read_table(WorkPaths(work).evaluate.table("probe_metrics")).to_pylist()
    lsm = [m for m in metrics if m["system"] == "lsm"]
    assert lsm and probe

    def text(section: str) -> str:
        return page.find_element("id", f"lineage-{section}").get_property("textContent")

    assert train_run in text("training") and f"max_steps{max_steps}" in text("training")
    assert llm in text("answers")
    assert len(corpora) == 3 and all(c in text("corpora") for c in corpora)
    for m in lsm:
        assert f"{m['eval_set']}lsm{m['n_utterances']}{100 * m['wer']:.1f}%" in text("evaluation")
    for p in probe:
        assert f"{p['category']}{p['n_items']}{100 * p['anchor_rate']:.1f}%" in text("evaluation")
    assert str(ckpt.resolve()) in text("checkpoint")
    assert not page.find_elements("id", "lineage-notes")  # everything was found


def test_page_routes_ask_the_key_name_the_bad_field_and_serve_only_the_allow_list(site):
    url, auth = site["url"], {"Authorization": f"Bearer {KEY}"}
    for path in ("/", "/static/app.js", "/static/app.css"):
        r = httpx.get(url + path)
        assert r.status_code == 200 and KEY not in r.text  # public, and no key in them
        assert "default-src 'none'" in r.headers["content-security-policy"]
    for path in ("/web/info", "/web/lineage", f"/web/clips/{CLIP}"):
        assert httpx.get(url + path).status_code == 401
        assert httpx.get(url + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = httpx.get(url + f"/web/clips/{CLIP}", headers=auth)
    assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
    assert r.content == WAV.read_bytes()
    r = httpx.get(url + "/web/clips/nope", headers=auth)
    assert (
        r.status_code == 404
        and r.json()["error"]["param"] == "clip_id"
        and CLIP in r.json()["error"]["message"]
    )
    for path in (
        "/web/clips/..%2F..%2Fcore%2Fpaths.py",
        "/web/clips/%2Fetc%2Fpasswd",
        "/static/..%2Fpage.py",
    ):
        assert httpx.get(url + path, headers=auth).status_code == 404, path
    assert httpx.get(url + "/static/page.py").status_code == 404
    info = httpx.get(url + "/web/info", headers=auth).json()
    assert info["model"] == MODEL and info["key_required"] is True
    assert [c["id"] for c in info["clips"]] == [c.id for c in bundled_clips()] and len(info["clips"]) == 5
    assert [t["name"] for t in info["tasks"]] == list(site["recipe"]["instructions"])


def test_no_page_serves_the_api_only(site):
    from fastapi.testclient import TestClient

    client = TestClient(create_app(site["engine"], ServeSettings(MODEL, page=False)))
    assert client.get("/health").status_code == 200
    for path in ("/", "/static/app.js", "/web/info", f"/web/clips/{CLIP}"):
        assert client.get(path).status_code == 404, path


def test_the_lineage_store_is_found_beside_the_checkpoint_or_where_told(site, tmp_path, monkeypatch):
    work, ckpt = site["work"], site["ckpt"]
    monkeypatch.delenv("SPLSM_LINEAGE_DB", raising=False)
    store = lineage_path(work)
    assert lineage_store_for(ckpt) == store
    assert lineage_store_for(ckpt, tmp_path) == tmp_path / "lineage.duckdb"
    copy = shutil.copytree(ckpt, tmp_path / "elsewhere")
    assert lineage_store_for(copy) is None
    monkeypatch.setenv("SPLSM_LINEAGE_DB", str(tmp_path / "x.duckdb"))
    assert lineage_store_for(copy) == tmp_path / "x.duckdb"
    # a copy elsewhere has no recorded history, and the card says so rather than guess
    card = checkpoint_card(copy, store)
    assert card["training"] is None and "has no record of" in card["notes"][0]
    card = checkpoint_card(copy, None)
    assert card["training"] is None and "no lineage store" in card["notes"][0]


def test_a_store_that_cannot_be_read_is_a_note_not_a_failed_server(site, tmp_path):
    from splsm.serving.page import card

    broken = tmp_path / "lineage.duckdb"
    broken.write_bytes(b"not a DuckDB file" * 100)
    got = card(site["engine"], ServeSettings(MODEL, lineage_store=broken))
    assert got["notes"][0].startswith("the lineage store could not be read:") and "training" not in got
