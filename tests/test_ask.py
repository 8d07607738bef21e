"""``splsm ask`` on a tiny random checkpoint: each clip's answer is the one greedy decoding of that clip gives,
in the layout and with the instruction of the checkpoint's recipe; a single clip streams; bad input is one line."""

from __future__ import annotations

import io
import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner
from helpers_serving import (
    FLAC,
    MP3,
    WAV,
    WAV2,
    Reference,
    first_wording,
    long_wav,
    make_checkpoint,
    with_recipe,
)

from core import audio
from core.paths import REPO_ROOT, WorkPaths
from splsm.cli import main
from splsm.serving.ask import ask

N = 10  # tokens per answer: enough to see a stream, few enough to stay fast


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ask")
    ckpt = make_checkpoint(root)
    ogg = root / "clip.ogg"  # Ogg Vorbis at 22.05 kHz, made from a real clip
    x, rate = sf.read(str(WAV2), dtype="float32")
    import soxr

    sf.write(str(ogg), soxr.resample(x, rate, 22050), 22050, format="OGG")
    return dict(root=root, ckpt=ckpt, ref=Reference(ckpt), ogg=ogg)


def _cli(*args: str):
    return CliRunner().invoke(main, ["ask", *map(str, args)])


class Writes(io.StringIO):
    def __init__(self):
        super().__init__()
        self.pieces: list[str] = []

    def write(self, s: str) -> int:
        self.pieces.append(s)
        return super().write(s)


def test_one_clip_streams_the_greedy_answer_to_the_recipes_asr_instruction(setup):
    want = setup["ref"].answer(audio.load(WAV), first_wording("asr"), N)
    assert want  # the random model says something: otherwise there is nothing to stream
    out = Writes()
    got = ask(setup["ckpt"], [WAV], max_new_tokens=N, out=out)
    assert got == [want]
    assert out.getvalue() == want + "\n"
    assert len([p for p in out.pieces if p.strip()]) > 2  # token by token, not the whole answer at once
    r = _cli(setup["ckpt"], WAV, "--max-new-tokens", N)
    assert r.exit_code == 0, r.output
    assert r.stdout == want + "\n"
    assert "no recipe.json" in r.stderr  # a checkpoint without one is asked in the defaults, and says so


def test_every_format_and_rate_answers_each_clip_as_decoding_it_alone_does(setup):
    clips = [WAV, FLAC, MP3, setup["ogg"]]  # 16 kHz wav, 44.1 kHz stereo flac, 48 kHz mp3, 22.05 kHz ogg
    r = _cli(setup["ckpt"], *clips, "--max-new-tokens", N, "--json", "--batch-size", 3)
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["audio"] for row in rows] == [str(c) for c in clips]
    for row, clip in zip(rows, clips, strict=True):
        assert row["answer"] == setup["ref"].answer(audio.load(clip), first_wording("asr"), N), clip
        assert row["instruction"] == first_wording("asr")
    readable = _cli(setup["ckpt"], WAV, MP3, "--max-new-tokens", N)
    assert readable.exit_code == 0
    assert readable.stdout == "".join(
        f"==> {c} <==\n{row['answer']}\n\n" for c, row in zip([WAV, MP3], rows[::2], strict=True)
    )


def test_task_and_instruction_are_asked_in_the_layout_the_checkpoints_recipe_names(setup):
    ref, clip = setup["ref"], audio.load(WAV)
    r = _cli(setup["ckpt"], WAV, "--task", "sentiment", "--max-new-tokens", N)
    assert r.stdout.strip() == ref.answer(clip, first_wording("sentiment"), N)
    r = _cli(setup["ckpt"], WAV, "--instruction", "Say it backwards", "--max-new-tokens", N)
    assert r.stdout.strip() == ref.answer(clip, "Say it backwards", N)
    # a checkpoint whose recipe.json says it learnt the reference's layout is asked in that layout
    reference = with_recipe(setup["ckpt"], setup["root"] / "reference-layout", "reference")
    in_reference = ref.answer(clip, first_wording("asr"), N, fmt="reference")
    assert in_reference != ref.answer(clip, first_wording("asr"), N)  # the two layouts can be told apart
    r = _cli(reference, WAV, "--max-new-tokens", N)
    assert r.exit_code == 0 and r.stdout.strip() == in_reference
    assert "no recipe.json" not in r.stderr


def test_bad_input_is_one_line_naming_it_never_a_traceback(setup, tmp_path):
    ckpt = setup["ckpt"]
    too_long = long_wav(tmp_path / "long.wav", 31.0)
    not_lsm = tmp_path / "whisper"
    not_lsm.mkdir()
    (not_lsm / "config.json").write_text('{"model_type": "whisper"}')
    bad_recipe = with_recipe(ckpt, tmp_path / "bad-recipe", "reference")
    (bad_recipe / "recipe.json").write_text('{"prompt_format": "klingon"}')
    cases = [
        ((ckpt, tmp_path / "nope.wav"), ["missing_audio", "nope.wav"]),
        ((ckpt, Path(__file__)), ["corrupt_audio", "test_ask.py"]),
        ((ckpt, too_long), ["too_long", "long.wav", "31.0 s", "at most 30 s"]),
        ((ckpt, WAV, "--task", "poetry"), ["'poetry'", "sentiment"]),
        ((ckpt, WAV, "--task", "asr", "--instruction", "x"), ["not both"]),
        ((tmp_path / "no-checkpoint", WAV), ["no-checkpoint", "does not exist"]),
        ((not_lsm, WAV), ["not a speech-text checkpoint"]),
        ((bad_recipe, WAV), ["recipe.json", "not a recipe"]),
    ]
    for args, words in cases:
        r = _cli(*args)
        assert r.exit_code == 1, (args, r.output)
        err = r.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("Error: ask: "), (args, r.stderr)
        assert all(w in err[0] for w in words), (words, err[0])
        assert "Traceback" not in r.output and not r.stdout


def test_a_clip_of_exactly_the_window_is_heard_and_an_empty_one_is_refused(setup, tmp_path):
    edge = long_wav(tmp_path / "edge.wav", 30.0)
    r = _cli(setup["ckpt"], edge, "--max-new-tokens", 2)
    assert r.exit_code == 0, r.output
    empty = tmp_path / "empty.wav"
    sf.write(str(empty), np.zeros(0, dtype="float32"), 16000)
    r = _cli(setup["ckpt"], empty)
    assert r.exit_code == 1 and "empty.wav" in r.stderr and "Traceback" not in r.output


def test_the_demo_ends_with_ask_and_serve_commands_that_work_on_its_checkpoint(setup, tmp_path, monkeypatch):
    import splsm.cli as cli
    import splsm.serving.server as server

    work = tmp_path / "work"
    shutil.copytree(setup["ckpt"], WorkPaths(work).train.checkpoint)
    monkeypatch.setattr(cli, "_run_flow", lambda *a: {})  # the DAG itself is tests/test_demo.py's
    monkeypatch.setattr(cli, "_show_results", lambda w: None)
    monkeypatch.chdir(REPO_ROOT)
    r = CliRunner().invoke(main, ["demo", "--workdir", str(work)])
    assert r.exit_code == 0, r.output
    lines = [shlex.split(ln) for ln in r.stdout.splitlines() if ln.startswith("  splsm ")]
    assert [ln[1] for ln in lines] == ["ask", "ask", "serve"]
    for argv in lines[:2]:  # as printed, they answer
        done = CliRunner().invoke(main, [*argv[1:], "--max-new-tokens", "3"])
        assert done.exit_code == 0 and done.stdout.strip(), (argv, done.output)
    served = {}
    monkeypatch.setattr(
        server, "serve", lambda engine, settings, host, port, say: served.update(e=engine, h=host)
    )
    done = CliRunner().invoke(main, lines[2][1:])
    assert done.exit_code == 0, done.output
    assert served["e"].checkpoint == WorkPaths(work).train.checkpoint and served["h"] == "127.0.0.1"
