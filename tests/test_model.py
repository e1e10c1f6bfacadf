"""The CoAT model on tiny instances of each of the three backbones (issue: the model, tests 1-5)."""

import pytest
import torch

from coat.backbones import build_backbone
from coat.config import ConfigError
from coat.experts.base import ExpertSpec
from coat.model import CoATModel
from coat.model.coat_model import default_distance
from coat.model.heads import make_head
from coat.model.losses import distance, predicting, response_ce
from coat.model.slots import entry_std
from coat.model.targets import align_to_slots
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
        expected = plain.model(**inputs).logits[predicting(batch["labels"])]
        got = model(batch).logits
    assert got.shape == expected.shape and (batch["labels"] != -100).sum() == got.shape[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_train_seed_draws_every_trained_part_and_backbone_seed_only_the_frozen_base():
    def state(*overrides):
        model = coat_model("qwen2-audio", "lora.modules_to_save=[lm_head]", *overrides)
        trained = {n: p.detach().clone() for n, p in model.trained_state().items()}
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n not in trained}
        return trained, frozen

    trained, frozen = state("train.seed=0")
    again, frozen_again = state("train.seed=0")
    other, frozen_other = state("train.seed=1")
    assert all(torch.equal(trained[n], again[n]) for n in trained), "one seed, one initialisation, bit for bit"
    # Drawn at random: all but constant starts (LoRA B, biases, norms) and lm_head, copied from the frozen base.
    drawn = [n for n, p in trained.items() if p.float().std() > 0 and "lm_head" not in n]
    assert any("lora_A" in n for n in drawn) and any(n.startswith("heads.") for n in drawn)
    assert any(n.endswith("table") for n in drawn)
    assert all(not torch.equal(trained[n], other[n]) for n in drawn), "another seed draws every trained part anew"
    assert all(torch.equal(frozen[n], frozen_other[n]) for n in frozen), "the frozen base is the same"
    _, frozen_base = state("train.seed=0", "backbone.seed=5")
    assert any(not torch.equal(frozen[n], frozen_base[n]) for n in frozen)


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
    picked = logits[predicting(labels)]
    assert picked.shape == (6, 50), "only the positions that predict a response token"
    assert response_ce(picked, labels).dtype == torch.float32
    torch.testing.assert_close(response_ce(picked, labels), full)


@pytest.mark.parametrize("kind,position", [("transformer", "sinusoidal"), ("transformer", "learned"),
                                           ("linear", "sinusoidal")])
def test_heads_know_which_slot_they_read(kind, position):
    """Permuting the slot states must not just permute a head's outputs: slot i describes span i."""
    spec = ExpertSpec("pitch", 2, 100.0)
    cfg = tiny_config("qwen2-audio", f"heads.kind={kind}", f"heads.position={position}").heads
    torch.manual_seed(0)
    head = make_head(cfg, 16, spec, max_slots=8)
    states, permutation = torch.randn(3, 4, 16), torch.tensor([2, 0, 3, 1])
    out, out_of_permuted = head(states), head(states[:, permutation])
    assert not torch.allclose(out_of_permuted, out[:, permutation], atol=1e-4)
    target = torch.randn(3, 4, 2)
    loss = distance("smooth_l1", out, target).item()
    assert distance("smooth_l1", out_of_permuted, target).item() != pytest.approx(loss)
    blind = make_head(tiny_config("qwen2-audio", "heads.position=none").heads, 16, spec, max_slots=8)
    torch.testing.assert_close(blind(states[:, permutation]), blind(states)[:, permutation])  # what we had


def test_permuting_slot_states_changes_the_model_loss(clips):
    model = coat_model("qwen2-audio").eval()
    batch = training_batch(model, clips)
    with torch.no_grad():
        states = model(batch).slot_states
        reversed_states = states.flip(1)
        for name, head in model.heads.items():
            assert not torch.allclose(head(reversed_states), head(states).flip(1), atol=1e-4), name


def test_slot_i_regresses_the_ith_span_of_the_clip_by_time():
    # 1 s clip at 100 fps centred frames (101 frames): slot i of 4 covers [i/4, (i+1)/4) s
    frames = torch.arange(101, dtype=torch.float32)[None, :, None]
    pooled = align_to_slots(frames, torch.tensor([101]), 4, 100.0, torch.tensor([1.0]))
    assert pooled[0, :, 0].tolist() == [12.0, 37.0, 62.0, 87.5]  # frames 0-24, 25-49, 50-74, 75-100 (at 1.0 s)
    # a 25 fps expert whose frames span [t, t+1)/25 over the same second: centres (t + 0.5)/25
    coarse = align_to_slots(torch.arange(25.0)[None, :, None], torch.tensor([25]), 4, 25.0, torch.tensor([1.0]),
                            frame_offset=0.5)
    assert coarse[0, :, 0].tolist() == [2.5, 8.5, 15.0, 21.5]  # frames 0-5 | 6-11 | 12-18 | 19-24
    # more slots than frames: each empty span takes the frame nearest its centre
    few = align_to_slots(torch.tensor([[[0.0], [1.0], [2.0]]]), torch.tensor([3]), 6, 3.0, torch.tensor([1.0]))
    assert few[0, :, 0].tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 2.0]  # frames at 0, 1/3, 2/3 s; spans of 1/6 s
    # padding and the clip's own duration: a 0.5 s clip's slots cover its half second only
    padded = torch.cat([frames[:, :51], torch.full((1, 50, 1), 1e6)], 1)
    half = align_to_slots(padded, torch.tensor([51]), 2, 100.0, torch.tensor([0.5]))
    assert half[0, :, 0].tolist() == [12.0, 37.5]
    with pytest.raises(ValueError, match="at least one target frame"):
        align_to_slots(frames, torch.tensor([0]), 4, 100.0)


def test_trainable_parameters_do_not_depend_on_k():
    counts = [coat_model("qwen2-audio", f"thinking.num_slots={k}").parameter_counts() for k in (1, 4, 8)]
    assert counts[0] == counts[1] == counts[2] and counts[0]["heads"] > 0 and counts[0]["lora"] > 0
    learned = [coat_model("qwen2-audio", f"thinking.num_slots={k}", "heads.position=learned").parameter_counts()
               for k in (1, 8)]
    assert learned[0] == learned[1] and learned[0]["heads"] > counts[0]["heads"]
    baseline = coat_model("qwen2-audio", "thinking.num_slots=0").parameter_counts()
    assert baseline["heads"] == 0 and baseline["lora"] == counts[0]["lora"], "K=0: the same LoRA, nothing to supervise"


def test_the_slot_tables_scale_is_the_embeddings_std_read_in_blocks():
    weight = (torch.randn(3001, 48, generator=torch.Generator().manual_seed(0)) * 0.02 + 0.003).bfloat16()
    assert entry_std(weight, rows=256) == pytest.approx(weight.float().std().item(), rel=1e-6)
