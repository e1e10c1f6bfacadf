"""What every backbone adapter provides, and the prompt/label encoding they share.

An adapter is a `BackboneSpec`: the transformers class, how to build a tiny, real-width or real-size config, a
tiny processor, and the strings of its chat format. Prompts are rendered with the processor's own chat template
(the checkpoint's for real weights) and tokenized by the processor, which expands the audio placeholder;
the thinking block and the response are token ids appended around that, so labels are exact.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin

IGNORE_INDEX = -100
THINK_BOT = "<|coat_bot|>"
THINK_EOT = "<|coat_eot|>"


def slot_token(i: int) -> str:
    return f"<|coat_slot_{i}|>"


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    model_class: type[PreTrainedModel]
    checkpoint: str  # the real checkpoint's hub id, for messages and docs
    special_tokens: tuple[str, ...]  # the tiny tokenizer's special tokens (chat + audio markers)
    named_tokens: dict[str, str]  # tokenizer attributes the processor reads (`audio_token`, ...)
    audio_end: str  # the text right after which `thinking.placement=after_audio` puts the block
    audio_keys: tuple[str, ...]  # the processor outputs the model's forward takes for audio
    tiny_config: Callable[[PreTrainedTokenizerBase, float], PretrainedConfig]
    real_config: Callable[[], PretrainedConfig]
    tiny_processor: Callable[[PreTrainedTokenizerBase, float], ProcessorMixin]
    # The real config's widths with `real_width.LAYERS` layers per tower, on the tiny tokenizer's ids (see
    # `real_width.py`); None: `backbone.size=real-width` is refused for this backbone.
    real_width_config: Callable[[PreTrainedTokenizerBase, float], PretrainedConfig] | None = None
    system_prompt: str | None = None
    end_of_turn: str = "<|im_end|>"
    sample_rate: int = 16000  # all three take 16 kHz Whisper-style log-mel

    def conversation(self, prompt: str) -> list[dict]:
        """One user turn: the audio, then the instruction (the order all three models are tuned on)."""
        turns = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        turns.append({"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": prompt}]})
        return turns


@dataclass(frozen=True)
class ThinkingTokens:
    """Reserved ids: `<|coat_bot|>`, `<|coat_eot|>`, then one id per slot index, consecutive from `first_id`."""

    first_id: int
    max_slots: int

    @property
    def count(self) -> int:
        return self.max_slots + 2

    def slot_ids(self, k: int) -> range:
        return range(self.first_id + 2, self.first_id + 2 + k)

    def is_reserved(self, input_ids: torch.Tensor) -> torch.Tensor:
        return (input_ids >= self.first_id) & (input_ids < self.first_id + self.count)

    def is_slot(self, input_ids: torch.Tensor) -> torch.Tensor:
        return (input_ids >= self.first_id + 2) & (input_ids < self.first_id + self.count)

    @staticmethod
    def block(k: int) -> str:
        """K = 0 is no block at all, so the K = 0 model sees exactly the backbone's own prompt."""
        return "" if k == 0 else THINK_BOT + "".join(slot_token(i) for i in range(k)) + THINK_EOT


def add_thinking_tokens(tokenizer: PreTrainedTokenizerBase, max_slots: int) -> ThinkingTokens:
    """Reserve the thinking block's ids in `tokenizer` (idempotent). Raises RuntimeError if not consecutive."""
    tokens = [THINK_BOT, THINK_EOT] + [slot_token(i) for i in range(max_slots)]
    tokenizer.add_tokens(tokens, special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    if ids != list(range(ids[0], ids[0] + len(ids))):
        raise RuntimeError(f"the tokenizer gave the thinking tokens non-consecutive ids {ids[:4]}...")
    return ThinkingTokens(first_id=ids[0], max_slots=max_slots)


@dataclass
class Backbone:
    """A loaded backbone: the transformers model, its processor and the reserved thinking ids."""

    spec: BackboneSpec
    model: PreTrainedModel
    processor: ProcessorMixin
    thinking: ThinkingTokens
    llm: nn.Module  # the decoder stack, whose forward calls are the cost of prefill and decoding
    # A fast tokenizer switches padding on and off per call and raises "Already borrowed" when two threads do so at
    # once, as the training and validation streams' collate threads can.
    encode_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.processor.tokenizer

    @property
    def sample_rate(self) -> int:
        return self.processor.feature_extractor.sampling_rate

    @property
    def audio_window_s(self) -> float:
        """The longest audio the model hears of one clip, in seconds (`heard_seconds`)."""
        return heard_seconds(self.processor)

    @property
    def hidden_size(self) -> int:
        return self.model.config.get_text_config().hidden_size

    @property
    def end_of_turn_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.spec.end_of_turn)

    def prompt_text(self, prompt: str, num_slots: int, placement: str) -> str:
        """The backbone's chat prompt up to where the response starts, with the thinking block placed."""
        text = self.processor.apply_chat_template(
            self.spec.conversation(prompt), tokenize=False, add_generation_prompt=True
        )
        block = ThinkingTokens.block(num_slots)
        if placement == "after_prompt":
            return text + block
        at = text.find(self.spec.audio_end)
        if at < 0:
            raise ValueError(f"{self.name}: the prompt has no {self.spec.audio_end!r} to place thinking after")
        at += len(self.spec.audio_end)
        return text[:at] + block + text[at:]

    def encode(
        self,
        audio: Sequence[np.ndarray],
        prompts: Sequence[str],
        responses: Sequence[str] | None = None,
        *,
        num_slots: int,
        placement: str = "after_prompt",
    ) -> dict[str, torch.Tensor]:
        """Tensors for the model's forward: prompt (+ response) ids, masks, labels and audio features.

        With `responses`, sequences are right-padded and `labels` mark the response and its end-of-turn token
        only; without, they are left-padded for batched generation. Audio is mono float at `sample_rate`.
        """
        if num_slots > self.thinking.max_slots:
            raise ValueError(f"num_slots={num_slots} exceeds the {self.thinking.max_slots} reserved slot tokens")
        with self.encode_lock:
            return self._encode(audio, prompts, responses, num_slots, placement)

    def _encode(self, audio, prompts, responses, num_slots: int, placement: str) -> dict[str, torch.Tensor]:
        texts = [self.prompt_text(p, num_slots, placement) for p in prompts]
        processed = self.processor(
            text=texts,
            audio=[np.asarray(a, dtype=np.float32) for a in audio],
            return_tensors="pt",
            text_kwargs={"padding": True},
            # The Whisper-style encoders of Qwen2-Audio and AF3 take exactly one padded window.
            audio_kwargs={"padding": "max_length", "sampling_rate": self.sample_rate},
        )
        rows, labels = [], []
        for i in range(len(texts)):
            ids = processed["input_ids"][i][processed["attention_mask"][i].bool()].tolist()
            target = [IGNORE_INDEX] * len(ids)
            if responses is not None:
                answer = self.tokenizer(responses[i] + self.spec.end_of_turn, add_special_tokens=False)["input_ids"]
                ids, target = ids + answer, target + answer
            rows.append(ids)
            labels.append(target)

        left = responses is None
        width = max(map(len, rows))
        pad_id = self.tokenizer.pad_token_id

        def pad(seq: list[int], value: int) -> list[int]:
            fill = [value] * (width - len(seq))
            return fill + seq if left else seq + fill

        batch = {
            "input_ids": torch.tensor([pad(r, pad_id) for r in rows]),
            "attention_mask": torch.tensor([pad([1] * len(r), 0) for r in rows]),
        }
        if responses is not None:
            batch["labels"] = torch.tensor([pad(t, IGNORE_INDEX) for t in labels])
        for key in self.spec.audio_keys:
            batch[key] = self._as_model_dtype(processed[key])
        return batch

    def _as_model_dtype(self, value: torch.Tensor) -> torch.Tensor:
        """Audio features in the weights' dtype. The processors give float32; Qwen2-Audio's and Omni's encoders cast
        their input, Audio Flamingo 3's does not, so bf16 weights without autocast (a CPU) failed on it."""
        return value.to(self.model.dtype) if value.is_floating_point() else value

    def decode(self, token_ids: torch.Tensor) -> list[str]:
        return self.tokenizer.batch_decode(token_ids, skip_special_tokens=True)


def heard_seconds(processor: ProcessorMixin) -> float:
    """The longest audio a backbone's processor passes on of one clip, in seconds: Audio Flamingo 3 splits up to
    `max_audio_len` into windows; the Whisper-style feature extractors pad or truncate to `n_samples`. Anything
    longer is cut."""
    extractor = processor.feature_extractor
    longest = getattr(processor, "max_audio_len", None)
    return float(longest if longest is not None else extractor.n_samples / extractor.sampling_rate)


def find_llm(model: PreTrainedModel) -> nn.Module:
    """The decoder stack owning the input embedding (its path differs across transformers versions)."""
    embedding = model.get_input_embeddings()
    for module in model.modules():
        if getattr(module, "embed_tokens", None) is embedding and hasattr(module, "layers"):
            return module
    raise RuntimeError(f"{type(model).__name__}: no decoder module owns the input embedding")
