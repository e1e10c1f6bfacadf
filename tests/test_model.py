"""The CoAT model on tiny instances of each of the three backbones (issue: the model, tests 1-5)."""

import pytest
import torch

from coat.backbones import build_backbone
from coat.config import ConfigError
from coat.experts.base import ExpertSpec
from coat.model import CoATModel
from coat.model.coat_model import default_distance
from coat.model.losses import distance, response_ce
from tests.conftest import BACKBONE_NAMES, SYNTHETIC_EXPERTS, synthetic_targets, tiny_config

PROMPTS = ["What is the pitch of the first tone?", "Is the second tone higher?"]
RESPONSES = ["a rising chirp", "yes"]


def coat_model(backbone: str, *overrides: str) -> CoATModel:
    return CoATModel(tiny_config(backbone, *overrides), SYNTHETIC_EXPERTS)


def training_batch(model: CoATModel, clips) -> dict:
    return {**model.encode(clips, PROMPTS, RESPONSES), **synthetic_targets(model.num_slots)}


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_k0_logits_equal_the_unmodified_backbone(backbone, clips):
    cfg = tiny_config(backbone, "thinking.num_slots=0")
    plain = build_backbone(cfg)
    model = CoATModel(cfg, SYNTHETIC_EXPERTS).eval()
    batch = model.encode(clips, PROMPTS, RESPONSES)
    assert not model.backbone.thinking.is_reserved(batch["input_ids"]).any()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", *plain.spec.audio_keys)}
    with torch.no_grad():
        expected = plain.model(**inputs).logits
        got = model(batch).logits
    assert torch.equal(got, expected)


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_gradients_reach_slots_and_lora_but_not_the_audio_tower(backbone, clips):
    model = coat_model(backbone)
    batch = training_batch(model, clips)
    k = model.num_slots

    model(batch).losses["ce"].backward()
    slot_rows = model.slot_table.grad[2:2 + k]  # rows of <|coat_slot_0..K-1|>
    assert slot_rows.abs().sum(-1).gt(0).all(), "every used slot row must get a gradient from the response CE"
    assert model.slot_table.grad[2 + k:].abs().sum() == 0, "unused slot rows must get none"

    model.zero_grad(set_to_none=True)
    out = model(batch)
    sum(out.losses[name] for name in SYNTHETIC_EXPERTS).backward()
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all("audio_tower" not in n for n in lora)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)
    audio_tower = [p for n, p in model.named_parameters() if "audio_tower" in n]
    assert audio_tower and all(p.grad is None and not p.requires_grad for p in audio_tower)


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_fifty_steps_halve_every_distillation_loss(backbone, clips):
    model = coat_model(backbone)
    batch = training_batch(model, clips)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    first = None
    for _ in range(50):
        out = model(batch)
        first = first or {name: out.losses[name].item() for name in SYNTHETIC_EXPERTS}
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    with torch.no_grad():
        last = model(batch).losses
    for name in SYNTHETIC_EXPERTS:
        assert last[name].item() <= 0.5 * first[name], f"{name}: {first[name]:.3f} -> {last[name].item():.3f}"


class LLMCalls:
    def __init__(self, module: torch.nn.Module):
        self.count = 0
        module.register_forward_hook(self.hook)

    def hook(self, *_):
        self.count += 1


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_thinking_block_costs_no_decode_step(backbone, clips):
    new_tokens = 6
    counts, prompt_lengths = {}, {}
    for k in (0, 4):
        model = coat_model(backbone, f"thinking.num_slots={k}").eval()
        calls = LLMCalls(model.backbone.llm)
        batch = model.encode(clips, PROMPTS)
        generated = model.generate(batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        assert generated.shape == (2, new_tokens)
        counts[k], prompt_lengths[k] = calls.count, batch["input_ids"].shape[1]
    assert prompt_lengths[4] == prompt_lengths[0] + 4 + 2  # K slots between <|coat_bot|> and <|coat_eot|>
    assert counts[4] == counts[0] == new_tokens  # one prefill, then one call per further token


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_save_then_load_reproduces_logits(backbone, clips, tmp_path):
    model = coat_model(backbone)
    batch = training_batch(model, clips)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # move LoRA B off its zero init, so the check covers every trained part
        optimizer.zero_grad()
        model(batch).loss.backward()
        optimizer.step()
    model.eval()
    model.save(tmp_path / "ckpt")
    restored = CoATModel.load(tmp_path / "ckpt").eval()
    with torch.no_grad():
        assert torch.equal(restored(batch).logits, model(batch).logits)
    fresh = coat_model(backbone).eval()
    with torch.no_grad():
        assert not torch.equal(fresh(batch).logits, model(batch).logits)


def test_loading_into_another_backbone_or_slot_count_fails(tmp_path):
    coat_model("qwen2-audio").save(tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"backbone.name='qwen2-audio'.*'audio-flamingo-3'"):
        coat_model("audio-flamingo-3").load_trained(tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"thinking.num_slots=4.*thinking.num_slots=8"):
        coat_model("qwen2-audio", "thinking.num_slots=8").load_trained(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="thinking.num_slots"):
        CoATModel.load(tmp_path / "ckpt", tiny_config("qwen2-audio", "thinking.num_slots=2"))
    with pytest.raises(FileNotFoundError, match="not a CoAT checkpoint"):
        CoATModel.load(tmp_path)


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_padding_does_not_change_outputs(backbone, clips):
    """Clips of different lengths with prompts and answers of different lengths: each row's logits in a padded
    batch equal its logits alone, right-padded for training and left-padded for generation (M-RoPE included)."""
    model = coat_model(backbone).eval()
    prompts, responses = [PROMPTS[0], "Is it higher?"], ["a rising chirp that ends high", "yes"]
    for answers in (responses, None):
        batch = model.encode(clips, prompts, answers)
        assert (batch["attention_mask"] == 0).any(), "the batch must hold padding"
        with torch.no_grad():
            together = model.lm(**model._model_inputs(batch)).logits
            for i in range(2):
                alone = model.encode([clips[i]], [prompts[i]], None if answers is None else [answers[i]])
                single = model.lm(**model._model_inputs(alone)).logits[0]
                kept = together[i][batch["attention_mask"][i].bool()]
                torch.testing.assert_close(kept, single, atol=1e-4, rtol=1e-4)


def test_uninformed_predictions_score_about_one_under_every_distance():
    g = torch.Generator().manual_seed(0)
    standardised = torch.randn(1024, 16, 2, generator=g)
    assert distance("mse", torch.zeros_like(standardised), standardised).item() == pytest.approx(1, abs=0.05)
    assert distance("smooth_l1", torch.zeros_like(standardised), standardised).item() == pytest.approx(1, abs=0.05)
    embeddings = torch.randn(64, 8, 256, generator=g)
    assert distance("cosine", torch.randn(64, 8, 256, generator=g), embeddings).item() == pytest.approx(1, abs=0.01)
    phones = torch.nn.functional.one_hot(torch.randint(0, 40, (64, 8), generator=g), 40).float()
    assert distance("ce", torch.zeros(64, 8, 40), phones).item() == pytest.approx(1, abs=1e-6)
    tags = torch.rand(64, 527, generator=g)
    assert distance("bce", torch.zeros(64, 527), tags).item() == pytest.approx(1, abs=1e-6)
    with pytest.raises(ValueError, match="unknown distance 'l3'"):
        distance("l3", tags, tags)


def test_each_expert_kind_gets_the_loss_that_suits_it():
    assert default_distance(ExpertSpec("pitch", 2, 100.0)) == "smooth_l1"  # magnitude matters
    assert default_distance(ExpertSpec("mel", 80, 100.0)) == "cosine"
    assert default_distance(ExpertSpec("phonetic", 40, 100.0, "discrete")) == "ce"
    assert default_distance(ExpertSpec("events", 527, None, "multilabel")) == "bce"
    experts = {**SYNTHETIC_EXPERTS, "events": ExpertSpec("events", 5, None, "multilabel")}
    with pytest.raises(ConfigError, match="loss.distance.events.*ce needs a discrete expert"):
        CoATModel(tiny_config("qwen2-audio", "experts.names=[events]", "loss.distance={events: ce}"), experts)
    with pytest.raises(ConfigError, match="loss.distance.pitch.*bce needs a multi-label expert"):
        CoATModel(tiny_config("qwen2-audio", "loss.distance={pitch: bce}"), experts)


def test_response_ce_equals_the_full_cross_entropy_on_the_labelled_positions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 50, generator=g).bfloat16()
    labels = torch.full((2, 7), -100)
    labels[0, 4:], labels[1, 2:5] = torch.tensor([3, 9, 11]), torch.tensor([1, 2, 49])
    full = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                             ignore_index=-100)
    assert response_ce(logits, labels).dtype == torch.float32
    torch.testing.assert_close(response_ce(logits, labels), full)
