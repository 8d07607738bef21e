"""The reference's released checkpoint onto ``LSMForConditionalGeneration``, every tensor accounted for.

The reference (``ytf-philp/Self-powered-LSM`` at 5c8b390) trains ``src/modeling_blsp.py``'s ``BlspModel`` and
saves it with the Trainer (``train_stage0_sft.py``: ``trainer.save_model()``, then the tokenizer and Whisper's
feature extractor into the same folder). Its parts and where they go:

| reference (``src/modeling_blsp.py``, ``src/Qformer.py``) | this project (``core/lsm/model.py``) |
|---|---|
| ``whisper_model.*``: Hugging Face's ``WhisperEncoder`` (``src/modeling_whisper_encoder.py`` subclasses it) | ``encoder.*`` |
| ``llama_model.*``: ``LlamaForCausalLM`` | ``llm.*`` |
| ``ln_speech.*``: the LayerNorm on the encoder's frames | ``ln_speech.*`` |
| ``speech_query_tokens``: ``[1, queries, hidden]`` | ``query_tokens`` |
| ``speech_llama_proj.*``: the Q-Former-to-LLM linear | ``proj.*`` |
| ``speech_Qformer.bert.embeddings.LayerNorm.*``: applied to the queries | ``qformer.layernorm.*`` |
| ``speech_Qformer.bert.encoder.layer.N.{attention,crossattention}.self.*`` | ``qformer.encoder.layer.N.{...}.attention.*`` |
| ``....{attention,crossattention}.output.*``, ``....intermediate_query.*``, ``....output_query.*`` | the same names |

Left out, each for a reason (``UNUSED``): the Q-Former's word and position embeddings and its masked-LM head
(``cls.*``), which only text input reaches, and each layer's text feed-forward (``intermediate``, ``output``),
which a Q-Former given queries alone never runs: Hugging Face's ``Blip2QFormerModel`` has no such weights.

Settings: the windows are the reference's (``per_batch``, ``second_per_frame`` and ``second_stride`` from its
config), the Q-Former's hidden and feed-forward sizes and layer count are read from the tensors, and its head
count is a default ``BertConfig``'s 12 (``init_speech_Qformer`` builds it from one; no tensor shape holds it).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

# Where each reference name goes: (pattern, replacement), first match wins.
RENAMES: tuple[tuple[str, str], ...] = (
    (r"^whisper_model\.", "encoder."),
    (r"^llama_model\.", "llm."),
    (r"^ln_speech\.", "ln_speech."),
    (r"^speech_query_tokens$", "query_tokens"),
    (r"^speech_llama_proj\.", "proj."),
    (r"^speech_Qformer\.bert\.embeddings\.LayerNorm\.", "qformer.layernorm."),
    (
        r"^speech_Qformer\.bert\.encoder\.layer\.(\d+)\.(attention|crossattention)\.self\.",
        r"qformer.encoder.layer.\1.\2.attention.",
    ),
    (
        r"^speech_Qformer\.bert\.encoder\.layer\.(\d+)\.(attention\.output|crossattention\.output|intermediate_query"
        r"|output_query)\.",
        r"qformer.encoder.layer.\1.\2.",
    ),
)
# Tensors of the reference's model that nothing here runs, with why.
UNUSED: tuple[tuple[str, str], ...] = (
    (r"^speech_Qformer\.cls\.", "the Q-Former's masked-LM head: only text input reaches it"),
    (
        r"^speech_Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings|position_ids)",
        "the Q-Former's text embeddings: the windows are queries alone",
    ),
    (
        r"^speech_Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.",
        "the Q-Former's text feed-forward: queries take intermediate_query and output_query",
    ),
)
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
CONFIG_KEYS = (
    "whisper_config",
    "llama_config",
    "speech_qformer_token_num",
    "second_per_frame",
    "second_stride",
)
BERT_HEADS = 12  # a default BertConfig's, which init_speech_Qformer starts from


class ReferenceCheckpointError(ValueError):
    """A reference checkpoint this importer cannot map: the message names the file and the tensor or key."""


@dataclass
class Mapping:
    tensors: dict[str, torch.Tensor]  # this project's names
    unused: dict[str, str] = field(default_factory=dict)  # reference name -> why it has no place here
    renamed: dict[str, str] = field(default_factory=dict)  # reference name -> this project's


def weight_files(ckpt: Path) -> list[Path]:
    """The checkpoint's weight files: one file, or the shards an index names (safetensors preferred)."""
    for name in WEIGHT_FILES:
        path = ckpt / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path]
        try:
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ReferenceCheckpointError(
                f"{path}: not a weight index (no weight_map of names to files)"
            ) from e
        missing = [s for s in shards if not (ckpt / s).is_file()]
        if missing:
            raise ReferenceCheckpointError(f"{path}: names shard {missing[0]}, which {ckpt} does not hold")
        return [ckpt / s for s in shards]
    raise ReferenceCheckpointError(f"{ckpt}: no weights ({' or '.join(WEIGHT_FILES)})")


def read_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint. A ``.bin`` is read with ``weights_only`` (tensors, never code)."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for path in weight_files(ckpt):
        try:
            part = (
                load_file(str(path))
                if path.suffix == ".safetensors"
                else torch.load(path, map_location="cpu", weights_only=True)
            )
        except Exception as e:  # a damaged or foreign file: say which
            raise ReferenceCheckpointError(
                f"{path}: cannot be read as weights ({type(e).__name__}: {e})"
            ) from e
        if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
            raise ReferenceCheckpointError(f"{path}: holds something other than named tensors")
        twice = set(part) & set(state)
        if twice:
            raise ReferenceCheckpointError(f"{path}: tensor {sorted(twice)[0]} is also in another shard")
        state.update(part)
    return state


def read_config(ckpt: Path) -> dict:
    """The reference's ``SpeechLLMConfig`` as saved (``config.json``), with the keys the import needs."""
    path = ckpt / "config.json"
    if not path.is_file():
        raise ReferenceCheckpointError(f"{ckpt}: no config.json (the reference's SpeechLLMConfig)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ReferenceCheckpointError(f"{path}: not JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise ReferenceCheckpointError(f"{path}: not a JSON object")
    missing = [k for k in CONFIG_KEYS if k not in cfg]
    if missing:
        raise ReferenceCheckpointError(
            f"{path}: no {missing[0]}; a reference checkpoint's config (SpeechLLMConfig) has "
            f"{', '.join(CONFIG_KEYS)}"
        )
    for key in ("whisper_config", "llama_config"):
        if not isinstance(cfg[key], dict):
            raise ReferenceCheckpointError(f"{path}: {key} is not an object")
    return cfg


def rename(state: dict[str, torch.Tensor], source: str = "checkpoint") -> Mapping:
    """Each tensor under this project's name, or in ``unused`` with why; anything else is an error."""
    out = Mapping(tensors={})
    for name, tensor in state.items():
        for pattern, reason in UNUSED:
            if re.search(pattern, name):
                out.unused[name] = reason
                break
        else:
            for pattern, repl in RENAMES:
                new, n = re.subn(pattern, repl, name)
                if n:
                    out.tensors[new] = tensor
                    out.renamed[name] = new
                    break
            else:
                raise ReferenceCheckpointError(
                    f"{source}: tensor {name} {tuple(tensor.shape)} is no part of the reference's BlspModel that "
                    "this importer knows (whisper_model, llama_model, speech_Qformer, speech_query_tokens, "
                    "speech_llama_proj, ln_speech)"
                )
    return out


def lsm_config(cfg: dict, tensors: dict[str, torch.Tensor], source: str = "config.json"):
    """This project's ``LSMConfig`` for the reference's model: its sub-configs, its windows, the Q-Former's sizes
    from the tensors."""
    from transformers import Blip2QFormerConfig, LlamaConfig, WhisperConfig

    from core.lsm.model import LSMConfig

    def shape(name: str) -> tuple[int, ...]:
        if name not in tensors:
            raise ReferenceCheckpointError(f"{source}: the checkpoint has no tensor for {name}")
        return tuple(tensors[name].shape)

    q = shape("query_tokens")
    if len(q) != 3 or q[0] != 1:
        raise ReferenceCheckpointError(f"speech_query_tokens: shape {q}, not [1, queries, hidden]")
    if q[1] != cfg["speech_qformer_token_num"]:
        raise ReferenceCheckpointError(
            f"{source}: speech_qformer_token_num is {cfg['speech_qformer_token_num']} but speech_query_tokens "
            f"holds {q[1]} queries"
        )
    layers = sorted(
        {int(m.group(1)) for k in tensors if (m := re.match(r"qformer\.encoder\.layer\.(\d+)\.", k))}
    )
    if layers != list(range(len(layers))) or not layers:
        raise ReferenceCheckpointError(f"the checkpoint's Q-Former layers are {layers}, not 0 to N-1")
    if "speech_qformer_layer" in cfg and cfg["speech_qformer_layer"] != len(layers):
        raise ReferenceCheckpointError(
            f"{source}: speech_qformer_layer is {cfg['speech_qformer_layer']} but the checkpoint has "
            f"{len(layers)} Q-Former layers"
        )
    hidden = q[2]
    if hidden % BERT_HEADS:
        raise ReferenceCheckpointError(
            f"speech_query_tokens: hidden size {hidden} is not a multiple of 12 heads"
        )
    whisper = WhisperConfig(**cfg["whisper_config"])
    qcfg = Blip2QFormerConfig(
        hidden_size=hidden,
        num_hidden_layers=len(layers),
        num_attention_heads=BERT_HEADS,
        intermediate_size=shape("qformer.encoder.layer.0.intermediate_query.dense.weight")[0],
        encoder_hidden_size=shape("qformer.encoder.layer.0.crossattention.attention.key.weight")[1],
        cross_attention_frequency=1,
        use_qformer_text_input=False,
    )
    return LSMConfig(
        encoder_config=whisper,
        qformer_config=qcfg,
        llm_config=LlamaConfig(**cfg["llama_config"]),
        window_s=float(cfg["second_per_frame"]),
        stride_s=float(cfg["second_stride"]),
        window_mode="per_batch",
        num_queries=q[1],
        freeze_encoder=True,
    )


def load_into(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Every weight of ``model`` from ``tensors``, shapes checked; a missing or surplus tensor is an error."""
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    surplus = sorted(set(tensors) - set(own))
    if missing:
        raise ReferenceCheckpointError(
            f"the checkpoint has nothing for {len(missing)} of the model's tensors, the first {missing[0]}"
        )
    if surplus:
        raise ReferenceCheckpointError(f"the checkpoint's {surplus[0]} has no place in the model")
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(own[name].shape):
            raise ReferenceCheckpointError(
                f"tensor {name}: shape {tuple(t.shape)} in the checkpoint, {tuple(own[name].shape)} in the model "
                "its config describes"
            )
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in tensors.items()}, strict=True)
