"""coat-mini generator: determinism, schema, decodable audio, and labels that the audio itself bears out."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from coat.backbones.tokenizer import tiny_corpus
from coat.data.speech import speak
from coat.data.synth import PITCH_CLASSES, SENTENCES, TASKS, split_sentences, synthesize, text_corpus

SIZE = 40


def _rows(manifest: Path) -> list[dict]:
    return [json.loads(line) for line in manifest.read_text().splitlines()]


def _digest(manifest: Path) -> dict[str, str]:
    files = [manifest, *(manifest.parent / row["audio"] for row in _rows(manifest))]
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def _audio(manifest: Path, row: dict) -> tuple[np.ndarray, int]:
    return sf.read(manifest.parent / row["audio"], dtype="float32")


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x**2)))


def _segments(wav: np.ndarray, sr: int, hop: float = 0.01, max_gap: float = 0.06) -> list[np.ndarray]:
    """Stretches of sound, split at silences longer than `max_gap` seconds."""
    n = int(hop * sr)
    frames = wav[: len(wav) // n * n].reshape(-1, n)
    active = np.flatnonzero(np.sqrt((frames**2).mean(1)) > 0.02 * np.abs(wav).max())
    spans: list[list[int]] = []
    for i in active:
        if spans and i - spans[-1][1] <= max_gap / hop:
            spans[-1][1] = i + 1
        else:
            spans.append([i, i + 1])
    return [wav[a * n:b * n] for a, b in spans]


def _spectrum(x: np.ndarray, sr: int, n_fft: int = 1 << 16) -> tuple[np.ndarray, np.ndarray]:
    return np.abs(np.fft.rfft(x * np.hanning(len(x)), n_fft)), np.fft.rfftfreq(n_fft, 1 / sr)


def _midi_estimate(x: np.ndarray, sr: int) -> int:
    """Note (MIDI 36-90) whose first five harmonics carry the most weighted spectral peak energy."""
    spec, freqs = _spectrum(x, sr)

    def peak(f: float) -> float:
        return spec[(freqs > f * 2 ** (-0.4 / 12)) & (freqs < f * 2 ** (0.4 / 12))].max()

    midis = np.arange(36, 91)
    hz = 440 * 2 ** ((midis - 69) / 12)
    salience = [sum(0.8 ** (k - 1) * peak(k * f) for k in range(1, 6)) for f in hz]
    return int(midis[int(np.argmax(salience))])


def _tonality(x: np.ndarray, sr: int) -> float:
    """Share of power within 30 Hz of the spectral peak: ~1 for a beep, far lower for speech."""
    power, freqs = _spectrum(x, sr, 1 << 14)
    power = power**2
    k, width = int(power.argmax()), int(30 / freqs[1])
    return float(power[max(0, k - width):k + width].sum() / power.sum())


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("coat-mini")
    return {
        "pool": synthesize(root / "pool", SIZE, seed=0),
        "inline": synthesize(root / "inline", SIZE, seed=0, workers=0),
        "other": synthesize(root / "other", SIZE, seed=1, workers=0),
    }


def test_same_seed_is_byte_identical_whatever_the_worker_count(sets):
    assert _digest(sets["pool"]) == _digest(sets["inline"])


def test_different_seed_gives_different_manifest_and_audio(sets):
    assert sets["pool"].read_bytes() != sets["other"].read_bytes()
    audio = [set(list(_digest(m).values())[1:]) for m in (sets["pool"], sets["other"])]
    assert not audio[0] & audio[1]


def test_manifest_rows_follow_the_schema(sets):
    rows = _rows(sets["pool"])
    assert len(rows) == SIZE and len({r["id"] for r in rows}) == SIZE
    assert {r["task"] for r in rows} == set(TASKS)
    assert [sum(r["split"] == s for r in rows) for s in ("train", "val", "test")] == [32, 4, 4]
    for row in rows:
        assert isinstance(row["prompt"], str) and row["prompt"]
        if row["task"] == "transcription":
            assert row["choices"] is None and row["answer"] == row["text"] and row["answer"] in SENTENCES
        else:
            assert row["answer"] in row["choices"], row["id"]


def test_every_clip_decodes_at_the_rate_within_one_to_six_seconds(sets):
    for row in _rows(sets["pool"]):
        path = sets["pool"].parent / row["audio"]
        info = sf.info(path)
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16"), path
        wav, sr = _audio(sets["pool"], row)
        assert np.isfinite(wav).all() and np.abs(wav).max() > 0.05, path
        assert 1.0 <= len(wav) / sr <= 6.0 and abs(len(wav) / sr - row["duration"]) < 1e-3, path


def test_a_larger_test_share_moves_clips_to_test_and_changes_no_other_clip(sets, tmp_path):
    manifest = synthesize(tmp_path, SIZE, seed=0, workers=0, test_share=0.3)
    rows, tenth = _rows(manifest), {r["id"]: r for r in _rows(sets["pool"])}
    assert [sum(r["split"] == s for r in rows) for s in ("train", "val", "test")] == [24, 4, 12]
    kept = [r["id"] for r in rows if r["split"] == tenth[r["id"]]["split"]]
    assert len(kept) == 28 and all(r == tenth[r["id"]] for r in rows if r["id"] in kept)
    assert {i for i, r in tenth.items() if r["split"] == "test"} < {r["id"] for r in rows if r["split"] == "test"}
    audio = [{name: digest for name, digest in _digest(m).items() if name.endswith(".wav")}
             for m in (manifest, sets["pool"])]
    assert all(audio[0][f"{i}.wav"] == audio[1][f"{i}.wav"] for i in kept)


def test_held_out_clips_speak_sentences_and_voices_training_never_hears(sets, tmp_path):
    pools = {split: set(split_sentences(split)) for split in ("train", "val", "test")}
    assert set().union(*pools.values()) == set(SENTENCES) and sum(map(len, pools.values())) == len(SENTENCES)
    assert len(pools["val"]) == len(pools["test"]) == 29 and not pools["val"] & pools["test"]
    rows = _rows(synthesize(tmp_path, 120, seed=2, workers=2, test_share=0.3)) + _rows(sets["pool"])
    spoken = {split: {r["text"] for r in rows if r["split"] == split and "text" in r} for split in pools}
    voices = {split: {r["espeak"]["voice"] for r in rows if r["split"] == split and "espeak" in r} for split in pools}
    assert spoken["test"] and spoken["val"] and all(spoken[s] <= pools[s] for s in pools)
    assert not spoken["test"] & spoken["train"] and not spoken["val"] & spoken["train"]
    assert voices["test"] and not (voices["test"] | voices["val"]) & voices["train"]


def test_sample_rate_is_honoured(tmp_path):
    rows = _rows(synthesize(tmp_path, 5, seed=3, sample_rate=24000, workers=0))
    assert all(sf.info(tmp_path / r["audio"]).samplerate == 24000 == r["sample_rate"] for r in rows)


def test_music_notes_sound_at_their_labelled_pitch_class(sets):
    notes = [r for r in _rows(sets["pool"]) if r["task"] == "music" and len(r["midi"]) == 1]
    assert len(notes) >= 2
    for row in notes:
        wav, sr = _audio(sets["pool"], row)
        assert PITCH_CLASSES[_midi_estimate(wav, sr) % 12] == row["pitch_class"], (row["id"], row["timbre"])


def test_reasoning_answers_are_measurable_in_the_audio(sets):
    rows = [r for r in _rows(sets["pool"]) + _rows(sets["other"]) if r["task"] == "reasoning"]
    assert {r["subtask"] for r in rows} == {"higher", "louder", "longer", "count"}
    for row in rows:
        wav, sr = _audio(sets["pool"] if row["id"].startswith("0-") else sets["other"], row)
        parts = _segments(wav, sr)
        if row["subtask"] == "count":
            tonal = [_tonality(p, sr) > 0.9 for p in parts]
            assert tonal.index(False) == row["beeps_before"], row["id"]
            continue
        first, second = parts
        if row["subtask"] == "longer":
            assert row["answer"] == ("second" if len(second) > len(first) else "first"), row["id"]
        else:
            if row["subtask"] == "higher":
                second_more = _midi_estimate(second, sr) > _midi_estimate(first, sr)
            else:
                second_more = _rms(second) > _rms(first)
            assert row["answer"] == ("yes" if second_more else "no"), row["id"]


def test_speech_has_energy_and_angry_is_louder_than_sad(sets):
    rows = _rows(sets["pool"]) + _rows(sets["other"])
    level: dict[str, list[float]] = {}
    for row in rows:
        if row["task"] in ("emotion", "transcription"):
            wav, _ = _audio(sets["pool"] if row["id"].startswith("0-") else sets["other"], row)
            assert _rms(wav) > 0.02, row["id"]
            if row["task"] == "emotion":
                level.setdefault(row["answer"], []).append(_rms(wav))
    assert min(level["angry"]) > max(level["sad"])


def test_text_corpus_covers_every_text_in_a_manifest(sets):
    corpus = text_corpus()
    assert len(corpus) == len(set(corpus)) and len(SENTENCES) >= 200
    for row in _rows(sets["pool"]) + _rows(sets["other"]):
        assert {row["prompt"], row["answer"], *(row["choices"] or [])} <= set(corpus), row["id"]


def test_the_tiny_tokenizer_is_trained_on_exactly_coat_minis_text():
    assert tiny_corpus() == sorted(text_corpus()), (
        "coat/backbones/tiny_corpus.txt differs from coat-mini's text: rewrite it with python -c \"from "
        "coat.data.synth import text_corpus; print(*sorted(text_corpus()), sep=chr(10))\" > "
        "coat/backbones/tiny_corpus.txt")


def test_speak_repeats_exactly_whatever_was_spoken_before():
    first, sr = speak("the cat finds a small cup", voice="en+f3", pitch=70)
    speak("our neighbour holds the blue car", voice="en+m3", rate=120)
    again, _ = speak("the cat finds a small cup", voice="en+f3", pitch=70)
    assert sr == 22050 and np.array_equal(first, again) and _rms(first) > 0.02


@pytest.mark.parametrize("kwargs, field", [({"size": 0}, "size"), ({"seed": -1}, "seed"),
                                           ({"sample_rate": 8000}, "sample_rate"), ({"test_share": 0.25}, "test_share"),
                                           ({"test_share": 0.9}, "test_share")])
def test_synthesize_rejects_bad_arguments_by_name(tmp_path, kwargs, field):
    with pytest.raises(ValueError, match=field):
        synthesize(tmp_path, **({"size": 4, "seed": 0} | kwargs))


@pytest.mark.parametrize("kwargs, field", [({"text": " "}, "empty"), ({"voice": "xx-nope"}, "xx-nope"),
                                           ({"rate": 10}, "rate"), ({"volume": 300}, "volume")])
def test_speak_rejects_bad_arguments_by_name(kwargs, field):
    with pytest.raises(ValueError, match=field):
        speak(**({"text": "hello"} | kwargs))
