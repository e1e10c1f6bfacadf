"""coat-mini: a synthetic audio question-answering set whose answers hinge on acoustic detail.

Five task families (reasoning, understanding, music, emotion, transcription) are rendered from espeak-ng
speech and numpy signal synthesis, so the whole set builds offline in minutes and every label is exact.
Validation and test clips speak sentences of their own (a tenth of the 288 each) in voices training never
hears, so a transcription scored on them measures recognition, not recall of a training answer.
Clip `i` depends only on (seed, i, sample_rate): its rng is seeded with [seed, i], so the set is
byte-identical whatever the worker count or scheduling, and a larger `size` extends a smaller one.
"""

import json
import os
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF
from rich.progress import track

from coat.data.speech import speak

TASKS = ("reasoning", "understanding", "music", "emotion", "transcription")
MIN_SECONDS, MAX_SECONDS = 1.0, 6.0
MIN_SAMPLE_RATE = 16000  # chirps reach 4 kHz; plucked strings need a loop of 16+ samples

SUBJECTS = ("the cat", "the dog", "a bird", "my friend", "the teacher", "a child", "the farmer",
            "our neighbour")
VERBS = ("sees", "likes", "finds", "takes", "wants", "holds")
OBJECTS = ("the red ball", "a green box", "the old book", "a small cup", "the blue car", "a warm coat")
SENTENCES = tuple(f"{s} {v} {o}" for s in SUBJECTS for v in VERBS for o in OBJECTS)

EMOTIONS = ("neutral", "happy", "sad", "angry")
# espeak (pitch, pitch_range, rate, volume) per style; clips jitter around these.
EMOTION_STYLES = {
    "neutral": (48, 40, 165, 100),
    "happy": (72, 90, 195, 125),
    "sad": (28, 10, 125, 55),
    "angry": (58, 75, 215, 185),
}
# The last voice of each tuple speaks only validation and test clips: en+m3 and en+f4, which no training clip of any
# task is spoken in.
SPEAKING_VOICES = ("en", "en+f3", "en+f2", "en+m3")
VOICE_KINDS = ("male", "female", "child")
CHILD_SHIFT = 1.25  # child-like voices: female voice sped up, which raises pitch and formants together
# kind -> (espeak voices, espeak pitch range, speed-up factor)
VOICE_STYLES = {
    "male": (("en", "en+m1", "en+m3"), (20, 45), 1.0),
    "female": (("en+f2", "en+f3", "en+f4"), (45, 65), 1.0),
    "child": (("en+f3", "en+f4"), (60, 80), CHILD_SHIFT),
}
TIMBRES = ("sine", "square", "sawtooth", "plucked")
PITCH_CLASSES = ("C", "C#", "D", "D#", "E", "F", "F#", "G", "G#", "A", "A#", "B")
QUALITIES = ("major", "minor")
EVENTS = ("beeps", "chirp", "noise burst", "clicks", "siren")
COUNT_WORDS = ("one", "two", "three", "four", "five")
YES_NO = ("yes", "no")
ORDER = ("first", "second")

# Question type -> (prompt paraphrases, choices or None for open-ended answers).
QUESTIONS = {
    "transcribe": (("Transcribe the speech.", "What does the speaker say?"), None),
    "emotion": (("What emotion does the speaker convey?", "How does the speaker sound?"), EMOTIONS),
    "timbre": (("Which instrument timbre is playing?", "What kind of sound source plays this?"), TIMBRES),
    "pitch_class": (("What is the pitch class of this note?", "Which note is played?"), PITCH_CLASSES),
    "chord": (("Is this chord major or minor?", "What is the quality of this chord?"), QUALITIES),
    "event": (("Which sound event do you hear?", "What kind of sound is in this clip?"), EVENTS),
    "voice": (("What kind of voice is speaking?", "Who is speaking: male, female or child?"), VOICE_KINDS),
    "higher": (("Is the second tone higher than the first?", "Does the pitch go up from the first tone to "
                "the second?"), YES_NO),
    "louder": (("Is the second sound louder than the first?", "Does the second sound have more volume than "
                "the first?"), YES_NO),
    "longer": (("Which tone lasts longer, the first or the second?", "Which of the two tones is longer?"),
               ORDER),
    "count": (("How many beeps are there before the speech?", "How many beeps come before the voice starts?"),
              COUNT_WORDS),
}


def held_out(split: str, voices: tuple[str, ...]) -> tuple[str, ...]:
    """The voices a clip of `split` may speak in: training all but the last, validation and test the last."""
    return voices[:-1] if split == "train" else voices[-1:]


def split_sentences(split: str) -> tuple[str, ...]:
    """The sentences clips of `split` speak: every tenth sentence is validation's, the one after it test's, the
    rest training's, so a transcript on a held-out clip is never one that training heard."""
    def home(i: int) -> str:
        return {0: "val", 1: "test"}.get(i % 10, "train")

    return tuple(sentence for i, sentence in enumerate(SENTENCES) if home(i) == split)


def text_corpus() -> list[str]:
    """Every prompt, answer, choice and spoken sentence coat-mini can emit (to train a tiny BPE tokenizer).

    Raises nothing.
    """
    texts = list(SENTENCES)
    for prompts, choices in QUESTIONS.values():
        texts += [*prompts, *(choices or ())]
    return list(dict.fromkeys(texts))


def _ask(rng: np.random.Generator, question: str, answer: str) -> dict:
    prompts, choices = QUESTIONS[question]
    return {"prompt": str(rng.choice(prompts)), "answer": answer,
            "choices": list(choices) if choices else None, "subtask": question}


def _silence(seconds: float, sr: int) -> np.ndarray:
    return np.zeros(round(seconds * sr), np.float32)


def _fade(wav: np.ndarray, sr: int, attack: float = 0.01, release: float = 0.02) -> np.ndarray:
    t = np.arange(len(wav)) / sr
    return wav * np.clip(np.minimum(t / attack, (len(wav) / sr - t) / release), 0.0, 1.0)


def _note_hz(midi: int) -> float:
    return 440.0 * 2 ** ((midi - 69) / 12)


def _tone(f0: float, seconds: float, timbre: str, sr: int, rng: np.random.Generator) -> np.ndarray:
    """One note, peak 1. Square/sawtooth are band-limited additive sums, so the label pitch has no aliases."""
    n = round(seconds * sr)
    if timbre == "plucked":
        return _pluck(f0, n, sr, rng)
    k = np.arange(1, int(0.45 * sr / f0) + 1)
    if timbre == "sine":
        k = k[:1]
    elif timbre == "square":
        k = k[k % 2 == 1]
    elif timbre != "sawtooth":
        raise ValueError(f"unknown timbre {timbre!r}; expected one of {TIMBRES}")
    phase = 2 * np.pi * f0 * np.arange(n) / sr
    wav = (1.0 / k) @ np.sin(np.outer(k, phase))
    wav = _fade(wav, sr, attack=0.015, release=0.08) * np.exp(-np.arange(n) / sr / 3.0)
    return (wav / np.abs(wav).max()).astype(np.float32)


def _pluck(f0: float, n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Karplus-Strong string: a plucked shape recirculated through a delay of `period` samples and a 2-tap
    loss filter whose tap weight adds the fractional delay `frac`, tuning the loop to sr / f0. Computed a
    period at a time because each period only reads the one before."""
    period, frac = divmod(sr / f0, 1.0)
    period = int(period)
    rho = 10 ** (-3 / (f0 * 1.5))  # per-period loss for a 1.5 s decay to -60 dB
    buf = np.zeros(n + 1)
    x = np.arange(period) / period
    pick = rng.uniform(0.2, 0.5)  # a string plucked at `pick` of its length starts as a triangle, plus noise
    burst = np.minimum(x / pick, (1 - x) / (1 - pick)) + 0.3 * rng.uniform(-1, 1, period)
    buf[1:period + 1] = burst - burst.mean()
    for start in range(period + 1, n + 1, period):
        end = min(start + period, n + 1)
        back = start - period
        buf[start:end] = rho * ((1 - frac) * buf[back:end - period] + frac * buf[back - 1:end - period - 1])
    wav = _fade(buf[1:], sr, attack=0.002, release=0.05)
    return (wav / np.abs(wav).max()).astype(np.float32)


def _speech(text: str, sr: int, *, shift: float = 1.0, **style) -> np.ndarray:
    """espeak-ng speech at `sr`; `shift` > 1 plays it faster, raising pitch and formants by that factor."""
    wav, native_sr = speak(text, **style)
    return AF.resample(torch.from_numpy(wav), native_sr, round(sr / shift)).numpy()


def _transcription(rng: np.random.Generator, sr: int, split: str) -> tuple[list[np.ndarray], dict]:
    text = str(rng.choice(split_sentences(split)))
    style = {"voice": str(rng.choice(held_out(split, SPEAKING_VOICES))), "rate": int(rng.integers(150, 200)),
             "pitch": int(rng.integers(35, 65)), "pitch_range": int(rng.integers(30, 70)), "volume": 100}
    return [_speech(text, sr, **style)], {**_ask(rng, "transcribe", text), "text": text, "espeak": style}


def _emotion(rng: np.random.Generator, sr: int, split: str) -> tuple[list[np.ndarray], dict]:
    label = str(rng.choice(EMOTIONS))
    pitch, pitch_range, rate, volume = EMOTION_STYLES[label]
    text = str(rng.choice(split_sentences(split)))
    style = {"voice": str(rng.choice(held_out(split, SPEAKING_VOICES))), "pitch": pitch + int(rng.integers(-5, 6)),
             "pitch_range": pitch_range + int(rng.integers(-8, 9)), "rate": rate + int(rng.integers(-10, 11)),
             "volume": volume + int(rng.integers(-10, 11))}
    return [_speech(text, sr, **style)], {**_ask(rng, "emotion", label), "style": label, "text": text,
                                          "espeak": style}


def _music(rng: np.random.Generator, sr: int, split: str) -> tuple[list[np.ndarray], dict]:
    question = str(rng.choice(["timbre", "pitch_class", "chord"]))
    timbre = str(rng.choice(TIMBRES))
    seconds = float(rng.uniform(1.2, 3.5))
    chord = question == "chord" or (question == "timbre" and rng.random() < 0.5)
    quality = str(rng.choice(QUALITIES))
    root = int(rng.integers(48, 60 if chord else 72))  # C3..B3 for chord roots, C3..B4 for single notes
    midis = [root, root + (4 if quality == "major" else 3), root + 7] if chord else [root]
    wav = sum(_tone(_note_hz(m), seconds, timbre, sr, rng) for m in midis)
    wav = wav / np.abs(wav).max() * rng.uniform(0.3, 0.8)
    answer = {"timbre": timbre, "pitch_class": PITCH_CLASSES[root % 12], "chord": quality}[question]
    meta = {"timbre": timbre, "midi": midis, "pitch_class": PITCH_CLASSES[root % 12],
            "quality": quality if chord else None, "f0_hz": round(_note_hz(root), 3)}
    return [wav], {**_ask(rng, question, answer), **meta}


def _event(name: str, rng: np.random.Generator, sr: int) -> np.ndarray:
    if name == "beeps":
        f, parts = rng.uniform(600, 1500), []
        for _ in range(rng.integers(2, 5)):
            parts += [_tone(f, rng.uniform(0.15, 0.3), "sine", sr, rng), _silence(rng.uniform(0.1, 0.3), sr)]
        return np.concatenate(parts[:-1])
    if name == "chirp":
        seconds, f_lo, f_hi = rng.uniform(0.4, 0.8), rng.uniform(200, 500), rng.uniform(2000, 4000)
        t = np.arange(round(seconds * sr)) / sr
        phase = 2 * np.pi * f_lo * seconds / np.log(f_hi / f_lo) * ((f_hi / f_lo) ** (t / seconds) - 1)
        sweep = _fade(np.sin(phase), sr)
        twice = rng.random() < 0.5
        return np.concatenate([sweep, _silence(rng.uniform(0.1, 0.3), sr), sweep] if twice else [sweep])
    if name == "noise burst":
        parts = []
        for _ in range(rng.integers(1, 4)):
            parts += [_fade(rng.uniform(-1, 1, round(rng.uniform(0.2, 0.5) * sr)), sr, 0.005, 0.05),
                      _silence(rng.uniform(0.15, 0.4), sr)]
        return np.concatenate(parts[:-1])
    if name == "clicks":
        gap, count = round(rng.uniform(0.08, 0.25) * sr), int(rng.integers(5, 13))
        width = round(0.003 * sr)
        click = np.exp(-np.arange(width) / (0.0005 * sr)) * rng.choice([-1.0, 1.0], width)
        wav = np.zeros(gap * count)
        for i in range(count):
            wav[i * gap:i * gap + len(click)] = click
        return wav
    if name == "siren":
        t = np.arange(round(rng.uniform(1.5, 3.0) * sr)) / sr
        freq = rng.uniform(700, 1000) + rng.uniform(200, 400) * np.sin(2 * np.pi * rng.uniform(0.5, 2.0) * t)
        return _fade(np.sin(2 * np.pi * np.cumsum(freq) / sr), sr, 0.05, 0.1)
    raise ValueError(f"unknown event {name!r}; expected one of {EVENTS}")


def _understanding(rng: np.random.Generator, sr: int, split: str) -> tuple[list[np.ndarray], dict]:
    if rng.random() < 0.5:
        name = str(rng.choice(EVENTS))
        wav = _event(name, rng, sr)
        return [wav / np.abs(wav).max() * rng.uniform(0.3, 0.8)], {**_ask(rng, "event", name), "event": name}
    kind = str(rng.choice(VOICE_KINDS))
    text = str(rng.choice(split_sentences(split)))
    voices, (pitch_lo, pitch_hi), shift = VOICE_STYLES[kind]
    style = {"voice": str(rng.choice(held_out(split, voices))), "pitch": int(rng.integers(pitch_lo, pitch_hi)),
             "rate": round(int(rng.integers(150, 195)) / shift), "pitch_range": int(rng.integers(30, 70)),
             "volume": 100}
    wav = _speech(text, sr, shift=shift, **style)
    return [wav], {**_ask(rng, "voice", kind), "voice_kind": kind, "text": text, "espeak": style}


def _reasoning(rng: np.random.Generator, sr: int, split: str) -> tuple[list[np.ndarray], dict]:
    question = str(rng.choice(["higher", "louder", "longer", "count"]))
    gap = _silence(rng.uniform(0.2, 0.5), sr)
    if question == "count":
        before, after = int(rng.integers(1, 6)), int(rng.integers(0, 3))
        beep = _fade(_tone(rng.uniform(800, 1200), 0.1, "sine", sr, rng), sr) * 0.6

        def beeps() -> list[np.ndarray]:
            return [beep, _silence(rng.uniform(0.1, 0.18), sr)]

        text = str(rng.choice(split_sentences(split)))
        voice = str(rng.choice(held_out(split, SPEAKING_VOICES)))
        speech = _speech(text, sr, voice=voice, rate=int(rng.integers(180, 210)))
        parts = [p for _ in range(before) for p in beeps()] + [gap, speech, gap]
        parts += [p for _ in range(after) for p in beeps()]
        return parts, {**_ask(rng, "count", COUNT_WORDS[before - 1]), "beeps_before": before,
                       "beeps_after": after, "text": text}
    timbre = str(rng.choice(TIMBRES[:3]))
    midi = [int(rng.integers(52, 76))] * 2
    seconds = [float(rng.uniform(0.4, 0.8))] * 2
    gains = [float(rng.uniform(0.3, 0.7))] * 2
    if question == "higher":
        midi[1] = midi[0] + int(rng.choice([-1, 1])) * int(rng.integers(2, 13))
        answer = YES_NO[0] if midi[1] > midi[0] else YES_NO[1]
    elif question == "louder":
        gains[1] = gains[0] * 10 ** (float(rng.choice([-1, 1])) * rng.uniform(6, 12) / 20)
        answer = YES_NO[0] if gains[1] > gains[0] else YES_NO[1]
    else:
        seconds = [float(rng.uniform(0.25, 0.45)), float(rng.uniform(0.75, 1.1))]
        if rng.random() < 0.5:
            seconds.reverse()
        answer = ORDER[int(seconds[1] > seconds[0])]
    tones = [_tone(_note_hz(m), s, timbre, sr, rng) * g for m, s, g in zip(midi, seconds, gains, strict=True)]
    meta = {"timbre": timbre, "midi": midi, "f0_hz": [round(_note_hz(m), 3) for m in midi],
            "tone_seconds": [round(s, 4) for s in seconds], "gains": [round(g, 4) for g in gains]}
    return [tones[0], gap, tones[1]], {**_ask(rng, question, answer), **meta}


MAKERS = {"reasoning": _reasoning, "understanding": _understanding, "music": _music, "emotion": _emotion,
          "transcription": _transcription}


def _split(index: int, test_tenths: int) -> str:
    """Of every ten consecutive clips, the last `test_tenths` are test clips and the one before them validation."""
    place = index % 10
    return "test" if place >= 10 - test_tenths else "val" if place == 9 - test_tenths else "train"


def _render(job: tuple[int, int, int, str, int]) -> dict:
    """Render and write clip `index`; return its manifest row."""
    index, seed, sr, out_dir, test_tenths = job
    rng = np.random.default_rng([seed, index])
    task = TASKS[(index + index // 10) % len(TASKS)]  # rotates, so that val and test see every task
    split = _split(index, test_tenths)
    parts, fields = MAKERS[task](rng, sr, split)
    wav = np.concatenate([_silence(rng.uniform(0.05, 0.3), sr), *parts, _silence(rng.uniform(0.05, 0.3), sr)])
    if len(wav) < MIN_SECONDS * sr:
        wav = np.concatenate([wav, _silence(MIN_SECONDS - len(wav) / sr, sr)])
    clip_id = f"{seed}-{index:06d}"
    if len(wav) > MAX_SECONDS * sr:
        raise RuntimeError(f"coat-mini clip {clip_id} ({task}) is {len(wav) / sr:.2f} s, over {MAX_SECONDS}")
    sf.write(Path(out_dir) / "audio" / f"{clip_id}.wav", np.clip(wav, -1, 1), sr, subtype="PCM_16")
    row = {"id": clip_id, "audio": f"audio/{clip_id}.wav", "task": task, "prompt": fields.pop("prompt"),
           "answer": fields.pop("answer"), "choices": fields.pop("choices"), "split": split}
    return row | {"duration": round(len(wav) / sr, 4), "sample_rate": sr} | fields


def _init_worker() -> None:
    torch.set_num_threads(1)  # two workers on two cores: intra-op threads would only oversubscribe


def synthesize(out_dir: Path, size: int, seed: int, sample_rate: int = 16000, *, workers: int = 2,
               test_share: float = 0.1) -> Path:
    """Write `size` coat-mini clips to `out_dir/audio/<id>.wav` and their rows to `out_dir/manifest.jsonl`.

    `test_share` of the clips (in tenths) go to the test split, a tenth to validation, the rest to training.
    Same (size, seed, sample_rate, test_share) -> byte-identical manifest and audio. `workers` processes render the
    clips (0 renders in this process); they are spawned, not forked, because the caller may already run torch or
    Ray threads, so a calling script needs the usual `if __name__ == "__main__":` guard. The manifest is written
    last and atomically, so a crash never leaves one that points at missing audio. Returns the manifest path.

    Raises:
        ValueError: size < 1, seed < 0, sample_rate < 16000, workers < 0, or a test_share that is not a
            whole number of tenths between 0.1 and 0.8.
        RuntimeError: a clip came out longer than 6 s (a generator bug) or espeak-ng failed.
        OSError: out_dir cannot be written.
    """
    limits = {"size": (size, 1), "seed": (seed, 0), "sample_rate": (sample_rate, MIN_SAMPLE_RATE),
              "workers": (workers, 0)}
    for name, (value, low) in limits.items():
        if not isinstance(value, int) or value < low:
            raise ValueError(f"synthesize: {name} must be an integer >= {low}, got {value!r}")
    test_tenths = round(test_share * 10)
    if not (1 <= test_tenths <= 8 and abs(test_share * 10 - test_tenths) < 1e-9):
        raise ValueError(f"synthesize: test_share must be a whole number of tenths in [0.1, 0.8], got {test_share!r}")
    out_dir = Path(out_dir)
    (out_dir / "audio").mkdir(parents=True, exist_ok=True)
    jobs = [(i, seed, sample_rate, str(out_dir), test_tenths) for i in range(size)]
    description = f"coat-mini: {size} clips"
    if workers == 0:
        rows = [_render(job) for job in track(jobs, description=description)]
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker) as pool:
            rows = list(track(pool.map(_render, jobs, chunksize=8), total=size, description=description))
    manifest = out_dir / "manifest.jsonl"
    tmp = manifest.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    os.replace(tmp, manifest)
    return manifest
