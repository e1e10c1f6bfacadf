"""Backbone adapters: prompts in each chat format, labels, loading checkpoints from local paths only, and the
real-width size (real configs' widths, two layers per tower) training, round-tripping and generating (slow tier)."""

import gc
import math
from dataclasses import dataclass

import pytest
import torch

from coat.backbones import BACKBONES, build_backbone
from coat.backbones.base import IGNORE_INDEX
from coat.backbones.tokenizer import tiny_corpus, train_tiny_tokenizer
from coat.model import CoATModel
from tests.conftest import BACKBONE_NAMES, SYNTHETIC_EXPERTS, synthetic_targets, tiny_config

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


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_bf16_weights_take_the_encoded_audio_without_autocast(backbone, clips):
    # Found at real width: Audio Flamingo 3's encoder does not cast the processor's float32 features itself.
    bb = build_backbone(tiny_config(backbone, "backbone.dtype=bfloat16"))
    batch = bb.encode(clips, ["what is it?", "again"], ["a chirp", "two tones"], num_slots=0)
    assert batch["input_features"].dtype == torch.bfloat16
    with torch.no_grad():
        logits = bb.model(**{k: batch[k] for k in ("input_ids", "attention_mask", *bb.spec.audio_keys)}).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_missing_checkpoint_names_the_path():
    with pytest.raises(FileNotFoundError, match=r"/no/such/qwen2-audio.*backbone.checkpoint=DIR"):
        build_backbone(tiny_config("qwen2-audio", "backbone.size=real", "backbone.checkpoint=/no/such/qwen2-audio"))
    with pytest.raises(FileNotFoundError, match="nobody/not-cached-model"):
        build_backbone(tiny_config("qwen2-audio", "backbone.size=real", "backbone.checkpoint=nobody/not-cached-model"))


# Real width: the real configs' widths with two layers per tower (`backbone.size=real-width`).

NOT_WIDTHS = {"num_hidden_layers", "encoder_layers", "depth", "layer_types", "fullatt_block_indexes",
              "max_source_positions", "pad_token_id", "eos_token_id", "bos_token_id"}
TOWER_DEPTHS = {"text_config": "num_hidden_layers", "audio_config": "encoder_layers", "vision_config": "depth"}
# The checkpoints' own config.json widths (hidden, heads, intermediate; vocabulary), which the config classes'
# defaults do not always give: Qwen2.5-Omni's vision tower defaults to 3584 wide, its checkpoint's is 1280.
CHECKPOINT_WIDTHS = {
    "qwen2-audio": {"text_config": (4096, 32, 11008, 156032), "audio_config": (1280, 20, 5120, None)},
    "qwen2.5-omni": {"text_config": (3584, 28, 18944, 152064), "audio_config": (1280, 20, 5120, None),
                     "vision_config": (1280, 16, 3420, None)},
    "audio-flamingo-3": {"text_config": (3584, 28, 18944, 151672), "audio_config": (1280, 20, 5120, None)},
}


def widths(config: dict) -> dict:
    """Every setting of a config dict and its sub-configs but depths, token ids and the audio window."""
    return {key: widths(value) if isinstance(value, dict) and "model_type" in value else value
            for key, value in config.items()
            if key not in NOT_WIDTHS and not key.endswith(("_token_id", "_token_index"))}


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_real_width_configs_keep_every_real_width_with_two_layers_per_tower(backbone):
    spec = BACKBONES[backbone]
    tokenizer = train_tiny_tokenizer(tiny_corpus(), list(spec.special_tokens), spec.named_tokens)
    real, few = spec.real_config(), spec.real_width_config(tokenizer, 2.0)
    assert widths(few.to_dict()) == widths(real.to_dict())
    towers = [name for name in TOWER_DEPTHS if hasattr(few, name)]
    assert {name: getattr(getattr(few, name), TOWER_DEPTHS[name]) for name in towers} == dict.fromkeys(towers, 2)
    for tower, (hidden, heads, intermediate, vocab) in CHECKPOINT_WIDTHS[backbone].items():
        sub = getattr(real, tower)
        assert (sub.hidden_size, sub.num_attention_heads, getattr(sub, "encoder_ffn_dim", sub.intermediate_size)
                ) == (hidden, heads, intermediate), tower
        assert vocab is None or sub.vocab_size == vocab
    audio_id = getattr(few, "audio_token_id", None) or few.audio_token_index
    assert audio_id < len(tokenizer), "the tiny tokenizer's ids: prompts are encoded as at every other size"


@dataclass
class RealWidthRun:
    """A real-width CoAT model after one AdamW step on `batch`: the step's loss and logits, each trained group's
    gradient norm and whether the step moved it, and the used and unused slot rows' gradient."""

    model: CoATModel | None
    batch: dict
    losses: dict[str, float]
    logits: tuple[tuple[int, ...], torch.dtype]
    grads: dict[str, float]
    moved: dict[str, bool]
    slot_rows: tuple[float, float]


def one_real_width_step(backbone: str, clips) -> RealWidthRun:
    """Build the real-width model and train it one step. A function of its own, so that the model it returns is
    referenced by the run alone, and the round trip can free it before rebuilding."""
    model = CoATModel(tiny_config(backbone, "backbone.size=real-width", "backbone.dtype=bfloat16"), SYNTHETIC_EXPERTS)
    batch = {**model.encode(clips, ["which tone is higher?", "say it"], ["the second", "hello there"]),
             **synthetic_targets(model.num_slots)}
    before = {name: value.clone() for name, value in model.trained_state().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    out = model(batch)
    out.loss.backward()
    groups = model.parameter_groups()
    grads = {group: sum(p.grad.float().norm().item() ** 2 for _, p in members if p.grad is not None) ** 0.5
             for group, members in groups.items()}
    table, k = model.slot_table.grad, model.num_slots
    slot_rows = (table[2:2 + k].abs().sum(-1).min().item(), table[2 + k:].abs().sum().item())
    optimizer.step()
    after = model.trained_state()
    moved = {group: any(not torch.equal(before[name], after[name]) for name, _ in members)
             for group, members in groups.items()}
    return RealWidthRun(model, batch, {name: loss.item() for name, loss in out.losses.items()} | {
        "total": out.loss.item()}, (tuple(out.logits.shape), out.logits.dtype), grads, moved, slot_rows)


@pytest.fixture(scope="module", params=BACKBONE_NAMES)
def real_width(request, clips):
    """One real-width model per backbone, after one training step, for the three slow tests below (one backbone's
    model at a time: pytest finishes a module fixture's tests before building its next parameter)."""
    return one_real_width_step(request.param, clips)


# Slow tier. Per backbone on 2 shared CPU cores, bf16 weights (1.6-1.7 B parameters): the build and step take 50-110 s
# (bf16 random init is slow on a CPU), the round trip, which rebuilds the base, 50-70 s, generation 1-20 s; 2-3 min per
# backbone, 6-8 min for the three, one model in memory at a time, peak RSS 4.2-4.8 GB.
@pytest.mark.slow
def test_real_width_training_step_reaches_every_trained_part(real_width):
    run, model = real_width, real_width.model
    vocab = model.backbone.model.config.get_text_config().vocab_size
    responses = int((run.batch["labels"][:, 1:] != -100).sum())
    assert vocab > 150_000 and run.logits == ((responses, vocab), torch.bfloat16), "only the response's logits"
    assert all(math.isfinite(value) for value in run.losses.values()), run.losses
    # Random weights spread the response's probability over the whole real vocabulary.
    assert 0.5 * math.log(vocab) < run.losses["ce"] < 2 * math.log(vocab), run.losses
    assert all(norm > 0 and math.isfinite(norm) for norm in run.grads.values()), run.grads
    assert all(run.moved.values()), run.moved
    used, unused = run.slot_rows
    assert used > 0 and unused == 0, "every used slot row gets a gradient, the unused ones none"
    assert all(not p.requires_grad for n, p in model.named_parameters() if "audio_tower" in n)


@pytest.mark.slow
def test_real_width_checkpoint_round_trip_reloads_the_trained_parts(real_width, tmp_path):
    model = real_width.model.eval()
    with torch.no_grad():
        logits = model(real_width.batch).logits
    model.save(tmp_path / "ckpt")
    saved = {name: value.clone() for name, value in model.trained_state().items()}
    real_width.model = model = None
    gc.collect()
    restored = CoATModel.load(tmp_path / "ckpt").eval()
    real_width.model = restored
    loaded = restored.trained_state()
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[n], saved[n]) for n in saved)
    with torch.no_grad():
        assert torch.equal(restored(real_width.batch).logits, logits), "the seeded base rebuilds bit for bit"


@pytest.mark.slow
def test_real_width_generation_gives_ids_of_the_real_vocabulary(real_width, clips):
    model = real_width.model.eval()
    vocab = model.backbone.model.config.get_text_config().vocab_size
    prompts = model.encode(clips, ["which tone is higher?", "say it"])
    generated = model.generate(prompts, max_new_tokens=4, min_new_tokens=4)
    assert generated.shape == (2, 4) and generated.dtype == torch.long
    assert generated.min() >= 0 and generated.max() < vocab
    assert len(model.backbone.decode(generated)) == 2, "ids beyond the tiny tokenizer's decode (to nothing)"
