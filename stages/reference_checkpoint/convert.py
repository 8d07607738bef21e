"""Read, map, check and write: the body of ``splsm models import-reference``."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from core.stage import StageError
from stages.reference_checkpoint.mapper import (
    ReferenceCheckpointError,
    load_into,
    lsm_config,
    read_config,
    read_state_dict,
    rename,
)


def convert(ckpt: Path, out: Path) -> dict:
    """The model directory at ``out``, written whole (``atomic_dir``); a summary of what went where."""
    from transformers import AutoTokenizer, WhisperFeatureExtractor
    from transformers.initialization import no_init_weights

    from core.atomic import atomic_dir
    from core.log import console
    from core.lsm.model import LSMForConditionalGeneration

    try:
        cfg = read_config(ckpt)
        mapping = rename(read_state_dict(ckpt), str(ckpt))
        tied = cfg["llama_config"].get("tie_word_embeddings", False)
        if (
            tied
            and "llm.lm_head.weight" not in mapping.tensors
            and "llm.model.embed_tokens.weight" in mapping.tensors
        ):
            # safetensors keeps one copy of tied weights: the head is the embedding
            mapping.tensors["llm.lm_head.weight"] = mapping.tensors["llm.model.embed_tokens.weight"]
        config = lsm_config(cfg, mapping.tensors, str(ckpt / "config.json"))
        # the model in the checkpoint's own dtype (a 7B model saved in half precision stays half)
        dtype = Counter(t.dtype for t in mapping.tensors.values()).most_common(1)[0][0]
        before = torch.get_default_dtype()
        torch.set_default_dtype(dtype if dtype.is_floating_point else before)
        try:
            with no_init_weights():
                model = LSMForConditionalGeneration(config)
        finally:
            torch.set_default_dtype(before)
        load_into(model, mapping.tensors)
    except ReferenceCheckpointError as e:
        raise StageError(f"models import-reference: {e}") from e
    try:
        model.tokenizer = AutoTokenizer.from_pretrained(str(ckpt))
        model.feature_extractor = WhisperFeatureExtractor.from_pretrained(str(ckpt))
    except (OSError, ValueError) as e:
        raise StageError(
            f"models import-reference: {ckpt} lacks the tokenizer or Whisper feature extractor the reference's "
            f"training saves beside its weights ({e})"
        ) from e
    if model.tokenizer.pad_token_id is None:  # as the reference trains: pad with eos (train_stage0_sft.py)
        model.tokenizer.pad_token = model.tokenizer.eos_token
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
    reasons = Counter(mapping.unused.values())
    console.print(
        f"models import-reference: {len(mapping.renamed)} tensors mapped, {len(mapping.unused)} left out "
        f"({'; '.join(f'{n}: {r}' for r, n in reasons.items()) or 'none'}) -> {out}"
    )
    return {
        "mapped": len(mapping.renamed),
        "unused": len(mapping.unused),
        "dtype": str(dtype),
        "out": str(out),
    }
