"""Audio Flamingo 3 (HF port): AF-Whisper encoder over 30 s windows, Qwen2.5-7B LLM, `<sound>` placeholder."""

from transformers import AudioFlamingo3Config, AudioFlamingo3ForConditionalGeneration, AudioFlamingo3Processor

from coat.backbones import real_width, tiny
from coat.backbones.base import BackboneSpec

SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<sound>")

# The checkpoint's ChatML template: content parts in order, audio rendered as one `<sound>` placeholder.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'audio' %}<sound>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_config(tokenizer, window_s: float) -> AudioFlamingo3Config:
    return AudioFlamingo3Config(
        audio_config={"model_type": "audioflamingo3_encoder", **tiny.audio_encoder(window_s)},
        text_config={"model_type": "qwen2", **tiny.text_config(tokenizer)},
        audio_token_id=tokenizer.convert_tokens_to_ids("<sound>"),
    )


# Qwen2.5-7B's decoder; the AF-Whisper encoder's config defaults are the checkpoint's.
REAL_TEXT = {
    "model_type": "qwen2", "vocab_size": 151672, "hidden_size": 3584, "intermediate_size": 18944,
    "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
    "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}


def real_config() -> AudioFlamingo3Config:
    return AudioFlamingo3Config(text_config=REAL_TEXT, audio_token_id=151669)


def real_width_config(tokenizer, window_s: float) -> AudioFlamingo3Config:
    return AudioFlamingo3Config(
        audio_config={"model_type": "audioflamingo3_encoder", **real_width.audio_encoder(window_s)},
        text_config={**REAL_TEXT, **real_width.text_overrides(tokenizer)},
        audio_token_id=tokenizer.convert_tokens_to_ids("<sound>"),
    )


def tiny_processor(tokenizer, window_s: float) -> AudioFlamingo3Processor:
    return AudioFlamingo3Processor(
        feature_extractor=tiny.feature_extractor(window_s), tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
    )


SPEC = BackboneSpec(
    name="audio-flamingo-3",
    model_class=AudioFlamingo3ForConditionalGeneration,
    checkpoint="nvidia/audio-flamingo-3-hf",
    special_tokens=SPECIAL,
    named_tokens={"audio_token": "<sound>"},
    audio_end="<sound>",
    audio_keys=("input_features", "input_features_mask"),
    tiny_config=tiny_config,
    real_config=real_config,
    real_width_config=real_width_config,
    tiny_processor=tiny_processor,
)
