"""Experts on real audio: tones, noise, silence and espeak-ng speech written to WAV files and decoded back."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF
import transformers
import typer
from typer.testing import CliRunner

from coat.cli import experts_app
from coat.data.speech import speak
from coat.experts.features import PROSODY_FIELDS
from coat.experts.phonetic import PHONES
from coat.experts.registry import UnknownExpertError, available_experts, build_expert, expert_spec, expert_version

SR = 16_000
SENTENCE_1 = "The quick brown fox jumps over the lazy dog."
SENTENCE_2 = "She sells sea shells by the sea shore every morning."
FAST = [name for name in available_experts() if name != "pitch-full"]  # full CREPE: ~5 s per audio second


def decode(path) -> tuple[torch.Tensor, int]:
    """soundfile decode: [N] for mono files, [channels, N] otherwise."""
    data, rate = sf.read(path, dtype="float32", always_2d=True)
    wave = torch.from_numpy(data.T.copy())
    return (wave[0] if wave.shape[0] == 1 else wave), rate


@pytest.fixture(scope="module")
def audio(tmp_path_factory) -> dict[str, torch.Tensor]:
    """Clips written to WAV (16-bit PCM) at their natural rates, decoded and resampled to 16 kHz mono."""
    root = tmp_path_factory.mktemp("audio")
    t = np.arange(int(1.5 * SR)) / SR
    sources = {
        "tone": (0.5 * np.sin(2 * np.pi * 220 * t), SR),
        "tone_quiet": (0.05 * np.sin(2 * np.pi * 220 * t), SR),
        "noise": (np.random.default_rng(0).normal(0, 0.1, len(t)), SR),
        "silence": (np.zeros(len(t)), SR),
        "speech_a1": speak(SENTENCE_1, voice="en", pitch=40),
        "speech_a2": speak(SENTENCE_2, voice="en", pitch=40),
        "speech_b1": speak(SENTENCE_1, voice="en+f3", pitch=80),
        "speech_fast": speak(SENTENCE_1, voice="en", pitch=40, rate=320),
    }
    clips = {}
    for name, (wave, rate) in sources.items():
        sf.write(root / f"{name}.wav", np.asarray(wave, dtype=np.float32), rate, subtype="PCM_16")
        decoded, rate = decode(root / f"{name}.wav")
        clips[name] = AF.resample(decoded, rate, SR) if rate != SR else decoded
    return clips


@pytest.fixture(scope="module")
def experts():
    """Each offline expert built once, on first use."""
    built = {}

    def get(name: str):
        if name not in built:
            built[name] = build_expert(name)
        return built[name]

    return get


def test_specs_come_without_loading_any_model():
    code = ("import sys; from coat.experts.registry import available_experts, expert_spec; "
            "specs = [expert_spec(n) for n in available_experts()]; "
            "print(sorted({'torchcrepe', 'pocketsphinx', 'resemblyzer'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert expert_spec("phonetic").dim == len(PHONES) and expert_spec("phonetic").kind == "discrete"
    assert expert_spec("mel", n_mels=64).dim == 64
    assert expert_spec("speaker").clip_level and expert_spec("vad").frame_rate == 31.25


@pytest.mark.parametrize("name", FAST)
def test_built_expert_matches_its_spec(name, experts, audio):
    expert = experts(name)
    assert expert.spec == expert_spec(name) and expert.sample_rate == SR
    features, counts = expert([audio["speech_a1"], audio["tone"][:4000]])
    for f, n in zip(features, counts, strict=True):
        assert f.dtype == torch.float32 and torch.isfinite(f).all()
        assert f.shape == ((expert.spec.dim,) if expert.spec.clip_level else (n, expert.spec.dim))


def test_unknown_names_and_settings_fail_clearly():
    with pytest.raises(UnknownExpertError, match="pitch, pitch-full, phonetic.*hub:") as err:
        build_expert("pitchh")
    assert isinstance(err.value, KeyError)
    with pytest.raises(ValueError, match="nmels.*n_mels"):
        expert_spec("mel", nmels=64)
    with pytest.raises(ValueError, match="model='huge'"):
        build_expert("pitch", model="huge")


def test_pitch_recovers_a_220_hz_tone(experts, audio):
    (tone, silence), counts = experts("pitch")([audio["tone"], audio["silence"]])
    assert counts == [1 + len(audio["tone"]) // 160, 1 + len(audio["silence"]) // 160]
    voiced = tone[:, 1] >= 0.21
    assert voiced.float().mean() > 0.9
    assert torch.exp(tone[voiced, 0]).median().item() == pytest.approx(220, rel=0.02)
    assert (silence[:, 1] < 0.21).all()  # nothing voiced: log-f0 is the documented floor, log(fmin)
    assert torch.allclose(silence[:, 0], torch.full_like(silence[:, 0], math.log(50.0)))


def test_pitch_tracks_the_higher_voice(experts, audio):
    low, high = experts("pitch")([audio["speech_a1"], audio["speech_b1"]])[0]
    median_hz = [torch.exp(f[f[:, 1] >= 0.21, 0]).median().item() for f in (low, high)]
    assert median_hz[1] > 1.3 * median_hz[0]


@pytest.mark.slow
def test_pitch_full_recovers_a_220_hz_tone(experts, audio):
    (tone,), _ = experts("pitch-full")([audio["tone"][:8000]])
    assert torch.exp(tone[tone[:, 1] >= 0.21, 0]).median().item() == pytest.approx(220, rel=0.02)


def test_vad_hears_speech_not_silence_or_noise(experts, audio):
    (speech, silence, noise), counts = experts("vad")([audio["speech_a1"], audio["silence"], audio["noise"]])
    assert counts[1] == math.ceil(len(audio["silence"]) / 512)
    assert speech.mean() > 0.5
    assert speech.mean() > silence.mean() + 0.4 and speech.mean() > noise.mean() + 0.4


def test_mel_frames_and_level(experts, audio):
    (loud, quiet, speech), counts = experts("mel")([audio["tone"], audio["tone_quiet"], audio["speech_a1"]])
    duration = len(audio["speech_a1"]) / SR
    assert abs(counts[2] - duration * 100) <= 1 and speech.shape == (counts[2], 80)
    # 20 dB quieter = power / 100 = log-mel minus ln(100) in the tone's band
    band = loud.mean(0).argmax()
    assert (loud[:, band] - quiet[:, band]).median().item() == pytest.approx(math.log(100), abs=0.05)


def test_frame_level_experts_share_the_100_fps_grid(experts, audio):
    clip = audio["speech_a2"]
    counts = [experts(name)([clip])[1][0] for name in ("pitch", "mel", "phonetic", "egemaps")]
    assert counts == [1 + len(clip) // 160] * 4


def test_egemaps_descriptors_follow_pitch_and_loudness(experts, audio):
    expert = experts("egemaps")
    assert expert.role == "affect" and expert.fields[0] == "Loudness_sma3" and len(expert.fields) == 25
    (loud, quiet, silence), _ = expert([audio["tone"], audio["tone_quiet"], audio["silence"]])
    f0 = expert.fields.index("F0semitoneFrom27.5Hz_sma3nz")
    middle = slice(20, -20)  # away from the window edges
    assert loud[middle, f0].median().item() == pytest.approx(12 * math.log2(220 / 27.5), abs=0.5)
    assert (loud[middle, 0] > quiet[middle, 0]).all() and silence[:, f0].abs().max() == 0
    # the grid frame at t s holds openSMILE's frame centred nearest t: a tone starting at 0.5 s is loud from there
    onset = torch.cat([torch.zeros(SR // 2), audio["tone"][:SR // 2]])
    (frames,), _ = expert([onset])
    assert frames[40, 0] < 0.1 * frames[60, 0] and frames[:45, 0].max() < frames[55:, 0].min()


def test_sound_events_without_a_tagger_are_a_tiny_random_ast_that_says_so(experts, audio):
    expert = experts("sound-events")
    assert (expert.role, expert.spec.dim, expert.spec.kind, expert.spec.frame_rate) == (
        "sound-events", 527, "multilabel", None)
    assert "tiny random AST" in expert.source and "experts.settings.sound-events.path" in expert.source
    scores = torch.stack(expert([audio["speech_a1"], audio["noise"]])[0])
    assert ((scores > 0) & (scores < 1)).all() and not torch.allclose(scores.sum(1), torch.ones(2))
    assert build_expert("sound-events").version == expert.version, "the same seeded tagger everywhere"


def test_speaker_embeddings_group_by_voice(experts, audio):
    a1, a2, b1 = experts("speaker")([audio["speech_a1"], audio["speech_a2"], audio["speech_b1"]])[0]
    for e in (a1, a2, b1):
        assert e.shape == (256,) and torch.linalg.norm(e).item() == pytest.approx(1.0, abs=1e-5)
    assert (a1 @ a2).item() > (a1 @ b1).item() + 0.1 and (a1 @ a2).item() > (a2 @ b1).item() + 0.1
    again, _ = experts("speaker")([audio["speech_a1"]])
    assert torch.allclose(again[0], a1, atol=1e-5)


def test_phonetic_rows_are_one_hot_phones(experts, audio):
    expert = experts("phonetic")
    (speech, silence), counts = expert([audio["speech_a1"], audio["silence"]])
    for rows, n in zip((speech, silence), counts, strict=True):
        assert rows.shape == (n, len(PHONES)) and torch.equal(rows.sum(1), torch.ones(n))
        assert set(rows.unique().tolist()) == {0.0, 1.0}
    assert abs(counts[1] - 150) <= 1
    assert silence[:, PHONES.index("SIL")].mean() > 0.9
    labels = speech.argmax(1)
    assert (labels != 0).float().mean() > 0.4 and len(set(labels.tolist()) - {0}) >= 5
    # decoding state is reset per clip: the same clip gives the same phones after other clips
    (again,), _ = expert([audio["speech_a1"]])
    assert torch.equal(again, speech)


def test_prosody_orders_pitch_loudness_and_rate(experts, audio):
    names = ["tone", "tone_quiet", "noise", "silence", "speech_a1", "speech_b1", "speech_fast"]
    stats = dict(zip(names, experts("prosody")([audio[n] for n in names])[0], strict=True))
    field = {f: i for i, f in enumerate(PROSODY_FIELDS)}
    tone, quiet = stats["tone"], stats["tone_quiet"]
    assert math.exp(tone[field["log_f0_mean"]]) == pytest.approx(220, rel=0.02)
    assert tone[field["voiced_fraction"]] > 0.9 and stats["noise"][field["voiced_fraction"]] < 0.1
    assert tone[field["energy_db_mean"]] - quiet[field["energy_db_mean"]] == pytest.approx(20, abs=0.5)
    assert torch.equal(stats["silence"][:4], torch.zeros(4))  # no voiced frame: log-f0 stats are 0
    assert stats["silence"][field["energy_db_mean"]] == pytest.approx(-100)
    assert stats["speech_b1"][field["log_f0_mean"]] > stats["speech_a1"][field["log_f0_mean"]] + 0.2
    assert tone[field["energy_peak_rate"]] == 0 and stats["speech_a1"][field["energy_peak_rate"]] > 1
    assert stats["speech_fast"][field["energy_peak_rate"]] > stats["speech_a1"][field["energy_peak_rate"]]


@pytest.mark.parametrize("name", FAST)
def test_batching_does_not_change_features(name, experts, audio):
    expert = experts(name)
    batched, _ = expert([audio["speech_a2"], audio["speech_fast"], audio["noise"]])
    alone, _ = expert([audio["speech_fast"]])
    assert torch.allclose(alone[0], batched[1], atol=1e-4)


@pytest.mark.parametrize("name", FAST)
def test_short_clips_and_silence_give_defined_features(name, experts, audio):
    expert = experts(name)
    clips = [audio["speech_a1"][:80], torch.zeros(SR // 2), torch.zeros(1)]
    features, counts = expert(clips)
    for f, n in zip(features, counts, strict=True):
        assert n >= 1 and torch.isfinite(f).all()
        assert f.shape[0] == (expert.spec.dim if expert.spec.clip_level else n)


@pytest.mark.parametrize("name", FAST)
def test_bad_input_is_refused_clearly(name, experts, audio, tmp_path):
    expert = experts(name)
    sf.write(tmp_path / "stereo.wav", np.stack([audio["tone"].numpy()] * 2, 1), SR)
    stereo, rate = decode(tmp_path / "stereo.wav")
    with pytest.raises(ValueError, match=r"clip 0 has shape \(2, 24000\).*mono"):
        expert([stereo], sample_rate=rate)
    with pytest.raises(ValueError, match="needs 16000 Hz audio, got 44100 Hz"):
        expert([audio["tone"]], sample_rate=44100)
    with pytest.raises(ValueError, match="clip 1 is empty"):
        expert([audio["tone"], torch.zeros(0)])
    with pytest.raises(ValueError, match="NaN"):
        expert([torch.full((1000,), float("nan"))])
    with pytest.raises(TypeError, match="int16"):
        expert([torch.zeros(100, dtype=torch.int16)])


def test_versions_hash_weights_and_settings(experts):
    versions = {name: experts(name).version for name in FAST}
    assert len(set(versions.values())) == len(versions)
    assert build_expert("mel").version == versions["mel"]
    assert build_expert("mel", n_mels=64).version != versions["mel"]
    assert build_expert("pitch", threshold=0.5).version != versions["pitch"]
    assert build_expert("prosody", fmax=400.0).version != versions["prosody"]
    assert expert_version("pitch", threshold=0.5) == build_expert("pitch", threshold=0.5).version
    assert expert_version("mel") == versions["mel"] and expert_version("mel", n_mels=64) != versions["mel"]


# ---- hub experts: tiny random-weight instances of the real classes, saved and loaded from disk ----


@pytest.fixture(scope="module")
def hub_models(tmp_path_factory) -> dict[str, str]:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hub")
    whisper = transformers.WhisperModel(transformers.WhisperConfig(
        d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=80, max_source_positions=50,
        max_target_positions=16, vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1))
    ast = transformers.ASTForAudioClassification(transformers.ASTConfig(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, max_length=100,
        num_mel_bins=16, num_labels=5, problem_type="multi_label_classification"))
    emotion = transformers.Wav2Vec2ForSequenceClassification(transformers.Wav2Vec2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8),
        conv_stride=(5, 4), conv_kernel=(10, 8), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
        num_labels=4, classifier_proj_size=8, feat_extract_norm="layer", do_stable_layer_norm=True))
    saved = {
        "whisper": (whisper, transformers.WhisperFeatureExtractor(feature_size=80, chunk_length=1)),
        "ast": (ast, transformers.ASTFeatureExtractor(num_mel_bins=16, max_length=100)),
        "emotion": (emotion, transformers.Wav2Vec2FeatureExtractor(return_attention_mask=True)),
    }
    paths = {}
    for name, (model, extractor) in saved.items():
        model.save_pretrained(root / name)
        extractor.save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


def test_whisper_encoder_frames(hub_models, audio):
    name = "hub:" + hub_models["whisper"]
    expert = build_expert(name)
    assert expert.spec == expert_spec(name) and expert.spec.frame_rate == 50 and expert.spec.dim == 16
    clips = [audio["speech_a1"], audio["tone"][:5000]]
    features, counts = expert(clips)
    # 1 s encoder windows (max_source_positions=50): a long clip spans several, frames concatenated
    assert counts == [math.ceil(len(c) / 320) for c in clips]
    assert [f.shape for f in features] == [(n, 16) for n in counts]
    again = build_expert(name)
    assert again.version == expert.version
    assert all(torch.equal(a, b) for a, b in zip(again(clips)[0], features, strict=True))
    assert build_expert(name, layer=0).version != expert.version


def test_audio_classifier_posteriors(hub_models, audio):
    clips = [audio["speech_a1"], audio["noise"], audio["tone"][:100]]
    emotion = build_expert("hub", path=hub_models["emotion"], name="emotion", role="affect")
    assert emotion.spec == expert_spec("hub", path=hub_models["emotion"], name="emotion")
    assert (emotion.name, emotion.role, emotion.spec.kind, emotion.spec.frame_rate) == (
        "emotion", "affect", "discrete", None)
    probs, counts = emotion(clips)
    assert counts == [1, 1, 1] and all(p.shape == (4,) for p in probs)
    assert torch.allclose(torch.stack(probs).sum(1), torch.ones(3))
    assert torch.allclose(emotion([clips[1]])[0][0], probs[1], atol=1e-5)
    events = build_expert("hub:" + hub_models["ast"])  # AudioSet-style multi-label: independent sigmoids
    assert events.spec.kind == "multilabel" and events.spec.dim == 5
    scores, _ = events(clips)
    assert all(((s > 0) & (s < 1)).all() for s in scores)
    assert not torch.allclose(torch.stack(scores).sum(1), torch.ones(3))
    assert torch.equal(events(clips)[0][0], scores[0])


def test_wav2vec2_hidden_state_frames(hub_models, audio):
    expert = build_expert("hub:" + hub_models["emotion"], output="frames")
    assert expert.spec.frame_rate == SR / 20 and expert.spec.dim == 16
    clips = [audio["speech_a1"], audio["tone"][:3000]]
    features, counts = expert(clips)
    assert counts == [((len(c) - 10) // 5 + 1 - 8) // 4 + 1 for c in clips]
    assert [f.shape for f in features] == [(n, 16) for n in counts]
    assert torch.allclose(expert([clips[1]])[0][0], features[1], atol=1e-4)


def test_hub_errors_name_the_problem(hub_models, tmp_path):
    missing = tmp_path / "no-model"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        build_expert(f"hub:{missing}")
    with pytest.raises(FileNotFoundError, match=str(missing)):
        expert_spec(f"hub:{missing}")
    with pytest.raises(ValueError, match="no frame-level hidden states"):
        expert_spec("hub:" + hub_models["ast"], output="frames")
    with pytest.raises(ValueError, match="no classifier"):
        expert_spec("hub:" + hub_models["whisper"], output="posteriors")
    with pytest.raises(ValueError, match="path"):
        build_expert("hub")
    with pytest.raises(ValueError, match="layer=5 is out of range for 1 layers"):
        build_expert("hub:" + hub_models["whisper"], layer=5)


def test_the_expert_list_shows_every_expert_with_its_role_and_version(hub_models, experts):
    root = typer.Typer()
    root.add_typer(experts_app, name="experts")
    result = CliRunner().invoke(root, ["experts", "list", "--hub", hub_models["ast"]], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    for name in FAST:
        line = next(row for row in result.output.splitlines() if f" {name} " in row)
        assert experts(name).version in line and f" {experts(name).spec.dim} " in line
    hub_line = next(row for row in result.output.splitlines() if hub_models["ast"] in row)
    assert "clip" in hub_line and "multilabel" in hub_line
    roles = {name: next(row for row in result.output.splitlines() if f" {name} " in row)
             for name in ("pitch", "phonetic", "egemaps", "sound-events", "mel", "speaker")}
    for name, role in [("pitch", "pitch*"), ("phonetic", "phonetic*"), ("egemaps", "affect*"),
                       ("sound-events", "sound-events*"), ("mel", "reconstruction*"), ("speaker", "speaker")]:
        assert f" {role} " in roles[name], (name, roles[name])
    assert "opensmile" in roles["egemaps"] and "tiny random AST" in roles["sound-events"]


def test_sound_events_read_a_local_or_cached_tagger_as_multi_label(hub_models, audio, tmp_path, monkeypatch):
    import huggingface_hub

    single = transformers.ASTForAudioClassification(transformers.ASTConfig(  # no problem_type: still sigmoids
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, max_length=100,
        num_mel_bins=16, num_labels=7))
    snapshot = tmp_path / "hub" / "models--acme--tagger" / "snapshots" / "0123abcd"
    single.save_pretrained(snapshot)
    transformers.ASTFeatureExtractor(num_mel_bins=16, max_length=100).save_pretrained(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    cached = build_expert("sound-events", path="acme/tagger")
    assert cached.spec == expert_spec("sound-events", path="acme/tagger")
    assert (cached.spec.dim, cached.spec.kind) == (7, "multilabel") and "acme/tagger" in cached.source
    scores = torch.stack(cached([audio["noise"], audio["tone"]])[0])
    assert not torch.allclose(scores.sum(1), torch.ones(2)) and ((scores > 0) & (scores < 1)).all()
    assert build_expert("sound-events", path=hub_models["ast"]).version != cached.version
    with pytest.raises(FileNotFoundError, match="acme/missing.*never download"):
        build_expert("sound-events", path="acme/missing")
    with pytest.raises(ValueError, match="no classifier"):
        build_expert("sound-events", path=hub_models["whisper"])


@pytest.mark.parametrize("backbone", ["qwen2-audio", "qwen2.5-omni", "audio-flamingo-3"])
def test_audio_encoder_targets_are_the_audio_embeddings_the_llm_receives(backbone, audio):
    from coat.backbones import build_backbone
    from coat.config import load_config

    cfg = load_config(overrides=[f"backbone.name={backbone}", "backbone.audio_window_s=2", "backbone.seed=5",
                                 "experts.names=[audio-encoder]"])
    settings = cfg.expert_settings["audio-encoder"]
    assert settings == {"backbone": backbone, "size": "tiny", "seed": 5, "audio_window_s": 2.0}
    expert = build_expert("audio-encoder", **settings)
    assert expert.spec == expert_spec("audio-encoder", **settings) and expert.spec.frame_rate == 25
    clips = [audio["speech_a1"][:SR], audio["tone"][: SR // 2]]
    features, counts = expert(clips)
    assert counts == [25, 12]
    plain = build_backbone(cfg)  # the same seeded weights, run as the model runs: layer 0 is what the LLM gets
    batch = plain.encode([c.numpy() for c in clips], ["", ""], num_slots=0, placement="after_prompt")
    with torch.no_grad():
        embeds = plain.model(**batch, output_hidden_states=True).hidden_states[0]
    is_audio = batch["input_ids"] == expert.audio_token_id
    for got, row, mask in zip(features, embeds, is_audio, strict=True):
        torch.testing.assert_close(got, row[mask], atol=1e-5, rtol=1e-5)
    assert build_expert("audio-encoder", **{**settings, "seed": 6}).version != expert.version
