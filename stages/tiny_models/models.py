"""Tiny random-weight models for laptops and tests, written exactly as real checkpoints are.

No model hub is reachable from a laptop demo or CI, so we build the two models the recipe needs
from configs in code: a Whisper (full encoder-decoder checkpoint, as ``openai/whisper-large-v2``
ships) with its feature extractor, and a Llama causal LM (as Vicuna-7B v1.5) with a BPE tokenizer
trained on the corpus text. Both are saved with ``save_pretrained`` as safetensors, and every stage
loads them by path with ``from_pretrained``: the same code that loads the real directories.
"""

from __future__ import annotations

from pathlib import Path

from core.atomic import atomic_dir
from core.catalog import load_catalog
from core.config import TINY_WHISPER_HEADS, TinyModels
from core.log import console
from core.paths import ModelsPaths
from core.prompts import VICUNA_V11_SYSTEM
from core.tables import read_transcripts

SPECIAL = ["<unk>", "<s>", "</s>"]


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer with Llama's special tokens, trained on ``texts``.

    Byte-level, so any text (the Chinese of the translation task included) encodes without <unk>.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=2048,
        padding_side="left",
    )


def build_tiny_models(
    texts: list[str], out: ModelsPaths | Path, tiny: TinyModels, seed: int = 1
) -> tuple[Path, Path]:
    """Write the tiny Whisper and Llama directories (``ModelsPaths``, or a folder to hold them); each
    appears whole or not at all."""
    import torch
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
    )

    torch.manual_seed(seed)
    out = out if isinstance(out, ModelsPaths) else ModelsPaths(Path(out))
    with atomic_dir(out.whisper) as tmp:
        wcfg = WhisperConfig(
            vocab_size=512,
            num_mel_bins=80,
            d_model=tiny.whisper_d_model,
            encoder_layers=tiny.whisper_layers,
            encoder_attention_heads=TINY_WHISPER_HEADS,
            encoder_ffn_dim=tiny.whisper_d_model * 2,
            decoder_layers=1,
            decoder_attention_heads=TINY_WHISPER_HEADS,
            decoder_ffn_dim=tiny.whisper_d_model * 2,
            max_source_positions=1500,
            max_target_positions=64,
            decoder_start_token_id=1,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
        WhisperForConditionalGeneration(wcfg).save_pretrained(tmp)
        WhisperFeatureExtractor(feature_size=80).save_pretrained(tmp)

    with atomic_dir(out.llm) as tmp:
        tok = train_tokenizer(texts, tiny.vocab_size)
        lcfg = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=tiny.llm_hidden,
            intermediate_size=tiny.llm_hidden * 2,
            num_hidden_layers=tiny.llm_layers,
            num_attention_heads=tiny.llm_heads,
            num_key_value_heads=tiny.llm_heads,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
        llm = LlamaForCausalLM(lcfg)
        llm.generation_config = GenerationConfig(
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, do_sample=False, max_new_tokens=225
        )
        llm.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    console.print(
        f"tiny models: whisper d_model={tiny.whisper_d_model}, llm hidden={tiny.llm_hidden}, "
        f"vocab={len(tok)} in {out.dir}"
    )
    return out.whisper, out.llm


def corpus_texts(transcripts: Path, catalog_path: Path | None = None) -> list[str]:
    """What the tokenizer learns from: transcripts, the instruction catalog and the system prompt."""
    table = read_transcripts(transcripts)
    catalog = load_catalog(catalog_path)
    texts = table.column("text").to_pylist() + table.column("text_raw").to_pylist()
    texts += [i.text for cat in catalog.categories.values() for i in cat.instructions]
    texts += [VICUNA_V11_SYSTEM, "USER: ASSISTANT: SPEECH:"]
    return texts
