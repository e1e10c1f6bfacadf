"""Backbones: one adapter per audio LLM, a registry, and `build_backbone(cfg)`.

`backbone.size=tiny` builds a small random-weight instance of the real class (seeded, so the same config
always gives the same weights); `size=real-width` the real widths with few layers, seeded too, on the tiny
tokenizer (see `real_width.py`); `size=real` loads `backbone.checkpoint` from a local path or the local hub
cache, or without a checkpoint builds the 7B architecture with random weights (for benchmarks). Nothing is
ever downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoProcessor

from coat.backbones import audio_flamingo3, qwen2_5_omni, qwen2_audio
from coat.backbones.base import (
    Backbone,
    BackboneSpec,
    ThinkingTokens,
    add_thinking_tokens,
    find_llm,
    heard_seconds,
)
from coat.backbones.tokenizer import tiny_corpus, train_tiny_tokenizer
from coat.config import CoATConfig, invalid

BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec for spec in (qwen2_audio.SPEC, qwen2_5_omni.SPEC, audio_flamingo3.SPEC)
}

__all__ = ["BACKBONES", "Backbone", "BackboneSpec", "ThinkingTokens", "build_backbone"]


def build_backbone(cfg: CoATConfig, device: str | torch.device = "cpu") -> Backbone:
    """The configured backbone on `device`, with `thinking.max_slots` thinking ids reserved in its tokenizer.

    Random real-size weights are created on `device` directly (initialising 8 B parameters on a CPU takes
    minutes).

    Raises FileNotFoundError naming the checkpoint when it is neither a local path nor in the hub cache.
    """
    spec = BACKBONES[cfg.backbone.name]
    dtype = getattr(torch, cfg.backbone.dtype)
    checkpoint = cfg.backbone.resolved_checkpoint
    if checkpoint is not None:
        path = resolve_checkpoint(checkpoint)
        model = spec.model_class.from_pretrained(path, dtype=dtype, local_files_only=True, device_map=device)
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    elif cfg.backbone.size == "real":
        with torch.device(device):
            model = spec.model_class._from_config(spec.real_config(), dtype=dtype)
        processor = None  # random real-size weights have no tokenizer of their own: benchmarks feed ids
    else:
        model, processor = _build_random(spec, cfg.backbone.size, cfg.backbone.seed, cfg.backbone.audio_window_s,
                                         dtype)
        model = model.to(device=device, dtype=dtype)
    model.eval()
    thinking = (
        add_thinking_tokens(processor.tokenizer, cfg.thinking.max_slots)
        if processor is not None
        else ThinkingTokens(first_id=model.config.get_text_config().vocab_size, max_slots=cfg.thinking.max_slots)
    )
    return Backbone(spec=spec, model=model, processor=processor, thinking=thinking, llm=find_llm(model))


def check_audio_window(cfg: CoATConfig) -> None:
    """Refuse `data.max_seconds` longer than the configured backbone hears of a clip (from its processor alone, no
    weights): the processor would cut the model's audio while the expert targets cover the whole crop. Random
    real-size weights have no processor, so nothing to check.

    Raises ConfigError naming both numbers; FileNotFoundError as `resolve_checkpoint`."""
    spec, checkpoint = BACKBONES[cfg.backbone.name], cfg.backbone.resolved_checkpoint
    if checkpoint is not None:
        processor = AutoProcessor.from_pretrained(resolve_checkpoint(checkpoint), local_files_only=True)
    elif cfg.backbone.size == "real":
        return
    else:
        tokenizer = train_tiny_tokenizer(tiny_corpus(), list(spec.special_tokens), spec.named_tokens)
        processor = spec.tiny_processor(tokenizer, cfg.backbone.audio_window_s)
    heard = heard_seconds(processor)
    if cfg.data.max_seconds > heard:
        raise invalid("data.max_seconds", f"{cfg.data.max_seconds:g} s is longer than {cfg.backbone.name} hears of a "
                                          f"clip ({heard:g} s): its processor would cut the audio while the expert "
                                          f"targets cover all {cfg.data.max_seconds:g} s; set data.max_seconds <= "
                                          f"{heard:g}")


def _build_random(spec: BackboneSpec, size: str, seed: int, window_s: float, dtype: torch.dtype):
    """A seeded random-weight instance on the tiny tokenizer and processor. Tiny weights are drawn in float32 and
    cast, as they always were (so a seed keeps its weights); real-width ones are drawn in `dtype` directly, since a
    float32 copy of their 1.6-1.7 B parameters would double the peak memory of a bf16 build."""
    tokenizer = train_tiny_tokenizer(tiny_corpus(), list(spec.special_tokens), spec.named_tokens)
    processor = spec.tiny_processor(tokenizer, window_s)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if size == "tiny":
            model = spec.model_class(spec.tiny_config(tokenizer, window_s))
        else:
            model = spec.model_class._from_config(real_width_config(spec, tokenizer, window_s), dtype=dtype)
    return model, processor


def real_width_config(spec: BackboneSpec, tokenizer, window_s: float):
    """The adapter's real-width config. Raises ConfigError when the adapter has none."""
    if spec.real_width_config is None:
        raise invalid("backbone.size", f"{spec.name} has no real-width config (BackboneSpec.real_width_config): "
                                       f"use tiny or real")
    return spec.real_width_config(tokenizer, window_s)


def backbone_source(cfg: CoATConfig) -> str:
    """Where the backbone's weights come from, for the run's record: a local directory, a hub id with the cached
    snapshot's revision, or random weights (tiny, with their seed, or real size).

    Raises FileNotFoundError as `resolve_checkpoint`."""
    checkpoint = cfg.backbone.resolved_checkpoint
    if checkpoint is None:
        return f"random {cfg.backbone.size} weights, seed {cfg.backbone.seed}"
    if Path(checkpoint).is_dir():
        return f"local {Path(checkpoint).resolve()}"
    snapshot = Path(resolve_checkpoint(checkpoint))
    return f"hub {checkpoint}@{snapshot.name if snapshot.parent.name == 'snapshots' else snapshot}"


def resolve_checkpoint(checkpoint: str) -> str:
    """A local directory, or the snapshot of an already-cached hub id. Raises FileNotFoundError otherwise."""
    if Path(checkpoint).is_dir():
        return checkpoint
    # only a hub id needs the hub's client: a local path, the tests and the embedded default never load it
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(checkpoint, local_files_only=True)
    except (LocalEntryNotFoundError, ValueError, OSError) as err:
        raise FileNotFoundError(
            f"backbone.checkpoint={checkpoint!r} is not a local directory nor a hub id in the local cache "
            f"({err.__class__.__name__}). Nothing is downloaded at run time: copy the checkpoint to a local "
            f"path (e.g. `hf download {checkpoint} --local-dir DIR` on a machine with network) "
            f"and set backbone.checkpoint=DIR."
        ) from None
