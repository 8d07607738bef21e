"""A Whisper model in CTranslate2's format -> a Hugging Face ``WhisperForConditionalGeneration`` directory.

CTranslate2 writes a model as one ``model.bin`` (binary version 6, ``WhisperSpec``), little-endian:

    uint32 version | string spec name | uint32 spec revision | uint32 variable count
    per variable:  string name | uint8 rank | rank x uint32 dims | uint8 dtype | uint32 bytes | the bytes
    uint32 alias count | per alias: string alias | string name of the variable it stands for
    (a string: uint16 length with its NUL | the UTF-8 bytes | NUL;
     dtypes: 0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16)

beside ``config.json`` (suppressed tokens, alignment heads, language ids) and ``tokenizer.json``.

The layout differs from Hugging Face's in three ways this module undoes: self-attention's query, key and
value are one fused linear (``linear_0``, rows q | k | v), cross-attention's key and value are one fused
linear (``linear_1``, rows k | v), and Whisper's key projections have no bias (CTranslate2 stores zeros,
checked here). The output projection is an alias of the token embedding (tied). Every variable is either
mapped to a weight or checked as a setting; one left over, a shape that disagrees with the config, a file
that ends early or is not a Whisper spec is an error naming it.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}  # 5, bfloat16: refused
SUPPORTED_VERSIONS = (5, 6)
SPEC = "WhisperSpec"


class ConversionError(ValueError):
    """The file is not a Whisper model this converter understands, or it is damaged; the message says where."""


@dataclass(frozen=True)
class CT2Model:
    path: Path
    version: int
    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str]


class _Reader:
    def __init__(self, path: Path):
        self.path = path
        self.data = path.read_bytes()
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise ConversionError(
                f"{self.path}: the file ends at byte {len(self.data)} while reading {what} "
                f"({n} bytes from byte {self.pos}): truncated?"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("H", f"the length of {what}")
        raw = self.take(n, what)
        if not raw or raw[-1] != 0:
            raise ConversionError(
                f"{self.path}: {what} at byte {self.pos - n} is not a NUL-terminated string"
            )
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConversionError(f"{self.path}: {what} at byte {self.pos - n} is not UTF-8 ({e})") from e


def read_ct2(path: str | Path) -> CT2Model:
    """Every variable and alias of a CTranslate2 ``model.bin``."""
    path = Path(path)
    r = _Reader(path)
    version = r.unpack("I", "the binary version")
    if version not in SUPPORTED_VERSIONS:
        raise ConversionError(
            f"{path}: binary version {version}; this converter reads CTranslate2 versions "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))} (is it a CTranslate2 model.bin?)"
        )
    spec = r.string("the spec name")
    revision = r.unpack("I", "the spec revision")
    count = r.unpack("I", "the variable count")
    variables: dict[str, np.ndarray] = {}
    for i in range(count):
        name = r.string(f"the name of variable {i}")
        rank = r.unpack("B", f"the rank of {name}")
        dims = [r.unpack("I", f"dimension {d} of {name}") for d in range(rank)]
        dtype_id = r.unpack("B", f"the dtype of {name}")
        if dtype_id not in DTYPES:
            raise ConversionError(
                f"{path}: variable {name} has dtype id {dtype_id}, which this converter cannot read"
            )
        nbytes = r.unpack("I", f"the byte count of {name}")
        dtype = np.dtype(DTYPES[dtype_id])
        if nbytes != int(np.prod(dims, dtype=np.int64)) * dtype.itemsize:
            raise ConversionError(f"{path}: variable {name} has {nbytes} bytes for shape {dims} of {dtype}")
        variables[name] = np.frombuffer(r.take(nbytes, f"the values of {name}"), dtype=dtype).reshape(dims)
    aliases = {}
    for i in range(r.unpack("I", "the alias count")):
        alias = r.string(f"alias {i}")
        aliases[alias] = r.string(f"the target of alias {alias}")
    if r.pos != len(r.data):
        raise ConversionError(f"{path}: {len(r.data) - r.pos} bytes follow the last alias")
    return CT2Model(path, version, spec, revision, variables, aliases)


def whisper_config(model: CT2Model, ct2_config: dict, tokenizer: dict) -> dict:
    """``WhisperConfig`` keyword arguments, read off the weights' shapes and the two JSON files."""
    v = model.variables
    vocab, d_model = v["decoder/embeddings/weight"].shape
    layers = lambda side: len({m.group(1) for k in v if (m := re.match(rf"{side}/layer_(\d+)/", k))})  # noqa: E731
    special = {t["content"]: t["id"] for t in tokenizer.get("added_tokens", [])}
    for needed in ("<|endoftext|>", "<|startoftranscript|>", "<|notimestamps|>"):
        if needed not in special:
            raise ConversionError(f"tokenizer.json has no {needed} token: not a Whisper tokenizer")
    eot = special["<|endoftext|>"]
    return dict(
        vocab_size=int(vocab),
        num_mel_bins=int(v["encoder/conv1/weight"].shape[1]),
        d_model=int(d_model),
        encoder_layers=layers("encoder"),
        decoder_layers=layers("decoder"),
        encoder_attention_heads=int(v["encoder/num_heads"]),
        decoder_attention_heads=int(v["decoder/num_heads"]),
        encoder_ffn_dim=int(v["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        decoder_ffn_dim=int(v["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_source_positions=int(v["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(v["decoder/position_encodings/encodings"].shape[0]),
        activation_function="gelu",
        scale_embedding=False,
        tie_word_embeddings=True,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        decoder_start_token_id=special["<|startoftranscript|>"],
    )


# The settings CTranslate2 stores as scalar variables, and the values a Whisper has (checked, then dropped).
SETTINGS = {
    "decoder/activation": 3,  # GELU (CTranslate2: 0 ReLU, 1 GELU-tanh, 2 Swish, 3 GELU)
    "decoder/alibi": 0,
    "decoder/pre_norm": 1,
    "decoder/scale_embeddings": 0,
    "decoder/start_from_zero_embedding": 0,
}
SETTINGS_READ = (
    "encoder/num_heads",
    "decoder/num_heads",
    "decoder/alignment_heads",
    "decoder/alignment_layer",
)


def hf_state_dict(model: CT2Model, cfg: dict) -> dict[str, np.ndarray]:
    """The Hugging Face state dict (float32), every CTranslate2 variable accounted for."""
    if model.spec != SPEC:
        raise ConversionError(f"{model.path}: spec {model.spec!r}, not {SPEC!r}: not a Whisper model")
    v = {k: np.asarray(x) for k, x in model.variables.items()}
    used: set[str] = set()

    def take(name: str) -> np.ndarray:
        if name not in v:
            raise ConversionError(f"{model.path}: variable {name} is missing")
        used.add(name)
        return v[name].astype(np.float32)

    for name, want in SETTINGS.items():
        if name in v:
            if int(v[name]) != want:
                raise ConversionError(f"{model.path}: {name} is {int(v[name])}; a Whisper has {want}")
            used.add(name)
    used.update(n for n in SETTINGS_READ if n in v)

    d = cfg["d_model"]
    sd: dict[str, np.ndarray] = {}

    def linear(src: str, dst: str) -> None:
        sd[f"{dst}.weight"], sd[f"{dst}.bias"] = take(f"{src}/weight"), take(f"{src}/bias")

    def norm(src: str, dst: str) -> None:
        sd[f"{dst}.weight"], sd[f"{dst}.bias"] = take(f"{src}/gamma"), take(f"{src}/beta")

    def split(src: str, dsts: list[str]) -> None:
        """A fused linear whose rows are the projections in ``dsts`` order; key projections have no bias."""
        w, b = take(f"{src}/weight"), take(f"{src}/bias")
        if w.shape[0] != d * len(dsts):
            raise ConversionError(
                f"{model.path}: {src}/weight has {w.shape[0]} rows, expected {d * len(dsts)}"
            )
        for i, dst in enumerate(dsts):
            sd[f"{dst}.weight"] = w[i * d : (i + 1) * d]
            bias = b[i * d : (i + 1) * d]
            if dst.endswith("k_proj"):
                if np.any(bias != 0):
                    raise ConversionError(
                        f"{model.path}: {src}/bias has a non-zero key bias; Whisper has none"
                    )
            else:
                sd[f"{dst}.bias"] = bias

    for side, n_layers in (("encoder", cfg["encoder_layers"]), ("decoder", cfg["decoder_layers"])):
        hf = f"model.{side}"
        sd[f"{hf}.embed_positions.weight"] = take(f"{side}/position_encodings/encodings")
        norm(f"{side}/layer_norm", f"{hf}.layer_norm")
        for i in range(n_layers):
            src, dst = f"{side}/layer_{i}", f"{hf}.layers.{i}"
            split(f"{src}/self_attention/linear_0", [f"{dst}.self_attn.{p}_proj" for p in "qkv"])
            linear(f"{src}/self_attention/linear_1", f"{dst}.self_attn.out_proj")
            norm(f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
            if side == "decoder":
                linear(f"{src}/attention/linear_0", f"{dst}.encoder_attn.q_proj")
                split(
                    f"{src}/attention/linear_1", [f"{dst}.encoder_attn.k_proj", f"{dst}.encoder_attn.v_proj"]
                )
                linear(f"{src}/attention/linear_2", f"{dst}.encoder_attn.out_proj")
                norm(f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm")
            linear(f"{src}/ffn/linear_0", f"{dst}.fc1")
            linear(f"{src}/ffn/linear_1", f"{dst}.fc2")
            norm(f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")
    for conv in ("conv1", "conv2"):
        linear(f"encoder/{conv}", f"model.encoder.{conv}")
    sd["model.decoder.embed_tokens.weight"] = take("decoder/embeddings/weight")
    if model.aliases.get("decoder/projection/weight") != "decoder/embeddings/weight":
        raise ConversionError(
            f"{model.path}: decoder/projection/weight is not an alias of the token embedding; "
            "this converter writes a tied output projection"
        )
    left = sorted(set(v) - used)
    if left:
        raise ConversionError(f"{model.path}: variables left unmapped: {', '.join(left[:8])}")
    extra = set(model.aliases) - {"decoder/projection/weight"}
    if extra:
        raise ConversionError(f"{model.path}: aliases left unmapped: {', '.join(sorted(extra))}")
    return sd


def alignment_heads(model: CT2Model, ct2_config: dict) -> list[list[int]]:
    """The (layer, head) pairs whose cross-attention follows the words, for word timestamps."""
    heads = ct2_config.get("alignment_heads", [])
    if not all(isinstance(h, list) and len(h) == 2 for h in heads):
        raise ConversionError(
            f"{model.path.parent / 'config.json'}: alignment_heads is not a list of [layer, head]"
        )
    return [list(map(int, h)) for h in heads]


def convert(src_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a Hugging Face Whisper directory (model, feature extractor, tokenizer, generation config) to
    ``out_dir`` from a CTranslate2 Whisper directory (``model.bin``, ``config.json``, ``tokenizer.json``)."""
    import torch
    from transformers import (
        GenerationConfig,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperTokenizerFast,
    )

    src_dir, out_dir = Path(src_dir), Path(out_dir)
    for name in ("model.bin", "config.json", "tokenizer.json"):
        if not (src_dir / name).is_file():
            raise ConversionError(f"{src_dir}: no {name}: not a CTranslate2 Whisper directory")
    model = read_ct2(src_dir / "model.bin")
    ct2_config = json.loads((src_dir / "config.json").read_text())
    tok_json = json.loads((src_dir / "tokenizer.json").read_text())
    kw = whisper_config(model, ct2_config, tok_json)
    config = WhisperConfig(**kw)
    sd = hf_state_dict(model, kw)
    hf = WhisperForConditionalGeneration(config).eval()
    expected = hf.state_dict()
    for name, value in sd.items():
        if name not in expected:
            raise ConversionError(
                f"{model.path}: mapped to {name}, which WhisperForConditionalGeneration lacks"
            )
        if tuple(expected[name].shape) != value.shape:
            raise ConversionError(
                f"{model.path}: {name} has shape {value.shape}, the config's model wants {tuple(expected[name].shape)}"
            )
    missing = set(expected) - set(sd) - {"proj_out.weight"}
    if missing:
        raise ConversionError(f"{model.path}: nothing maps to {', '.join(sorted(missing)[:8])}")
    hf.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(x)) for k, x in sd.items()}, strict=False)
    hf.tie_weights()

    special = {t["content"]: t["id"] for t in tok_json["added_tokens"]}
    english_only = kw["vocab_size"] == 51864
    hf.generation_config = GenerationConfig(
        decoder_start_token_id=kw["decoder_start_token_id"],
        bos_token_id=kw["bos_token_id"],
        eos_token_id=kw["eos_token_id"],
        pad_token_id=kw["pad_token_id"],
        no_timestamps_token_id=special["<|notimestamps|>"],
        suppress_tokens=list(ct2_config.get("suppress_ids", [])),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin", [])),
        alignment_heads=alignment_heads(model, ct2_config),
        is_multilingual=not english_only,
        max_initial_timestamp_index=50,
        return_timestamps=False,
    )
    hf.save_pretrained(out_dir, safe_serialization=True)
    WhisperFeatureExtractor(feature_size=kw["num_mel_bins"]).save_pretrained(out_dir)
    tok = WhisperTokenizerFast(
        tokenizer_file=str(src_dir / "tokenizer.json"),
        unk_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=1024,
    )
    tok.save_pretrained(out_dir)
    return out_dir
