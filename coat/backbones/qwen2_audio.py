"""Qwen2-Audio-7B-Instruct: Whisper-large-v3 encoder, 25 audio tokens/s, Qwen-7B LLM."""

from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor

from coat.backbones import real_width, tiny
from coat.backbones.base import BackboneSpec

SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>")


def tiny_config(tokenizer, window_s: float) -> Qwen2AudioConfig:
    return Qwen2AudioConfig(
        audio_config={"model_type": "qwen2_audio_encoder", **tiny.audio_encoder(window_s)},
        text_config={"model_type": "qwen2", **tiny.text_config(tokenizer)},
        audio_token_index=tokenizer.convert_tokens_to_ids("<|AUDIO|>"),
    )


# Qwen-7B's decoder; the audio encoder's config defaults are Whisper-large-v3's.
REAL_TEXT = {
    "model_type": "qwen2", "vocab_size": 156032, "hidden_size": 4096, "intermediate_size": 11008,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
}


def real_config() -> Qwen2AudioConfig:
    return Qwen2AudioConfig(text_config=REAL_TEXT, audio_token_index=151646)


def real_width_config(tokenizer, window_s: float) -> Qwen2AudioConfig:
    return Qwen2AudioConfig(
        audio_config={"model_type": "qwen2_audio_encoder", **real_width.audio_encoder(window_s)},
        text_config={**REAL_TEXT, **real_width.text_overrides(tokenizer)},
        audio_token_index=tokenizer.convert_tokens_to_ids("<|AUDIO|>"),
    )


def tiny_processor(tokenizer, window_s: float) -> Qwen2AudioProcessor:
    # The processor's default chat template is Qwen2-Audio-Instruct's.
    return Qwen2AudioProcessor(feature_extractor=tiny.feature_extractor(window_s), tokenizer=tokenizer)


SPEC = BackboneSpec(
    name="qwen2-audio",
    model_class=Qwen2AudioForConditionalGeneration,
    checkpoint="Qwen/Qwen2-Audio-7B-Instruct",
    special_tokens=SPECIAL,
    named_tokens={"audio_token": "<|AUDIO|>", "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>"},
    audio_end="<|audio_eos|>",
    audio_keys=("input_features", "feature_attention_mask"),
    tiny_config=tiny_config,
    real_config=real_config,
    real_width_config=real_width_config,
    tiny_processor=tiny_processor,
)
