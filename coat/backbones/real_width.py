"""Overrides shared by the real-width instances: the real architecture's widths, few layers, the tiny tokenizer.

`backbone.size=real-width` exists because the tiny widths (hidden 64, a 1 k vocabulary) hide what only real widths
show: a ~150 k-entry vocabulary's logits for every position, hidden sizes of 3584/4096, 1280-wide audio encoders
with 20 heads. Each adapter's `real_width_config` starts from the same widths as its `real_config` (the config
classes' defaults, or the constants `real_config` passes) and changes only what is not a width:

- the depth: `LAYERS` decoder layers and `LAYERS` layers in every encoder tower, so a CPU runs a training step;
- the token ids: the tiny tokenizer's (a real tokenizer is a checkpoint's), so prompts are built by the same
  `Backbone.encode` as every other size; the embedding keeps the real vocabulary, most of it never fed;
- the audio window of Whisper-style encoders that take exactly one padded window: `backbone.audio_window_s`, as tiny.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

LAYERS = 2


def text_overrides(tokenizer: PreTrainedTokenizerBase) -> dict:
    """The decoder's non-width settings: its depth and the tiny tokenizer's padding and end ids."""
    return {"num_hidden_layers": LAYERS, "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}


def audio_encoder(window_s: float) -> dict:
    """A Whisper-style encoder's non-width settings: its depth, and positions for `window_s` of 100 fps mel after its
    stride-2 convolution (the encoder checks its input is exactly that long)."""
    return {"encoder_layers": LAYERS, "max_source_positions": int(round(window_s * 50))}
