"""Reconstruction expert: the backbone's own frozen audio encoder, as the LLM receives it.

The targets are the audio embeddings the backbone places at its audio-token positions (audio tower and
projector output, in the LLM's hidden size), one frame per audio token: 25 fps for all three backbones. The
slots then learn to restate, in their K positions, what the frozen encoder heard; the model pools the frames
into K segments like any frame-level target. Computed once per clip into the feature store; the version hashes
the encoder's weights, so each backbone (and checkpoint) gets its own targets.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F

from coat.config import load_config
from coat.experts.base import ExpertSpec, check_waveforms

FRAME_RATE = 25.0  # 100 fps log-mel, a stride-2 convolution, then 2x pooling
_REVISION = 1


class _Captured(Exception):
    """Stops the forward once the LLM's input embeddings are known: the decoder's work is not needed."""

    def __init__(self, embeds: torch.Tensor):
        self.embeds = embeds


def _config(backbone: str, size: str, checkpoint: str | None, seed: int, audio_window_s: float):
    overrides = [f"backbone.name={backbone}", f"backbone.size={size}", f"backbone.seed={seed}",
                 f"backbone.audio_window_s={audio_window_s}", "thinking.max_slots=0", "thinking.num_slots=0"]
    if checkpoint:
        overrides.append(f"backbone.checkpoint={checkpoint}")
    return load_config(overrides=overrides)


def _spec(name: str, hidden: int) -> ExpertSpec:
    """One frame per audio token; a token covers a 40 ms window, so its time is the window's centre."""
    return ExpertSpec(name=name, dim=hidden, frame_rate=FRAME_RATE, kind="continuous", frame_offset=0.5)


class AudioEncoderExpert:
    """Audio embeddings [T, hidden] at 25 fps from the configured backbone's frozen audio path.

    Settings name the backbone as the training config does (`backbone.*`); a run fills them from its own
    config, so each backbone regresses its own encoder."""

    role = "reconstruction"

    @staticmethod
    def describe(name: str = "audio-encoder", backbone: str = "qwen2-audio", size: str = "tiny",
                 checkpoint: str | None = None, seed: int = 0, audio_window_s: float = 8.0,
                 **_settings) -> ExpertSpec:
        # coat.backbones imports transformers (seconds): only this expert needs it, not every process that imports
        # the expert registry (Ray Data's decode tasks among them).
        from coat.backbones import BACKBONES, resolve_checkpoint

        spec = BACKBONES[backbone]
        if checkpoint:
            from transformers import AutoConfig  # as above

            config = AutoConfig.from_pretrained(resolve_checkpoint(checkpoint), local_files_only=True)
            hidden = config.get_text_config().hidden_size
        elif size in ("real", "real-width"):  # real-width keeps the real widths: read them, build nothing
            hidden = spec.real_config().get_text_config().hidden_size
        else:
            from coat.backbones import build_backbone  # as above

            hidden = build_backbone(_config(backbone, size, None, seed, audio_window_s)).hidden_size
        return _spec(name, hidden)

    def __init__(self, name: str = "audio-encoder", backbone: str = "qwen2-audio", size: str = "tiny",
                 checkpoint: str | None = None, seed: int = 0, audio_window_s: float = 8.0, device: str = "cpu"):
        """Build the backbone (tiny random weights, real-size random weights, or `checkpoint`) on `device`.

        Raises:
            ConfigError: an unknown backbone or size.
            FileNotFoundError: `checkpoint` is neither a local directory nor a cached hub id.
        """
        from coat.backbones import backbone_source, build_backbone  # as in `describe`

        cfg = _config(backbone, size, checkpoint, seed, audio_window_s)
        self.name, self.device = name, torch.device(device)
        self.backbone = build_backbone(cfg, self.device)
        if self.backbone.processor is None:
            raise ValueError(f"expert {name!r}: random real-size {backbone} weights come without a processor; give "
                             "a checkpoint (experts.settings.audio-encoder.checkpoint)")
        self.sample_rate = self.backbone.sample_rate
        self.audio_token_id = self.backbone.tokenizer.convert_tokens_to_ids(
            self.backbone.spec.named_tokens["audio_token"])
        self.spec = _spec(name, self.backbone.hidden_size)
        self.source = f"{backbone} audio encoder ({backbone_source(cfg)})"
        self.version = self._hash(backbone)

    def _hash(self, backbone: str) -> str:
        """The weights of everything before the LLM (audio tower, projector) and what frames they give."""
        digest = hashlib.sha256(f"{backbone}|{FRAME_RATE}|{_REVISION}".encode())
        llm_params = {id(p) for p in self.backbone.llm.parameters()}
        for pname, param in self.backbone.model.named_parameters():
            if id(param) not in llm_params and ("audio" in pname or "projector" in pname):
                digest.update(pname.encode())
                digest.update(param.detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()[:12]

    @torch.inference_mode()
    def __call__(self, waveforms: list[torch.Tensor],
                 sample_rate: int | None = None) -> tuple[list[torch.Tensor], list[int]]:
        """Per clip [audio tokens, hidden] float32; clips longer than the backbone's audio window are cut to it,
        clips shorter than one frame padded to it.

        Raises:
            ValueError, TypeError: bad batch (see `check_waveforms`).
        """
        clips = check_waveforms(self.name, waveforms, self.sample_rate, sample_rate)
        one_frame = round(self.sample_rate / FRAME_RATE)  # shorter clips give the LLM no audio token: pad them
        clips = [F.pad(c, (0, max(0, one_frame - len(c)))) for c in clips]
        batch = self.backbone.encode([c.numpy() for c in clips], [""] * len(clips), num_slots=0,
                                     placement="after_prompt")
        inputs = {k: v.to(self.device) for k, v in batch.items()}

        def capture(_module, _args, kwargs):
            raise _Captured(kwargs["inputs_embeds"])

        hook = self.backbone.llm.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            self.backbone.model(**inputs, use_cache=False)
        except _Captured as captured:
            embeds = captured.embeds
        finally:
            hook.remove()
        is_audio = inputs["input_ids"] == self.audio_token_id
        features = [e[mask].float().cpu() for e, mask in zip(embeds, is_audio, strict=True)]
        return features, [len(f) for f in features]
