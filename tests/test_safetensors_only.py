"""Model directories are loaded from safetensors only: a directory that holds its weights as a pickle
(``pytorch_model.bin``, which runs code when unpickled) is refused, never loaded."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def pickled_whisper(tmp_path_factory):
    from transformers import GenerationConfig, WhisperConfig, WhisperForConditionalGeneration

    d = tmp_path_factory.mktemp("pickled-whisper")
    cfg = WhisperConfig(
        vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=80,
        max_source_positions=1500, max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1,
    )  # fmt: skip
    model = WhisperForConditionalGeneration(cfg)
    cfg.save_pretrained(d)
    GenerationConfig(decoder_start_token_id=1, no_timestamps_token_id=2).save_pretrained(d)
    torch.save(model.state_dict(), d / "pytorch_model.bin")  # the pickle format, and nothing else
    return d


def test_the_reference_whisper_refuses_pickled_weights(pickled_whisper):
    from stages.evaluate.reference import load

    with pytest.raises(OSError, match="safetensors"):
        load(pickled_whisper, "cpu")


def test_the_lsm_refuses_a_pickled_speech_encoder(pickled_whisper, tiny_models_dir):
    from core.lsm.model import LSMForConditionalGeneration

    with pytest.raises(OSError, match="safetensors"):
        LSMForConditionalGeneration.from_parts(pickled_whisper, tiny_models_dir / "llm")
