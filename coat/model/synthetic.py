"""Model batches built from token ids alone, laid out as `Backbone.encode` lays them out.

Random real-size weights come without a tokenizer or processor, so what measures a real-size model (the
overhead benchmark, `coat preflight`) feeds ids: half the prompt, the audio placeholders for a clip of the given
length, the other half, the thinking block, the response; log-mel features and expert targets are noise.
"""

from __future__ import annotations

import torch

from coat.model.coat_model import CoATModel


def audio_tokens(frames: int) -> int:
    """Audio tokens the encoder gives for `frames` 100 fps log-mel frames (stride-2 convolution, 2x pooling)."""
    return (((frames - 1) // 2 + 1) - 2) // 2 + 1


def synthetic_batch(model: CoATModel, batch_size: int, seconds: float, prompt_tokens: int, k: int,
                    response_tokens: int, device: str | torch.device) -> dict[str, torch.Tensor]:
    """A training batch of `batch_size` identical rows with `k` thinking slots and targets for every expert."""
    backbone = model.backbone
    config = backbone.model.config
    window = config.audio_config.max_source_positions * 2
    frames = min(int(seconds * 100), window)
    text_vocab = min(config.get_text_config().vocab_size, backbone.thinking.first_id) - 1
    g = torch.Generator().manual_seed(0)

    def text(n: int) -> torch.Tensor:
        return torch.randint(10, text_vocab, (n,), generator=g)

    audio_id = config.audio_token_id if hasattr(config, "audio_token_id") else config.audio_token_index
    block = torch.tensor([] if k == 0 else [backbone.thinking.first_id, *backbone.thinking.slot_ids(k),
                                            backbone.thinking.first_id + 1], dtype=torch.long)
    row = torch.cat([
        text(prompt_tokens // 2),
        torch.full((audio_tokens(frames),), audio_id),
        text(prompt_tokens - prompt_tokens // 2),
        block,
        text(response_tokens),
    ])
    if backbone.name == "qwen2.5-omni":  # M-RoPE finds the audio by its start/end markers
        start = prompt_tokens // 2
        row[start - 1], row[start + audio_tokens(frames)] = config.audio_start_token_id, config.audio_end_token_id
    ids = row.repeat(batch_size, 1)
    labels = torch.full_like(ids, -100)
    labels[:, -response_tokens:] = ids[:, -response_tokens:]
    mel_frames = frames if backbone.name == "qwen2.5-omni" else window
    mask = torch.zeros(batch_size, mel_frames, dtype=torch.long)
    mask[:, :frames] = 1
    batch = {
        "input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
        "input_features": torch.randn(batch_size, config.audio_config.num_mel_bins, mel_frames, generator=g),
        backbone.spec.audio_keys[1]: mask,
    }
    for name, spec in model.experts.items():
        shape = (batch_size, spec.dim) if spec.clip_level else (batch_size, int(seconds * spec.frame_rate), spec.dim)
        batch[f"target.{name}"] = torch.randn(*shape, generator=g)
        if not spec.clip_level:
            batch[f"target_len.{name}"] = torch.full((batch_size,), shape[1])
    dtype = backbone.model.dtype
    return {key: (v.to(device, dtype) if v.is_floating_point() and key == "input_features" else v.to(device))
            for key, v in batch.items()}


def prompt_inputs(model: CoATModel, batch: dict[str, torch.Tensor], response_tokens: int) -> dict[str, torch.Tensor]:
    """The model inputs of `batch` without its response: what a prefill (and generation) starts from."""
    keys = ("input_ids", "attention_mask", *model.backbone.spec.audio_keys)
    inputs = {key: batch[key] for key in keys}
    return inputs | {"input_ids": inputs["input_ids"][:, :-response_tokens],
                     "attention_mask": inputs["attention_mask"][:, :-response_tokens]}
