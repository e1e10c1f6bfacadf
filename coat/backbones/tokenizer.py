"""A small byte-level BPE tokenizer for tiny backbones, trained offline on coat-mini text (`tiny_corpus.txt`: every
prompt, answer, choice and sentence coat-mini can emit, kept equal to `coat.data.synth.text_corpus` by a test).

Tiny instances stand in for the 7B checkpoints in the embedded default and the tests; their tokenizer has
the same chat special tokens as the real one, so prompts are built by the same code for both.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# Words of the chat templates themselves, so they tokenize compactly too.
CHAT_TEXT = [
    "system", "user", "assistant", "You are a helpful assistant.", "Audio 1:",
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving auditory "
    "and visual inputs, as well as generating text and speech.",
]


def tiny_corpus() -> list[str]:
    return Path(__file__).with_name("tiny_corpus.txt").read_text().splitlines()


def train_tiny_tokenizer(
    corpus: list[str], special_tokens: list[str], named_tokens: dict[str, str], vocab_size: int = 1024
) -> PreTrainedTokenizerFast:
    """Train a BPE on `corpus` with `special_tokens` first (ids 0..n-1) and wrap it for transformers.

    `named_tokens` become tokenizer attributes (`audio_token`, `audio_token_id`, ...) the processors read.
    Deterministic: the same corpus gives the same ids.
    """
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(CHAT_TEXT + sorted(set(corpus)), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=named_tokens,
    )
