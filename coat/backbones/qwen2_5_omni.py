"""Qwen2.5-Omni-7B, thinker only (the talker speaks; CoAT needs the text-generating thinker).

The thinker uses 3-D M-RoPE; `get_rope_index` needs the vision start/end ids even for audio-only input.
"""

from transformers import (
    Qwen2_5OmniProcessor,
    Qwen2_5OmniThinkerConfig,
    Qwen2_5OmniThinkerForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

from coat.backbones import real_width, tiny
from coat.backbones.base import BackboneSpec

SPECIAL = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>",
    "<|IMAGE|>", "<|VIDEO|>", "<|vision_bos|>", "<|vision_eos|>",
)
NAMED = {
    "audio_token": "<|AUDIO|>", "image_token": "<|IMAGE|>", "video_token": "<|VIDEO|>",
    "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>",
    "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>",
}
SYSTEM_PROMPT = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving auditory "
    "and visual inputs, as well as generating text and speech."
)
# The checkpoint's template for audio + text turns.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'audio' %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_config(tokenizer, window_s: float) -> Qwen2_5OmniThinkerConfig:
    hidden = tiny.text_config(tokenizer)["hidden_size"]
    head_dim = hidden // tiny.text_config(tokenizer)["num_attention_heads"]
    return Qwen2_5OmniThinkerConfig(
        audio_config={
            "model_type": "qwen2_5_omni_audio_encoder", **tiny.audio_encoder(window_s),
            "n_window": 50, "output_dim": hidden,
        },
        vision_config={
            "depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": hidden,
            "fullatt_block_indexes": [0], "spatial_merge_size": 2,
        },
        text_config={
            **tiny.text_config(tokenizer),
            # M-RoPE splits each head's rotary half into (temporal, height, width) sections.
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                                "mrope_section": [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]},
        },
        **token_ids(tokenizer),
    )


def token_ids(tokenizer) -> dict[str, int]:
    """The thinker config's token ids, from `tokenizer`: M-RoPE finds the audio by its start and end markers."""
    ids = tokenizer.convert_tokens_to_ids
    return {
        "audio_token_index": ids("<|AUDIO|>"), "image_token_index": ids("<|IMAGE|>"),
        "video_token_index": ids("<|VIDEO|>"), "audio_start_token_id": ids("<|audio_bos|>"),
        "audio_end_token_id": ids("<|audio_eos|>"), "vision_start_token_id": ids("<|vision_bos|>"),
        "vision_end_token_id": ids("<|vision_eos|>"), "user_token_id": ids("<|im_start|>"),
    }


# The class defaults are the 7B thinker's architecture, but for the vision tower's width: the checkpoint's ViT is
# Qwen2.5-VL's, 1280 wide (16 heads of 80) and projected to the LLM's 3584, where the default builds it 3584 wide
# (2.4 B parameters too many, found by running the real widths: see `real_width.py`).
REAL_VISION = {"hidden_size": 1280}


def real_config() -> Qwen2_5OmniThinkerConfig:
    return Qwen2_5OmniThinkerConfig(vision_config=REAL_VISION, vision_start_token_id=151652,
                                    vision_end_token_id=151653)


def real_width_config(tokenizer, _window_s: float) -> Qwen2_5OmniThinkerConfig:
    """The real config with few layers per tower. The audio encoder keeps its real positions and 2 s chunks: it
    takes the clip's own length, not one padded window, so the window changes nothing here. The vision tower is
    never fed audio-only prompts, but it is part of the thinker, so it is built at its real width too."""
    return Qwen2_5OmniThinkerConfig(
        audio_config={"encoder_layers": real_width.LAYERS},
        vision_config={**REAL_VISION, "depth": real_width.LAYERS, "fullatt_block_indexes": [real_width.LAYERS - 1]},
        text_config=real_width.text_overrides(tokenizer),
        **token_ids(tokenizer),
    )


def tiny_processor(tokenizer, window_s: float) -> Qwen2_5OmniProcessor:
    return Qwen2_5OmniProcessor(
        image_processor=Qwen2VLImageProcessor(),
        video_processor=Qwen2VLVideoProcessor(),
        feature_extractor=tiny.feature_extractor(window_s),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )


SPEC = BackboneSpec(
    name="qwen2.5-omni",
    model_class=Qwen2_5OmniThinkerForConditionalGeneration,
    checkpoint="Qwen/Qwen2.5-Omni-7B",
    special_tokens=SPECIAL,
    named_tokens=NAMED,
    audio_end="<|audio_eos|>",
    audio_keys=("input_features", "feature_attention_mask"),
    tiny_config=tiny_config,
    real_config=real_config,
    real_width_config=real_width_config,
    tiny_processor=tiny_processor,
    system_prompt=SYSTEM_PROMPT,
)
