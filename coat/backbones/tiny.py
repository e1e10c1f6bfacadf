"""Sizes shared by the tiny instances: small enough for 2 CPU cores, same classes as the 7B checkpoints."""

from transformers import PreTrainedTokenizerBase, WhisperFeatureExtractor

MEL_BINS = 128  # all three checkpoints use Whisper-large-v3's 128-bin log-mel


def text_config(tokenizer: PreTrainedTokenizerBase, **extra) -> dict:
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        **extra,
    }


def audio_encoder(window_s: float, **extra) -> dict:
    """Whisper-style encoder whose positions cover `window_s` of 100 fps mel after its stride-2 conv."""
    return {
        "d_model": 32,
        "encoder_layers": 2,
        "encoder_attention_heads": 4,
        "encoder_ffn_dim": 64,
        "num_mel_bins": MEL_BINS,
        "max_source_positions": int(round(window_s * 50)),
        **extra,
    }


def feature_extractor(window_s: float) -> WhisperFeatureExtractor:
    if window_s != int(window_s):
        raise ValueError(f"the tiny audio window must be whole seconds, got {window_s}")
    return WhisperFeatureExtractor(feature_size=MEL_BINS, chunk_length=int(window_s))
