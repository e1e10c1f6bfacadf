"""Backbone adapters: prompts in each chat format, labels, and loading checkpoints from local paths only."""

import pytest
import torch

from coat.backbones import build_backbone
from coat.backbones.base import IGNORE_INDEX
from tests.conftest import BACKBONE_NAMES, tiny_config

AUDIO_MARKER = {"qwen2-audio": "<|AUDIO|>", "qwen2.5-omni": "<|AUDIO|>", "audio-flamingo-3": "<sound>"}


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_prompt_block_and_labels(backbone, clips):
    bb = build_backbone(tiny_config(backbone))
    batch = bb.encode(clips, ["which tone is higher?", "say it"], ["the second", "hello there"], num_slots=3)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    for row in range(2):
        valid = ids[row][mask[row].bool()]
        text = bb.tokenizer.decode(valid)
        # Audio placeholders expanded to the encoder's output length: 25 tokens/s of audio.
        n_audio = (valid == bb.tokenizer.convert_tokens_to_ids(AUDIO_MARKER[backbone])).sum().item()
        frames = int(len(clips[row]) / 160)
        assert n_audio == (((frames - 1) // 2 + 1) - 2) // 2 + 1
        assert "<|coat_bot|><|coat_slot_0|><|coat_slot_1|><|coat_slot_2|><|coat_eot|>" in text
        assert text.index("<|coat_eot|>") > text.index("<|im_start|>assistant")  # after_prompt
        # Loss only on the response and its end-of-turn token.
        answer = bb.tokenizer.decode(labels[row][labels[row] != IGNORE_INDEX])
        assert answer == ["the second", "hello there"][row] + "<|im_end|>"
    assert (labels[mask == 0] == IGNORE_INDEX).all()
    assert mask[:, 0].all(), "training batches are right-padded"


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_after_audio_placement_and_generation_padding(backbone, clips):
    bb = build_backbone(tiny_config(backbone))
    batch = bb.encode(clips, ["which tone is higher?", "say it"], num_slots=2, placement="after_audio")
    assert "labels" not in batch and batch["attention_mask"][:, -1].all(), "prompts are left-padded"
    text = bb.tokenizer.decode(batch["input_ids"][0])
    marker = AUDIO_MARKER[backbone]
    assert text.rindex(marker) < text.index("<|coat_bot|>") < text.index("which tone")


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_checkpoint_loads_from_a_local_directory(backbone, clips, tmp_path):
    tiny = build_backbone(tiny_config(backbone))
    tiny.model.save_pretrained(tmp_path)
    tiny.processor.save_pretrained(tmp_path)
    loaded = build_backbone(tiny_config(backbone, "backbone.size=real", f"backbone.checkpoint={tmp_path}"))
    assert type(loaded.model) is type(tiny.model)
    batch = loaded.encode(clips, ["what is it?", "again"], ["a chirp", "two tones"], num_slots=2)
    assert torch.equal(batch["input_ids"], tiny.encode(clips, ["what is it?", "again"], ["a chirp", "two tones"],
                                                       num_slots=2)["input_ids"])
    # Slot ids only mean something behind the CoAT wrapper: compare the bare backbones on the K = 0 prompt.
    plain = loaded.encode(clips, ["what is it?", "again"], ["a chirp", "two tones"], num_slots=0)
    inputs = {k: plain[k] for k in ("input_ids", "attention_mask", *tiny.spec.audio_keys)}
    with torch.no_grad():
        assert torch.equal(loaded.model(**inputs).logits, tiny.model(**inputs).logits)


def test_missing_checkpoint_names_the_path():
    with pytest.raises(FileNotFoundError, match=r"/no/such/qwen2-audio.*backbone.checkpoint=DIR"):
        build_backbone(tiny_config("qwen2-audio", "backbone.size=real", "backbone.checkpoint=/no/such/qwen2-audio"))
    with pytest.raises(FileNotFoundError, match="nobody/not-cached-model"):
        build_backbone(tiny_config("qwen2-audio", "backbone.size=real", "backbone.checkpoint=nobody/not-cached-model"))
