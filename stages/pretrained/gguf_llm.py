"""A causal LM in GGUF -> an ordinary Hugging Face directory (float32 safetensors, tokenizer, chat template).

transformers reads GGUF itself (``gguf_file=``, with the ``gguf`` package); a model read that way can be
saved only once dequantized (``GgufConfig(dequantize=True)``). What it writes then loads with
``from_pretrained`` like any other LLM directory, which is all the stages need.
"""

from __future__ import annotations

from pathlib import Path


class GGUFError(ValueError):
    """The GGUF file cannot be read; the message names it."""


def convert(gguf_file: str | Path, out_dir: str | Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, GgufConfig

    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    try:
        with open(gguf_file, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise GGUFError(f"{gguf_file}: {e}") from e
    if magic != b"GGUF":
        raise GGUFError(f"{gguf_file}: starts with {magic!r}, not the GGUF magic: not a GGUF file")
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_file.parent),
            gguf_file=gguf_file.name,
            quantization_config=GgufConfig(dequantize=True),
        )
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        raise GGUFError(f"{gguf_file}: transformers could not read it ({type(e).__name__}: {e})") from e
    if not tok.chat_template:
        raise GGUFError(f"{gguf_file}: the tokenizer carries no chat template")
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        do_sample=False,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir
