"""``splsm models import-reference``: the reference's released checkpoint onto this project's model directory.

No released checkpoint can be downloaded here, so the tests write a small one the way the reference's training
does: a model with the reference's module names and shapes (``src/modeling_blsp.py``'s ``BlspModel``: a Hugging
Face Whisper encoder, a Llama, and ``src/Qformer.py``'s BERT Q-Former with its query feed-forward, text
feed-forward, embeddings and masked-LM head), its ``SpeechLLMConfig`` keys, saved with the tokenizer and
Whisper feature extractor beside the weights (``train_stage0_sft.py``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn

from splsm.cli import main

HIDDEN, FFN, LAYERS = 24, 48, 2  # the Q-Former's; 24 is a multiple of BertConfig's 12 heads


# ----- the reference's module tree (src/Qformer.py, src/modeling_blsp.py), names and shapes only -----


class _SelfAttention(nn.Module):  # BertSelfAttention: key/value read encoder_width in cross-attention
    def __init__(self, width: int):
        super().__init__()
        self.query = nn.Linear(HIDDEN, HIDDEN)
        self.key, self.value = nn.Linear(width, HIDDEN), nn.Linear(width, HIDDEN)


class _Out(nn.Module):  # BertSelfOutput / BertOutput
    def __init__(self, n_in: int):
        super().__init__()
        self.dense, self.LayerNorm = nn.Linear(n_in, HIDDEN), nn.LayerNorm(HIDDEN)


class _Attention(nn.Module):  # BertAttention
    def __init__(self, width: int):
        super().__init__()
        self.self, self.output = _SelfAttention(width), _Out(HIDDEN)


class _Intermediate(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(HIDDEN, FFN)


class _Layer(nn.Module):  # BertLayer with add_cross_attention and cross_attention_freq 1
    def __init__(self, width: int):
        super().__init__()
        self.attention, self.crossattention = _Attention(HIDDEN), _Attention(width)
        self.intermediate, self.output = _Intermediate(), _Out(FFN)
        self.intermediate_query, self.output_query = _Intermediate(), _Out(FFN)


class _Embeddings(nn.Module):
    def __init__(self):
        super().__init__()
        self.word_embeddings, self.position_embeddings = nn.Embedding(50, HIDDEN), nn.Embedding(16, HIDDEN)
        self.LayerNorm = nn.LayerNorm(HIDDEN)
        self.register_buffer("position_ids", torch.arange(16).expand((1, -1)))


class _Encoder(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.layer = nn.ModuleList(_Layer(width) for _ in range(LAYERS))


class _Bert(nn.Module):  # BertModel(add_pooling_layer=False)
    def __init__(self, width: int):
        super().__init__()
        self.embeddings, self.encoder = _Embeddings(), _Encoder(width)


class _Transform(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense, self.LayerNorm = nn.Linear(HIDDEN, HIDDEN), nn.LayerNorm(HIDDEN)


class _Predictions(nn.Module):
    def __init__(self):
        super().__init__()
        self.transform, self.decoder = _Transform(), nn.Linear(HIDDEN, 50, bias=False)
        self.bias = nn.Parameter(torch.zeros(50))


class _Cls(nn.Module):
    def __init__(self):
        super().__init__()
        self.predictions = _Predictions()


class _QFormer(nn.Module):  # BertLMHeadModel
    def __init__(self, width: int):
        super().__init__()
        self.bert, self.cls = _Bert(width), _Cls()


class _Blsp(nn.Module):
    def __init__(self, whisper_model: nn.Module, llama_model: nn.Module):
        super().__init__()
        d, h = whisper_model.config.d_model, llama_model.config.hidden_size
        self.whisper_model, self.llama_model = whisper_model, llama_model
        self.speech_Qformer = _QFormer(d)
        self.speech_query_tokens = nn.Parameter(torch.randn(1, 1, HIDDEN) * 0.02)
        self.speech_llama_proj = nn.Linear(HIDDEN, h)
        self.ln_speech = nn.LayerNorm(d)


def write_reference_checkpoint(tiny_models_dir: Path, out: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, WhisperFeatureExtractor, WhisperModel

    whisper = WhisperModel.from_pretrained(str(tiny_models_dir / "whisper")).encoder
    llama = AutoModelForCausalLM.from_pretrained(str(tiny_models_dir / "llm"))
    torch.manual_seed(0)
    model = _Blsp(whisper, llama)
    with torch.no_grad():  # no weight left at its init value, so a tensor put in the wrong place shows
        for p in model.speech_Qformer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        for p in (*model.ln_speech.parameters(), *model.speech_llama_proj.parameters()):
            p.add_(torch.randn_like(p) * 0.1)
    state = {k: v.contiguous().clone() for k, v in model.state_dict().items()}
    if (
        llama.config.tie_word_embeddings
    ):  # safetensors keeps one copy of a tied tensor, as save_pretrained does
        state.pop("llama_model.lm_head.weight", None)
    out.mkdir(parents=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = {  # SpeechLLMConfig's keys (src/configuration_blsp.py)
        "architectures": ["BlspModel"],
        "whisper_config": whisper.config.to_dict(),
        "llama_config": llama.config.to_dict(),
        "speech_qformer_layer": LAYERS,
        "speech_qformer_token_num": 1,
        "second_per_frame": 0.33333,
        "second_stride": 0.33333,
        "lora": True,
        "lora_alpha": 32,
        "lora_rank": 4,
        "lora_dropout": 0.1,
        "do_train": True,
    }
    (out / "config.json").write_text(json.dumps(config))
    AutoTokenizer.from_pretrained(str(tiny_models_dir / "llm")).save_pretrained(str(out))
    WhisperFeatureExtractor.from_pretrained(str(tiny_models_dir / "whisper")).save_pretrained(str(out))
    return state


# The reference's name of each of the project's tensors, typed out from the two codes (not from the importer's
# rules): what every imported tensor must equal.
def reference_name(ours: str) -> str:
    for a, b in (
        ("encoder.", "whisper_model."),
        ("llm.", "llama_model."),
        ("query_tokens", "speech_query_tokens"),
        ("proj.", "speech_llama_proj."),
        ("ln_speech.", "ln_speech."),
        ("qformer.layernorm.", "speech_Qformer.bert.embeddings.LayerNorm."),
    ):
        if ours.startswith(a):
            return b + ours[len(a) :]
    assert ours.startswith("qformer.encoder.layer."), ours
    rest = ours.removeprefix("qformer.").replace(".attention.attention.", ".attention.self.")
    return "speech_Qformer.bert." + rest.replace(".crossattention.attention.", ".crossattention.self.")


def run_import(*args: str):
    return CliRunner().invoke(main, ["models", "import-reference", *args])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_models_dir):
    out = tmp_path_factory.mktemp("ref") / "checkpoint"
    return out, write_reference_checkpoint(tiny_models_dir, out)


def test_every_tensor_lands_where_the_reference_used_it_and_the_model_runs(checkpoint, tmp_path):
    from core import audio
    from core.lsm.model import LSMForConditionalGeneration
    from stages.evaluate.decoding import Item, decode

    ckpt, ref = checkpoint
    result = run_import(str(ckpt), "--workdir", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "left out" in result.output
    model = LSMForConditionalGeneration.from_pretrained(str(tmp_path / "models" / "reference")).eval()
    ours = model.state_dict()
    for name, t in ours.items():
        want = (
            ref[reference_name(name)]
            if reference_name(name) in ref
            else ref["llama_model.model.embed_tokens.weight"]
        )
        assert torch.equal(t, want), name
    # the reference's windows and queries
    c = model.config
    assert (c.window_mode, c.window_s, c.stride_s, c.num_queries) == ("per_batch", 0.33333, 0.33333, 1)
    assert c.qformer_config.num_hidden_layers == LAYERS and c.qformer_config.num_attention_heads == 12
    # what the importer left out is exactly the reference's text-only parts
    left = set(ref) - {reference_name(n) for n in ours}
    assert left and all(
        k.startswith(("speech_Qformer.cls.", "speech_Qformer.bert.embeddings."))
        or ".intermediate." in k
        or (".output." in k and ".attention.output." not in k)
        for k in left
    ), sorted(left)
    # and it decodes a real clip as any model directory does
    clip = sorted((Path(__file__).parents[2] / "shared" / "fixtures").rglob("*.flac"))[0]
    row = {"prefix": "USER: Transcribe the speech SPEECH:", "suffix": " ASSISTANT:", "audio_path": str(clip),
           "offset_s": 0.0, "split": "test", "utt_id": "x", "duration_s": float(len(audio.load(str(clip))) / 16000)}  # fmt: skip
    d = decode(model, [Item.of_row("x", row, 4)], 1, label="imported")
    assert "x" in d.texts


def test_the_project_reads_back_the_checkpoint_it_wrote_unchanged_on_a_second_run(checkpoint, tmp_path):
    ckpt, _ = checkpoint
    for _ in range(2):
        result = run_import(str(ckpt), "--out", str(tmp_path / "m"), "--workdir", str(tmp_path / "w"))
        assert result.exit_code == 0, result.output
    assert "reus" in result.output.lower() or "up to date" in result.output.lower(), result.output


def _bad(checkpoint, tmp_path, change) -> str:
    ckpt, _ = checkpoint
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    change(bad)
    result = run_import(str(bad), "--workdir", str(tmp_path / "w"))
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "w" / "models" / "reference").exists()  # nothing half-written
    return result.output


def _edit_weights(edit):
    def change(bad: Path) -> None:
        from safetensors.torch import load_file

        state = load_file(str(bad / "model.safetensors"))
        edit(state)
        save_file(state, str(bad / "model.safetensors"))

    return change


@pytest.mark.parametrize(
    "what, edit, says",
    [
        (
            "an unknown tensor",
            lambda s: s.update({"speech_adapter.weight": torch.zeros(2)}),
            "speech_adapter.weight",
        ),
        ("a missing tensor", lambda s: s.pop("speech_llama_proj.bias"), "proj.bias"),
        (
            "a wrong shape",
            lambda s: s.update({"ln_speech.weight": torch.zeros(3)}),
            "ln_speech.weight: shape (3,) in the checkpoint",
        ),
        (
            "a second query",
            lambda s: s.update({"speech_query_tokens": torch.zeros(1, 2, HIDDEN)}),
            "speech_qformer_token_num is 1 but speech_query_tokens holds 2",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_a_checkpoint_that_does_not_fit_names_the_tensor(checkpoint, tmp_path, what, edit, says):
    assert says in _bad(checkpoint, tmp_path, _edit_weights(edit))


@pytest.mark.parametrize(
    "change, says",
    [
        (lambda b: (b / "model.safetensors").unlink(), "no weights (model.safetensors or"),
        (lambda b: (b / "model.safetensors").write_bytes(b"not weights"), "cannot be read as weights"),
        (lambda b: (b / "config.json").unlink(), "no config.json"),
        (
            lambda b: (b / "config.json").write_text(
                json.dumps(
                    {
                        k: v
                        for k, v in json.loads((b / "config.json").read_text()).items()
                        if k != "second_stride"
                    }
                )
            ),
            "config.json: no second_stride",
        ),
        (
            lambda b: (b / "preprocessor_config.json").unlink(),
            "lacks the tokenizer or Whisper feature extractor",
        ),
    ],
    ids=["no-weights", "damaged-weights", "no-config", "config-key", "no-feature-extractor"],
)
def test_a_checkpoint_folder_that_is_not_whole_says_what_it_lacks(checkpoint, tmp_path, change, says):
    assert says in _bad(checkpoint, tmp_path, change)


def test_the_reference_checkpoint_stage_reads_nothing_but_its_folder(checkpoint):
    """The importer's rules against the reference's module list: the tree above has every parameter name."""
    from stages.reference_checkpoint.mapper import rename

    _, ref = checkpoint
    m = rename(ref)
    assert len(m.renamed) + len(m.unused) == len(ref)
    assert np.all([not k.startswith("speech_Qformer.cls.") for k in m.renamed])
