"""The large speech-text model: Whisper encoder -> window-level Q-Former -> projection -> causal LLM.

The connector is SALMONN's window-level Q-Former, which the self-powered paper's code also uses:

  log-mel (80 x 3000, 30 s)  --WhisperEncoder (frozen)-->  1500 frames x d_model (50 Hz)
  (a tiny Whisper may take a shorter chunk: its max_source_positions / 50 seconds, its feature extractor's
  chunk_length; the windows follow)
  --LayerNorm-->  unfold into windows  --Q-Former (``num_queries`` learned queries per window,
  cross-attention in every layer)-->  --Linear-->  speech tokens in the LLM's embedding space

Two ways to cut the windows (``window_mode``):

- ``fixed`` (SALMONN's, the project's default): ``window_s`` and ``stride_s`` seconds, 17 frames for 0.33333 s,
  about 3 speech tokens per second of audio. Speech tokens of windows that lie wholly after the end of a clip
  are dropped (the Whisper input is padded to its chunk, 30 s, so most of them are silence); the LLM never
  attends to them.
- ``per_batch`` (the reference's, src/modeling_blsp.py): the encoder output is cut to the batch's longest clip
  (T frames) and kernel = round(T x window_s / 30), stride = round(T x stride_s / 30) frames, so every clip of
  a batch gets the same number of windows (about 90 whatever the duration). Windows over the padding of
  shorter clips are kept and attended, as in the reference; a clip's speech tokens therefore depend on what
  else is in its batch. Where the reference's formula gives 0 frames (a batch whose longest clip is under
  about 0.9 s, on which its ``F.unfold`` fails), this uses one frame.

Each sample becomes ``[prefix tokens][speech tokens][suffix tokens][answer tokens + eos]``. Training batches
are padded on the right with labels -100 everywhere but the answer and eos; generation batches are padded on
the left so that every row's next token sits in the last column.

The model is a ``PreTrainedModel``: ``save_pretrained`` writes config and safetensors, plus the LLM's
tokenizer and Whisper's feature extractor, so one directory holds everything evaluation needs.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    Blip2QFormerConfig,
    Blip2QFormerModel,
    PretrainedConfig,
    PreTrainedModel,
    WhisperFeatureExtractor,
    WhisperModel,
)
from transformers import initialization as init
from transformers.configuration_utils import SubConfigSpec
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from core.config import ENCODER_FRAMES_PER_S, WINDOW_MODES, QFormerConfig, TrainConfig

# What a loadable checkpoint directory must hold (one of each group).
REQUIRED_FILES = {
    "config": ("config.json",),
    "weights": ("model.safetensors", "model.safetensors.index.json"),
    "tokenizer": ("tokenizer.json", "tokenizer.model"),
    "tokenizer config": ("tokenizer_config.json",),
    "feature extractor": ("preprocessor_config.json",),
}


class LSMConfig(PretrainedConfig):
    """Configs of the three parts (as sub-configs) plus the window and freezing settings."""

    model_type = "splsm_lsm"
    sub_configs_defaults = {
        "encoder_config": SubConfigSpec(AutoConfig, model_type="whisper"),
        "qformer_config": Blip2QFormerConfig,
        "llm_config": SubConfigSpec(AutoConfig, model_type="llama"),
    }

    encoder_config: dict | PretrainedConfig | None = None
    qformer_config: dict | PretrainedConfig | None = None
    llm_config: dict | PretrainedConfig | None = None
    window_s: float = 0.33333
    stride_s: float = 0.33333
    window_mode: str = (
        "fixed"  # "fixed" (SALMONN's) or "per_batch" (the reference's); see the module docstring
    )
    num_queries: int = 1
    freeze_encoder: bool = True
    freeze_qformer: bool = False
    freeze_proj: bool = False
    freeze_llm: bool = False
    lora: dict | None = None  # peft LoraConfig keyword arguments; the LLM then trains through adapters only
    output_norm: str = (
        "none"  # "rms": an RMSNorm after the projection (core.config.QFormerConfig.output_norm)
    )
    output_rms: float = 1.0  # its gain at initialization: the RMS of the LLM's input embeddings
    proj_init: str = "normal"  # or "torch_default" (core.config.QFormerConfig.proj_init)
    ctc_shrink: bool = False  # the LLM reads the tokens CTC keeps (core.config.QFormerConfig.ctc_shrink)
    ctc_logits: str = "dot"  # or "cosine", "head" (core.config.QFormerConfig.ctc_logits)
    ctc_cosine_scale: float = 30.0
    ctc_mix: bool = False  # the LLM reads kept tokens as CTC's mix of its embeddings (QFormerConfig.ctc_mix)
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.window_s <= 0 or self.stride_s <= 0 or self.num_queries < 1:
            raise ValueError(
                f"LSMConfig: window_s, stride_s must be > 0 and num_queries >= 1, got "
                f"{self.window_s}, {self.stride_s}, {self.num_queries}"
            )
        if self.window_mode not in WINDOW_MODES:
            raise ValueError(
                f"LSMConfig: window_mode {self.window_mode!r} is not one of {', '.join(WINDOW_MODES)}"
            )

    def get_text_config(self, *args, **kwargs):
        return self.llm_config


class LSMForConditionalGeneration(PreTrainedModel):
    config_class = LSMConfig
    config: LSMConfig
    base_model_prefix = "lsm"
    main_input_name = "input_features"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_attention_backend = True
    _no_split_modules = ["WhisperEncoderLayer", "Blip2QFormerLayer"]

    def __init__(
        self, config: LSMConfig, encoder: nn.Module | None = None, llm: PreTrainedModel | None = None
    ):
        super().__init__(config)
        # ``from_parts`` hands in the pretrained encoder and LLM; ``from_pretrained`` builds empty ones
        # from the sub-configs and then loads this model's own safetensors into them.
        self.encoder = encoder if encoder is not None else WhisperEncoder(config.encoder_config)
        d_model = config.encoder_config.d_model
        # SALMONN puts a LayerNorm on the (frozen) encoder's outputs: a trainable rescaling before the Q-Former.
        self.ln_speech = nn.LayerNorm(d_model)
        self.query_tokens = nn.Parameter(
            torch.zeros(1, config.num_queries, config.qformer_config.hidden_size)
        )
        self.qformer = Blip2QFormerModel(config.qformer_config)
        self.llm = llm if llm is not None else AutoModelForCausalLM.from_config(config.llm_config)
        if config.lora:
            from peft import LoraConfig, inject_adapter_in_model

            # Injected in place, not wrapped in a PeftModel: the LLM's own parameters keep their names, so tied
            # embeddings (SmolLM2's) and checkpoints keep their paths; the adapters add lora_A/lora_B beside them.
            inject_adapter_in_model(LoraConfig(task_type="CAUSAL_LM", **config.lora), self.llm)
            if llm is not None:  # peft initialized the adapters (B = 0, so no change yet): keep them so
                for m in self.llm.modules():
                    m._is_hf_initialized = True
                for t in self.llm.parameters():
                    t._is_hf_initialized = True
        self.proj = nn.Linear(config.qformer_config.hidden_size, config.llm_config.hidden_size)
        self.out_norm = (
            nn.RMSNorm(config.llm_config.hidden_size, eps=1e-6) if config.output_norm == "rms" else None
        )
        self.ctc_head = (
            nn.Linear(config.llm_config.hidden_size, config.llm_config.vocab_size)
            if config.ctc_logits == "head"
            else None
        )

        frames = config.encoder_config.max_source_positions  # 1500 encoder frames per 30 s
        self.frames_per_s = ENCODER_FRAMES_PER_S
        self.chunk_s = frames / ENCODER_FRAMES_PER_S
        self.kernel = max(1, round(self.frames_per_s * config.window_s))
        self.stride = max(1, round(self.frames_per_s * config.stride_s))
        if self.kernel > frames:
            raise ValueError(f"window_s={config.window_s} is longer than Whisper's {self.chunk_s} s input")
        self.num_windows = (frames - self.kernel) // self.stride + 1
        self.total_frames = frames
        self.post_init()
        self._apply_freezing()

    # ----- construction -----

    @classmethod
    def from_parts(
        cls,
        whisper_dir: str | Path,
        llm_dir: str | Path,
        qformer: QFormerConfig | None = None,
        freeze_encoder: bool = True,
        freeze_llm: bool = False,
        dtype: torch.dtype = torch.float32,
        freeze_qformer: bool = False,
        freeze_proj: bool = False,
        lora: dict | None = None,
    ) -> LSMForConditionalGeneration:
        """A fresh LSM from a Whisper directory and a causal-LM directory; connector randomly initialized.

        The ``freeze_*`` flags say which parts train; ``lora`` (peft ``LoraConfig`` arguments such as
        ``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``) trains the LLM through adapters only.
        """
        if lora and freeze_llm:
            raise ValueError("from_parts: lora trains the LLM through adapters; it cannot go with freeze_llm")
        qformer = qformer or QFormerConfig()
        encoder = WhisperModel.from_pretrained(str(whisper_dir), dtype=dtype, use_safetensors=True).encoder
        llm = AutoModelForCausalLM.from_pretrained(str(llm_dir), dtype=dtype, use_safetensors=True)
        # The pretrained weights are final: mark them so that post_init's weight initialization skips them.
        for part in (encoder, llm):
            for m in part.modules():
                m._is_hf_initialized = True
            for t in list(part.parameters()) + list(part.buffers()):
                t._is_hf_initialized = True
        qcfg = Blip2QFormerConfig(
            hidden_size=qformer.hidden_size,
            num_hidden_layers=qformer.num_layers,
            num_attention_heads=qformer.num_heads,
            intermediate_size=qformer.intermediate_size,
            encoder_hidden_size=encoder.config.d_model,
            cross_attention_frequency=1,
            use_qformer_text_input=False,
            initializer_range=qformer.init_std,
            hidden_dropout_prob=qformer.dropout,
            attention_probs_dropout_prob=qformer.dropout,
        )
        # A composite config sets its attention implementation on every sub-config, and these sub-configs are
        # the very objects the loaded modules read: hand their own implementations back, or the LLM would run
        # its attention through an unset (None) dispatch.
        attn = {
            "encoder_config": encoder.config._attn_implementation,
            "llm_config": llm.config._attn_implementation,
        }
        config = LSMConfig(
            encoder_config=encoder.config,
            qformer_config=qcfg,
            llm_config=llm.config,
            window_s=qformer.window_s,
            stride_s=qformer.stride_s,
            window_mode=qformer.window_mode,
            num_queries=qformer.num_queries,
            freeze_encoder=freeze_encoder,
            freeze_qformer=freeze_qformer,
            freeze_proj=freeze_proj,
            freeze_llm=freeze_llm,
            lora=dict(lora) if lora else None,
            output_norm=qformer.output_norm,
            proj_init=qformer.proj_init,
            ctc_shrink=qformer.ctc_shrink,
            ctc_logits=qformer.ctc_logits,
            ctc_cosine_scale=qformer.ctc_cosine_scale,
            ctc_mix=qformer.ctc_mix,
            output_rms=float(llm.get_input_embeddings().weight.detach().float().pow(2).mean().sqrt()),
            attn_implementation=attn,
        )
        model = cls(config, encoder=encoder, llm=llm)
        model.tokenizer = AutoTokenizer.from_pretrained(str(llm_dir))
        model.feature_extractor = WhisperFeatureExtractor.from_pretrained(str(whisper_dir))
        return model

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs) -> LSMForConditionalGeneration:
        """Load a checkpoint directory written by ``save_pretrained``, tokenizer and feature extractor included."""
        path = Path(pretrained_model_name_or_path)
        if path.is_dir():
            check_checkpoint(path)
        kwargs.setdefault("use_safetensors", True)  # never a pickle: a checkpoint is data, not code
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model = (
            loaded[0] if isinstance(loaded, tuple) else loaded
        )  # output_loading_info=True gives (model, info)
        model.tokenizer = AutoTokenizer.from_pretrained(str(pretrained_model_name_or_path))
        model.feature_extractor = WhisperFeatureExtractor.from_pretrained(str(pretrained_model_name_or_path))
        model._apply_freezing()
        return loaded

    def save_pretrained(self, save_directory, *args, **kwargs):
        super().save_pretrained(save_directory, *args, **kwargs)
        tok, fe = getattr(self, "tokenizer", None), getattr(self, "feature_extractor", None)
        if tok is None or fe is None:
            raise ValueError(
                "save_pretrained: the model has no tokenizer/feature_extractor attached; "
                "build it with from_parts or from_pretrained"
            )
        tok.save_pretrained(save_directory)
        fe.save_pretrained(save_directory)

    def _init_weights(self, module):
        # Only the connector's own modules come here: the encoder, Q-Former and LLM are PreTrainedModels that
        # initialize themselves (and skip weights already loaded).
        std = self.config.qformer_config.initializer_range
        if module is self:
            init.normal_(self.query_tokens, mean=0.0, std=std)
        elif module is self.proj and self.config.proj_init == "torch_default":
            # nn.Linear.reset_parameters, through the init functions that leave loaded weights alone
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1 / math.sqrt(module.in_features)
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif module is self.out_norm:
            init.constant_(module.weight, self.config.output_rms)

    def _frozen_parts(self) -> list[nn.Module]:
        c = self.config
        parts = [self.encoder] if c.freeze_encoder else []
        if c.freeze_qformer:
            parts += [self.qformer, self.ln_speech]
        if c.freeze_proj:
            parts += [self.proj] + [m for m in (self.out_norm, self.ctc_head) if m is not None]
        if c.freeze_llm:
            parts.append(self.llm)
        return parts

    def _apply_freezing(self) -> None:
        for part in self._frozen_parts():
            part.requires_grad_(False)
        if self.config.freeze_qformer:
            self.query_tokens.requires_grad_(False)
        if self.config.lora:  # only the adapters of the LLM train
            for name, p in self.llm.named_parameters():
                p.requires_grad_("lora_" in name)
        self.train(self.training)

    def train(self, mode: bool = True):
        # A frozen part stays in eval mode: its dropout would only add noise that nothing can learn from.
        super().train(mode)
        # Kept prefix states belong to the weights they were computed with, which may have been loaded since.
        self.__dict__.pop("_prefix_store", None)
        for part in self._frozen_parts():
            part.eval()
        return self

    def get_input_embeddings(self):
        return self.llm.get_input_embeddings()

    # ----- speech -----

    def encoder_frames(self, duration_s: float) -> int:
        """Encoder frames (50 Hz) that hold audio of a clip of ``duration_s``, at least one."""
        return max(1, min(math.ceil(duration_s * self.frames_per_s - 1e-6), self.total_frames))

    def batch_windows(self, durations_s) -> tuple[int, int, int, int]:
        """(frames, kernel, stride, windows) the Q-Former sees for a batch of clips of these durations."""
        if self.config.window_mode == "fixed":
            return self.total_frames, self.kernel, self.stride, self.num_windows
        # The reference's: the encoder output cut to the batch's longest clip, windows a fixed share of it.
        frames = max(self.encoder_frames(float(d)) for d in durations_s)
        kernel = max(1, round(frames * self.config.window_s / self.chunk_s))
        stride = max(1, round(frames * self.config.stride_s / self.chunk_s))
        return frames, kernel, stride, (frames - kernel) // stride + 1

    def window_summary(self) -> str:
        """The windows in words, for logs."""
        if self.config.window_mode == "fixed":
            return f"{self.num_windows} windows of {self.kernel} frames every {self.stride}"
        return (
            f"per-batch windows ({self.config.window_s:g} s / {self.chunk_s:g} s of the batch's longest clip: "
            f"{self.batch_windows([self.chunk_s])[3]} windows for a {self.chunk_s:g} s clip)"
        )

    def num_speech_tokens(self, duration_s: float) -> int:
        """Speech tokens a clip gets with fixed windows: those that hold at least one encoder frame of its audio."""
        if self.config.window_mode != "fixed":
            raise ValueError(
                "num_speech_tokens: with per_batch windows the count depends on the batch; use speech_token_counts"
            )
        windows = min(max(1, math.ceil(self.encoder_frames(duration_s) / self.stride)), self.num_windows)
        return windows * self.config.num_queries

    def speech_token_counts(self, durations_s) -> list[int]:
        """Speech tokens the LLM sees for each clip of a batch."""
        if self.config.window_mode == "fixed":
            return [self.num_speech_tokens(float(d)) for d in durations_s]
        return [self.batch_windows(durations_s)[3] * self.config.num_queries] * len(durations_s)

    def window_counts(self, durations_s) -> list[int]:
        """Windows the Q-Former computes for each clip of a batch: with fixed windows those that hold at least one
        encoder frame of the clip's audio (the LLM never sees the others); with per-batch windows every window of
        the batch, padding included, as in the reference."""
        if self.config.window_mode == "fixed":
            return [n // self.config.num_queries for n in self.speech_token_counts(durations_s)]
        return [self.batch_windows(durations_s)[3]] * len(durations_s)

    def frames_needed(self, durations_s) -> list[int]:
        """Encoder frames each clip's windows reach (``connect`` reads no others): about the clip's own frames with
        fixed windows; with per-batch windows the batch's cut, the longest clip's frames."""
        _, kernel, stride, _ = self.batch_windows(durations_s)
        return [(w - 1) * stride + kernel for w in self.window_counts(durations_s)]

    def use_encoder_cache(self, cache) -> None:
        """Read and store the frozen encoder's frames through ``cache`` (a ``core.lsm.encoder_cache.EncoderCache``
        made for this encoder's identity), or stop with None. Refused while the encoder trains: its frames change
        at every step."""
        if cache is not None and any(p.requires_grad for p in self.encoder.parameters()):
            raise ValueError(
                "encoder cache: the encoder trains (freeze_encoder is false); its outputs change"
            )
        self.encoder_cache = cache

    def encode_speech(
        self, input_features: torch.Tensor, durations_s=None, clip_digests=None
    ) -> torch.Tensor:
        """[B, n_mels, frames] log-mels -> [B, W * num_queries, llm hidden] speech embeddings, W the most windows a
        clip of the batch has (a clip's tokens past its own count are zeros: ``assemble`` takes only its own).
        ``durations_s`` (seconds of audio per clip) sets the windows; without it the whole chunk counts as audio.
        ``clip_digests`` (``Collate`` makes them) let an attached encoder cache serve the frames."""
        return self.connect(self.speech_frames(input_features, durations_s, clip_digests), durations_s)

    def encode_frames(self, input_features: torch.Tensor) -> torch.Tensor:
        """The Whisper encoder: [B, n_mels, 2 * F] log-mels -> [B, F, d_model] frames (F = 1500 for 30 s)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_encoder):
            return self.encoder(input_features.to(self.encoder.dtype)).last_hidden_state

    def speech_frames(
        self, input_features: torch.Tensor, durations_s=None, clip_digests=None
    ) -> torch.Tensor:
        """The encoder frames ``connect`` reads: [B, F', d_model]. With an encoder cache attached and the clips'
        digests, a clip seen before is read from the cache and only the others go through the encoder (each then
        stored); a clip's frames past what its windows reach are zeros."""
        cache = getattr(self, "encoder_cache", None)
        if cache is None or clip_digests is None:
            return self.encode_frames(input_features)
        b = input_features.shape[0]
        if durations_s is None:
            durations_s = [self.chunk_s] * b
        need = self.frames_needed(durations_s)
        got: list[torch.Tensor | None] = [cache.get(d, n) for d, n in zip(clip_digests, need, strict=True)]
        miss = [i for i, g in enumerate(got) if g is None]
        if miss:
            with torch.no_grad():
                fresh = self.encode_frames(input_features[miss])
            for j, i in enumerate(miss):
                got[i] = fresh[j, : need[i]]
                cache.put(clip_digests[i], got[i])
        device = input_features.device
        frames = torch.zeros(b, max(need), got[0].shape[-1], dtype=self.encoder.dtype, device=device)
        for i, g in enumerate(got):
            frames[i, : need[i]] = g.to(device)
        return frames

    def connect(self, frames: torch.Tensor, durations_s=None) -> torch.Tensor:
        """LayerNorm, windows, Q-Former and projection: [B, F, d_model] -> [B, W * Q, llm hidden].

        Only the windows each clip's tokens come from go through the Q-Former (``window_counts``), packed into one
        batch of windows: a window's query attends to its own frames only, so a window's output is the same
        whatever else is computed beside it. With per-batch windows that is every window, as in the reference."""
        b, _, d = frames.shape
        if durations_s is None:
            durations_s = [self.chunk_s] * b
        _, kernel, stride, _ = self.batch_windows(durations_s)
        counts = self.window_counts(durations_s)
        w = max(counts)
        # the frames the windows reach (the batch's cut with per-batch windows); LayerNorm is per frame
        frames = self.ln_speech(frames[:, : (w - 1) * stride + kernel].to(self.ln_speech.weight.dtype))
        # Windows of `kernel` frames every `stride` frames: [B, W, kernel, d], then one Q-Former row per window.
        windows = frames.unfold(1, kernel, stride)[:, :w].permute(0, 1, 3, 2)  # [B, W, kernel, d]
        whole = all(c == w for c in counts)  # every clip uses every window (per-batch windows, or 30-s clips)
        if whole:
            picked = windows.reshape(b * w, kernel, d)
        else:
            picked = torch.cat([windows[i, :c] for i, c in enumerate(counts)])
        queries = self.query_tokens.expand(picked.shape[0], -1, -1)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=picked).last_hidden_state
        speech = self.proj(out)  # [sum of counts, Q, H]
        if self.out_norm is not None:
            speech = self.out_norm(speech)
        q = self.config.num_queries
        if whole:
            return speech.reshape(b, w * q, -1)
        rows = speech.split(counts)
        pad = [
            torch.nn.functional.pad(r.reshape(c * q, -1), (0, 0, 0, (w - c) * q))
            for r, c in zip(rows, counts, strict=True)
        ]
        return torch.stack(pad)

    def assemble(
        self,
        speech: torch.Tensor,
        durations_s: torch.Tensor,
        prefix_ids: list[list[int]],
        suffix_ids: list[list[int]],
        answer_ids: list[list[int]] | None = None,
        padding_side: str = "right",
        speech_counts: list[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per row [prefix][valid speech][suffix][answer]; pad to a batch. Returns embeds, mask, labels. A row's
        speech tokens are the first ``speech_counts[i]`` of ``speech[i]`` (default: as its duration gives)."""
        embed = self.llm.get_input_embeddings()
        device, dtype = speech.device, embed.weight.dtype
        rows, labels = [], []
        counts = speech_counts if speech_counts is not None else self.speech_token_counts(durations_s)
        for i in range(speech.shape[0]):
            n = counts[i]
            answer = answer_ids[i] if answer_ids is not None else []
            ids = torch.tensor(
                list(prefix_ids[i]) + list(suffix_ids[i]) + list(answer), dtype=torch.long, device=device
            )
            text = embed(ids)
            p, s = len(prefix_ids[i]), len(suffix_ids[i])
            rows.append(torch.cat([text[:p], speech[i, :n].to(dtype), text[p:]], dim=0))
            lab = torch.full((p + n + s + len(answer),), -100, dtype=torch.long, device=device)
            if answer:
                lab[p + n + s :] = ids[p + s :]
            labels.append(lab)
        length = max(r.shape[0] for r in rows)
        b, h = len(rows), rows[0].shape[1]
        embeds = torch.zeros(b, length, h, dtype=dtype, device=device)
        mask = torch.zeros(b, length, dtype=torch.long, device=device)
        lab_out = torch.full((b, length), -100, dtype=torch.long, device=device)
        for i, (r, lab) in enumerate(zip(rows, labels, strict=True)):
            sl = slice(length - r.shape[0], length) if padding_side == "left" else slice(0, r.shape[0])
            embeds[i, sl] = r
            mask[i, sl] = 1
            lab_out[i, sl] = lab
        return embeds, mask, lab_out

    # ----- training and generation -----

    def forward(
        self,
        input_features: torch.Tensor,
        durations_s: torch.Tensor,
        prefix_ids: list[list[int]],
        suffix_ids: list[list[int]],
        answer_ids: list[list[int]] | None = None,
        clip_digests: list[str] | None = None,
        logits: str = "answer",
        speech: torch.Tensor | None = None,
        speech_counts: list[int] | None = None,
        ctc_targets: list[list[int]] | None = None,
        ctc_weight: float | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Teacher-forced pass; with ``answer_ids`` (answer + eos) the loss is the mean over answer tokens.
        With ``ctc_targets`` (token ids per row) the loss is ``ctc_loss``'s instead and the LLM does not run; with
        ``ctc_weight`` too, the answers' loss plus ``ctc_weight`` x ``ctc_loss`` on the same speech tokens.

        ``speech`` [B, N, llm hidden] puts given embeddings in the speech slot instead of the clips' own
        (``core.lsm.probes``: another clip's, zeros, the transcript's token embeddings), ``speech_counts`` how many
        of each row's the slot holds (default: as the row's duration gives).

        Only what can carry a gradient, or what the loss reads, is computed:

        - with ``answer_ids``, logits only at the positions that predict an answer token: ``out.logits`` is then
          [N, vocab], the batch's N answer tokens (eos included) in row order (``logits="all"``: [B, L, vocab] at
          every position, as the LLM alone gives them);
        - the rows go through the LLM packed into one sequence without their padding, each attending to its own
          tokens only (``_packed_loss``): a batch whose answers differ in length computes no padding;
        - with the LLM frozen (none of its parameters trains), nothing in the prompt prefix before the speech depends
          on a weight that learns: its keys and values are computed once per distinct prefix, without gradient, and
          kept (``prefix_states``); only [speech][suffix][answer] goes through the LLM with gradient, attending to
          them. The loss and the gradients are those of the whole sequence (``tests/test_model_fast_paths.py``).
        """
        own = speech is None
        if own:
            speech = self.encode_speech(input_features, durations_s, clip_digests)
        if ctc_targets is not None:
            counts = speech_counts or self.speech_token_counts(durations_s)
            ctc = self.ctc_loss(speech, counts, ctc_targets)
            if ctc_weight is None:
                return CausalLMOutputWithPast(loss=ctc)
        if own and self.config.ctc_shrink:  # CTC reads every token; the LLM only what it keeps
            speech, speech_counts = self.llm_reads(
                speech, speech_counts or self.speech_token_counts(durations_s)
            )
        if ctc_targets is not None:
            out = self(
                input_features, durations_s, prefix_ids, suffix_ids, answer_ids, clip_digests, logits, speech,
                speech_counts, **kwargs,
            )  # fmt: skip
            out.loss = out.loss + ctc_weight * ctc
            return out
        n = speech_counts
        if answer_ids is None or logits == "all" or kwargs or not self._answer_logits_ok():
            embeds, mask, labels = self.assemble(
                speech, durations_s, prefix_ids, suffix_ids, answer_ids, "right", n
            )
            # Positions count real tokens only, so the same row gets the same positions whatever its padding.
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            return self.llm(
                inputs_embeds=embeds,
                attention_mask=mask,
                position_ids=positions,
                labels=labels if answer_ids is not None else None,
                **kwargs,
            )
        b = speech.shape[0]
        if self._prefix_reusable():  # [speech][suffix][answer] after the kept prefixes
            embeds, mask, labels = self.assemble(
                speech, durations_s, [[]] * b, suffix_ids, answer_ids, "right", n
            )
            return self._packed_loss(embeds, mask, labels, prefix_ids)
        embeds, mask, labels = self.assemble(
            speech, durations_s, prefix_ids, suffix_ids, answer_ids, "right", n
        )
        return self._packed_loss(embeds, mask, labels)

    @property
    def ctc_blank_id(self) -> int:
        """The vocabulary entry that stands for CTC's blank: the tokenizer's eos, which no transcript holds."""
        tok = getattr(self, "tokenizer", None)
        blank = tok.eos_token_id if tok is not None else self.config.llm_config.eos_token_id
        if isinstance(blank, list):
            blank = blank[0]
        if blank is None:
            raise ValueError("ctc_loss: the LLM has no eos token to stand for the blank")
        return int(blank)

    def vocab_logits(self, speech: torch.Tensor) -> torch.Tensor:
        """Each speech token's score for each vocabulary entry, as CTC reads it (``QFormerConfig.ctc_logits``): its
        dot product with the entry's input embedding, ``ctc_cosine_scale`` x their cosine, or the connector's own
        CTC head. The embeddings are taken as they are, without gradient: the LLM is not touched."""
        if self.ctc_head is not None:
            return self.ctc_head(speech)
        table = self.llm.get_input_embeddings().weight.detach()
        x = speech.to(table.dtype)
        if self.config.ctc_logits == "cosine":
            unit = nn.functional.normalize
            return self.config.ctc_cosine_scale * (unit(x, dim=-1) @ unit(table, dim=-1).T)
        return x @ table.T

    def ctc_loss(self, speech: torch.Tensor, counts: list[int], targets: list[list[int]]) -> torch.Tensor:
        """CTC over the LLM's vocabulary (Soundwave's alignment stage): each speech token's logits are its scores
        against the LLM's input embeddings (``vocab_logits``: dot products, or scaled cosines), the eos entry
        standing for the blank (``ctc_blank_id``). The loss pulls each token toward the embedding of the transcript
        token spoken in its window, the form the frozen LLM reads best (the text oracle).

        Per target token, averaged over the rows CTC can align: a row needs a speech token per transcript token
        and one more between repeats. A row with fewer adds nothing (``ctc_rows`` says how many did), nor does one
        whose transcript holds the blank's token (its text spells out the eos string); a batch with none gives 0
        with no gradient."""
        logits = self.vocab_logits(speech)  # [B, W, V]
        logp = logits.float().log_softmax(-1).transpose(0, 1)  # [W, B, V]: ctc_loss's layout
        device = speech.device
        blank = self.ctc_blank_id
        spelt = [blank in t for t in targets]
        targets = [[i for i in t if i != blank] for t in targets]  # those rows are left out below
        lengths = torch.tensor([len(t) for t in targets], dtype=torch.long, device=device)
        per_row = nn.functional.ctc_loss(
            logp,
            torch.tensor([i for t in targets for i in t], dtype=torch.long, device=device),
            torch.tensor(counts, dtype=torch.long, device=device),
            lengths,
            blank=blank,
            reduction="none",
            zero_infinity=True,  # an infeasible row's loss and gradient are 0, never inf or NaN
        )
        need = [len(t) + sum(a == b for a, b in zip(t, t[1:], strict=False)) for t in targets]
        ok = torch.tensor(
            [0 < n <= c and not b for n, c, b in zip(need, counts, spelt, strict=True)], device=device
        )
        self.ctc_rows = (int(ok.sum()), len(targets))
        if not ok.any():
            return logp.sum() * 0.0
        return (per_row[ok] / lengths[ok]).mean()

    def shrink(self, speech: torch.Tensor, counts: list[int]) -> tuple[torch.Tensor, list[int]]:
        """The speech tokens CTC keeps (``QFormerConfig.ctc_shrink``, Soundwave's shrinking): each of a row's first
        ``counts[i]`` tokens is read as its nearest LLM input embedding (``ctc_loss``'s logits); a token read as
        the blank is dropped, and each run of tokens read as one entry becomes their mean. Returns the kept tokens,
        [B, most kept, H] with zeros past a row's own, and how many each row kept (0 where CTC hears only blanks).
        The choice takes no gradient; the kept tokens carry theirs."""
        best = self.vocab_logits(speech.detach()).argmax(-1).tolist()  # [B, W]
        blank, rows = self.ctc_blank_id, []
        for i, n in enumerate(counts):
            ids, kept, j = best[i][:n], [], 0
            while j < n:
                k = j + 1
                while k < n and ids[k] == ids[j]:
                    k += 1
                if ids[j] != blank:
                    kept.append(speech[i, j:k].mean(0))
                j = k
            rows.append(kept)
        new = [len(r) for r in rows]
        out = speech.new_zeros(speech.shape[0], max(max(new), 1), speech.shape[-1])
        for i, r in enumerate(rows):
            if r:
                out[i, : len(r)] = torch.stack(r)
        return out, new

    def mix(self, speech: torch.Tensor) -> torch.Tensor:
        """Each speech token as CTC's posterior over the vocabulary, the blank left out, times the LLM's input
        embeddings (``QFormerConfig.ctc_mix``, LegoSLM's connector): [B, N, H] -> [B, N, H], every token a point
        among the embeddings the LLM reads as text. The gradient reaches the tokens through the posterior; the
        embeddings take theirs only when the LLM's own embeddings train."""
        table = self.llm.get_input_embeddings().weight
        logits = self.vocab_logits(speech).float()
        logits[..., self.ctc_blank_id] = float("-inf")
        return (logits.softmax(-1) @ table.float()).to(speech.dtype)

    def llm_reads(self, speech: torch.Tensor, counts: list[int]) -> tuple[torch.Tensor, list[int]]:
        """What the LLM reads of a batch's speech tokens under ``ctc_shrink`` (``shrink``), each kept token then
        mixed (``mix``) under ``ctc_mix``; returns them and how many each row has."""
        speech, counts = self.shrink(speech, counts)
        return (self.mix(speech) if self.config.ctc_mix else speech), counts

    @torch.inference_mode()
    def ctc_greedy(self, speech: torch.Tensor, counts: list[int]) -> list[list[int]]:
        """What the speech tokens say read as CTC over the LLM's vocabulary (``ctc_loss``'s logits): each row's
        most likely entry per token, repeats merged, blanks dropped. The connector's own transcript, before the
        LLM reads anything: whether the windows carry the words, apart from what the LLM makes of them."""
        best = self.vocab_logits(speech).argmax(-1).tolist()  # [B, W]
        blank, out = self.ctc_blank_id, []
        for row, n in zip(best, counts, strict=True):
            ids = [t for i, t in enumerate(row[:n]) if i == 0 or t != row[i - 1]]
            out.append([t for t in ids if t != blank])
        return out

    def _answer_logits_ok(self) -> bool:
        # An LLM that rescales or caps its logits after the head (Gemma 2, Cohere) goes through its own forward, and
        # so does one whose attention takes no explicit mask (packing and kept prefixes need one).
        c = self.config.llm_config
        if c._attn_implementation not in ("sdpa", "eager"):
            return False
        return not getattr(c, "final_logit_softcapping", None) and getattr(c, "logit_scale", None) in (
            None,
            1.0,
        )

    def _prefix_reusable(self) -> bool:
        """Whether the prefix's keys and values can be computed without gradient and kept: the LLM has no trainable
        parameter, the attention takes an explicit mask, and no sharding needs every rank to run the same layers
        (the trainer turns ``reuse_prefix_states`` off under FSDP, where a cache hit on one rank would skip a
        collective the others run)."""
        return getattr(self, "reuse_prefix_states", True) and not any(
            p.requires_grad for p in self.llm.parameters()
        )

    def prefix_states(self, ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the (keys, values) [kv heads, len(ids), head dim] of a prompt prefix run alone through the
        frozen LLM; computed once per distinct prefix and kept (least recently used out past 512)."""
        key = tuple(ids)
        store = self.__dict__.setdefault("_prefix_store", OrderedDict())
        hit = store.get(key)
        if hit is not None:
            store.move_to_end(key)
            return hit
        device = self.llm.get_input_embeddings().weight.device
        # ordinary tensors even under inference_mode (decoding), so that a training step may read them later
        with torch.inference_mode(False), torch.no_grad():
            out = self.llm.get_decoder()(input_ids=torch.tensor([ids], device=device), use_cache=True)
        hit = [(layer.keys[0], layer.values[0]) for layer in out.cache.layers]
        store[key] = hit
        if len(store) > 512:
            store.popitem(last=False)
        return hit

    def _prefix_cache(self, prefix_ids: list[list[int]], device):
        """The rows' kept prefix states as one cache: (cache, prefix lengths [B], which prefix slots hold a token
        [B, P]). Each row's keys and values are right-padded to the longest prefix; the padding is masked out."""
        from transformers import DynamicCache

        b = len(prefix_ids)
        states = [self.prefix_states(p) for p in prefix_ids]
        plen = torch.tensor([len(p) for p in prefix_ids], device=device)
        width = int(plen.max())
        past = []
        for layer in range(len(states[0])):
            k0, v0 = states[0][layer]
            keys = k0.new_zeros(b, k0.shape[0], width, k0.shape[-1])
            values = v0.new_zeros(b, v0.shape[0], width, v0.shape[-1])
            for i, row in enumerate(states):
                k, v = row[layer]
                keys[i, :, : k.shape[1]] = k
                values[i, :, : v.shape[1]] = v
            past.append((keys, values))
        held = torch.arange(width, device=device)[None, :] < plen[:, None]
        return DynamicCache(ddp_cache_data=past), plen, held

    def _mask4d(self, allowed: torch.Tensor, dtype) -> torch.Tensor:
        """[B, 1, Q, K] attention mask from which keys each query may see: bool for sdpa, additive for eager."""
        if self.config.llm_config._attn_implementation != "eager":
            return allowed
        attn = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        return attn.masked_fill_(~allowed, torch.finfo(dtype).min)

    def _run_after_prefix(self, embeds, mask, prefix_ids):
        """[speech][suffix][answer] rows (right-padded ``embeds``, ``mask``) through the LLM's decoder after their
        kept prefixes: (hidden states, the cache, prefix lengths, prefix slots held)."""
        b, length = mask.shape
        device = embeds.device
        cache, plen, held = self._prefix_cache(prefix_ids, device)
        # A row's token j sits at position len(prefix) + j and sees its own prefix and its tokens up to j.
        positions = plen[:, None] + (mask.cumsum(-1) - 1).clamp(min=0)
        q = torch.arange(length, device=device)
        sees_new = (q[:, None] >= q[None, :])[None] & mask.bool()[:, None, :]
        allowed = torch.cat([held[:, None, :].expand(b, length, held.shape[1]), sees_new], dim=-1)[:, None]
        hidden = self.llm.get_decoder()(
            inputs_embeds=embeds,
            attention_mask=self._mask4d(allowed, embeds.dtype),
            position_ids=positions,
            cache=cache,
            use_cache=True,
        ).last_hidden_state
        return hidden, cache, plen, held

    def _packed_loss(self, embeds, mask, labels, prefix_ids=None) -> CausalLMOutputWithPast:
        """The rows of a right-padded batch packed into one sequence without their padding, each row attending
        to its own tokens only (and, with ``prefix_ids``, to its own kept prefix): nothing is computed for the
        padding that a batch of unequal answers would carry. Loss and logits at the answer positions only."""
        b = mask.shape[0]
        device = embeds.device
        real = mask.bool()
        lens = mask.sum(-1)
        x = embeds[real][None]  # [1, T, H]
        # the token each position predicts: the next one of its own row (none after a row's last token)
        target = torch.cat([labels[:, 1:], labels.new_full((b, 1), -100)], dim=1)[real]
        row = torch.repeat_interleave(torch.arange(b, device=device), lens)
        local = (mask.cumsum(-1) - 1)[real]  # position within the row
        sees = (row[:, None] == row[None, :]) & (local[:, None] >= local[None, :])  # [T, T]
        positions, cache = local, None
        if prefix_ids is not None:
            # each distinct prefix once in the keys and values; a row sees the one it starts with
            distinct = list(dict.fromkeys(tuple(p) for p in prefix_ids))
            which = torch.tensor([distinct.index(tuple(p)) for p in prefix_ids], device=device)
            states = [self.prefix_states(list(p)) for p in distinct]
            plen = torch.tensor([len(p) for p in distinct], device=device)
            owner = torch.repeat_interleave(torch.arange(len(distinct), device=device), plen)
            sees = torch.cat([which[row][:, None] == owner[None, :], sees], dim=-1)
            positions = plen[which][row] + local
            from transformers import DynamicCache

            past = [
                (
                    torch.cat([st[layer][0] for st in states], 1)[None],
                    torch.cat([st[layer][1] for st in states], 1)[None],
                )
                for layer in range(len(states[0]))
            ]
            cache = DynamicCache(ddp_cache_data=past)
        hidden = self.llm.get_decoder()(
            inputs_embeds=x,
            attention_mask=self._mask4d(sees[None, None], x.dtype),
            position_ids=positions[None],
            cache=cache,
            use_cache=cache is not None,
        ).last_hidden_state[0]
        keep = target != -100
        logits = self.llm.get_output_embeddings()(hidden[keep])
        loss = nn.functional.cross_entropy(logits.float(), target[keep])
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    @torch.inference_mode()
    def generate(
        self,
        input_features: torch.Tensor,
        durations_s: torch.Tensor,
        prefix_ids: list[list[int]],
        suffix_ids: list[list[int]],
        max_new_tokens: int = 128,
        num_beams: int = 1,
        clip_digests: list[str] | None = None,
        on_token: Callable[[int, int | None], None] | None = None,
        **kwargs,
    ) -> list[list[int]]:
        """Each row's new tokens up to (not including) eos.

        ``on_token(row, token)`` is called with each row's tokens as they are decoded, then ``(row, None)`` when
        the row is done (eos or ``max_new_tokens``): what streaming needs. Greedy decoding calls it at every
        step; the LLM's own ``generate`` (below) only once it has finished, for each token in turn.

        Greedy decoding (``num_beams`` 1, no other generation option but ``min_new_tokens``, and an LLM whose
        generation config changes no logits) runs ``greedy``: the kept prompt prefixes, then one step per token
        for the rows still decoding. Otherwise (beam search, logits processors) the LLM's own ``generate`` decodes
        the left-padded rows with its KV cache. Both give the same tokens (``tests/test_model_fast_paths.py``)."""
        speech = self.encode_speech(input_features, durations_s, clip_digests)
        counts = None
        if self.config.ctc_shrink:
            speech, counts = self.llm_reads(speech, self.speech_token_counts(durations_s))
        tok = getattr(self, "tokenizer", None)
        eos = kwargs.pop("eos_token_id", None)
        if eos is None:
            eos = tok.eos_token_id if tok is not None and tok.eos_token_id is not None else None
        if eos is None:
            eos = self.config.llm_config.eos_token_id
        eos_ids = list(eos) if isinstance(eos, list | tuple) else [eos]
        pad = kwargs.pop("pad_token_id", None)
        if pad is None:
            pad = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else eos_ids[0]
        if num_beams == 1 and set(kwargs) <= {"min_new_tokens"} and self._greedy_ok():
            return self.greedy(
                speech,
                durations_s,
                prefix_ids,
                suffix_ids,
                max_new_tokens,
                eos_ids,
                kwargs.get("min_new_tokens") or 0,
                counts,
                on_token,
            )
        embeds, mask, _ = self.assemble(speech, durations_s, prefix_ids, suffix_ids, None, "left", counts)
        out = self.llm.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            do_sample=False,
            use_cache=True,
            eos_token_id=eos_ids,
            pad_token_id=pad,
            **kwargs,
        )
        result = []
        for row in out.tolist():
            cut = next((j for j, t in enumerate(row) if t in eos_ids), len(row))
            result.append(row[:cut])
        if on_token is not None:
            for i, row in enumerate(result):
                for t in row:
                    on_token(i, t)
                on_token(i, None)
        return result

    def _greedy_ok(self) -> bool:
        """Whether ``greedy`` decodes as the LLM's own ``generate`` would: no logits processor in its generation
        config, and an attention that takes an explicit mask."""
        if getattr(self, "fast_decode", True) is False or not self._answer_logits_ok():
            return False
        if self.config.llm_config._attn_implementation not in ("sdpa", "eager"):
            return False
        gc = getattr(self.llm, "generation_config", None)
        if gc is None:
            return True
        neutral = {
            "repetition_penalty": (None, 1.0),
            "no_repeat_ngram_size": (None, 0),
            "encoder_repetition_penalty": (None, 1.0),
            "bad_words_ids": (None,),
            "suppress_tokens": (None,),
            "begin_suppress_tokens": (None,),
            "forced_bos_token_id": (None,),
            "forced_eos_token_id": (None,),
            "sequence_bias": (None,),
            "min_length": (None, 0),
            "min_new_tokens": (None, 0),
        }
        return all(getattr(gc, k, None) in ok for k, ok in neutral.items())

    def greedy(
        self,
        speech: torch.Tensor,
        durations_s,
        prefix_ids: list[list[int]],
        suffix_ids: list[list[int]],
        max_new_tokens: int,
        eos_ids: list[int],
        min_new_tokens: int = 0,
        speech_counts: list[int] | None = None,
        on_token: Callable[[int, int | None], None] | None = None,
    ) -> list[list[int]]:
        """Greedy decoding after the kept prompt prefixes (``prefix_states``): [speech][suffix] of every row in one
        pass, then one token per step for the rows that have not reached eos; a row that reaches it leaves the
        batch (its keys and values too), so a batch costs what its rows need, not its longest row times B.
        ``on_token``: as ``generate``'s, called at every step."""
        b = speech.shape[0]
        embeds, mask, _ = self.assemble(
            speech, durations_s, [[]] * b, suffix_ids, None, "right", speech_counts
        )
        hidden, cache, plen, held = self._run_after_prefix(embeds, mask, prefix_ids)
        rest = mask.sum(-1)
        last = hidden[torch.arange(b, device=hidden.device), rest - 1]
        seen = torch.cat([held, mask.bool()], dim=-1)  # [B, keys]: which cache slots each row may attend to
        pos = plen + rest  # each row's next position
        head, embed = self.llm.get_output_embeddings(), self.llm.get_input_embeddings()
        decoder = self.llm.get_decoder()
        eos = torch.tensor(eos_ids, device=hidden.device)
        rows = torch.arange(b, device=hidden.device)  # which original row each active row is
        out: list[list[int]] = [[] for _ in range(b)]
        done = [False] * b  # which rows on_token has been told are done
        for step in range(max_new_tokens):
            logits = head(last)
            if step < min_new_tokens:
                logits[:, eos] = torch.finfo(logits.dtype).min
            nxt = logits.argmax(-1)
            ended = torch.isin(nxt, eos)
            for r, t, e in zip(rows.tolist(), nxt.tolist(), ended.tolist(), strict=True):
                if not e:
                    out[r].append(t)
                if on_token is not None:
                    on_token(r, None if e else t)
                    done[r] = e
            if step == max_new_tokens - 1:
                break
            if ended.any():  # finished rows leave the batch
                keep = (~ended).nonzero().squeeze(-1)
                if keep.numel() == 0:
                    break
                rows, nxt, seen, pos = rows[keep], nxt[keep], seen[keep], pos[keep]
                cache.batch_select_indices(keep)
            seen = torch.cat([seen, seen.new_ones(seen.shape[0], 1)], dim=-1)
            h = decoder(
                inputs_embeds=embed(nxt)[:, None],
                attention_mask=self._mask4d(seen[:, None, None, :], embeds.dtype),
                position_ids=pos[:, None],
                cache=cache,
                use_cache=True,
            ).last_hidden_state
            last = h[:, -1]
            pos = pos + 1
        if on_token is not None:  # the rows cut at max_new_tokens
            for r in range(b):
                if not done[r]:
                    on_token(r, None)
        return out


def part_flags(train: TrainConfig) -> dict:
    """``from_parts`` keyword flags (what trains, LoRA) from a config's train section."""
    lora = None
    if train.lora is not None:
        lora = dict(
            r=train.lora.r,
            lora_alpha=train.lora.alpha,
            lora_dropout=train.lora.dropout,
            target_modules=list(train.lora.target_modules),
        )
    return dict(
        freeze_encoder=train.freeze_encoder,
        freeze_qformer=train.freeze_qformer,
        freeze_proj=train.freeze_proj,
        freeze_llm=train.freeze_llm,
        lora=lora,
    )


def init_model(
    whisper_dir: str | Path, llm_dir: str | Path, out_dir: str | Path, train: TrainConfig | None = None
) -> Path:
    """``splsm model init``: one Hugging Face directory (config, safetensors, tokenizer, feature extractor)
    assembled from a Whisper directory and an LLM directory, connector and flags from ``train``; it appears
    whole or not at all and loads back with one ``from_pretrained``."""
    from core.atomic import atomic_dir

    train = train or TrainConfig()
    torch.manual_seed(train.seed)
    model = LSMForConditionalGeneration.from_parts(whisper_dir, llm_dir, train.qformer, **part_flags(train))
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
    return Path(out_dir)


def check_checkpoint(path: str | Path) -> Path:
    """Raise FileNotFoundError naming what a checkpoint directory lacks."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist (run the train stage first)")
    missing = [
        f"{what} ({' or '.join(names)})"
        for what, names in REQUIRED_FILES.items()
        if not any((path / n).is_file() for n in names)
    ]
    if missing:
        raise FileNotFoundError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    return path


# Let AutoConfig (which AutoTokenizer consults when it reads a checkpoint directory) know our model type.
AutoConfig.register(LSMConfig.model_type, LSMConfig, exist_ok=True)
