"""Loaders that turn a local copy of the paper's benchmarks into manifest rows, in their published layouts.

Each returns a DataFrame with the manifest columns (`id`, `audio` and `audio_path` as absolute paths, `task`,
`prompt`, `answer`, `choices`, `split`) plus `category` where the benchmark reports per category. Nothing is
downloaded: a missing copy is a FileNotFoundError that names the path and the layout expected there. Items
with missing fields or answers outside their choices are kept as they are, for `evaluate` to quarantine.

| suite | layout under the root (`--data`) | task |
| --- | --- | --- |
| mmau | `mmau-test-mini.json` (`id`, `audio_id`, `question`, `choices`, `answer`, `task`) | reasoning |
| mmar | `MMAR-meta.json` (`id`, `audio_path`, `question`, `choices`, `answer`, `modality`) | reasoning |
| meld | `test_sent_emo.csv` (`Utterance`, `Emotion`, `Dialogue_ID`, `Utterance_ID`) + WAV folder | emotion |
| librispeech | subset folder: `<speaker>/<chapter>/<speaker>-<chapter>.trans.txt` + `.flac` | transcription |
| gtzan | one folder per genre of `<genre>.000NN.wav` (or `.au`) | music |
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from coat.data.manifest import SPLITS

COLUMNS = ("id", "audio", "audio_path", "task", "prompt", "answer", "choices", "split", "category")
MMAU_FILE = "mmau-test-mini.json"
MMAR_FILE = "MMAR-meta.json"
MELD_CSV = {"train": "train_sent_emo.csv", "val": "dev_sent_emo.csv", "test": "test_sent_emo.csv"}
# MELD.Raw's folder names, holding the utterances converted to WAV.
MELD_AUDIO = {"train": "train_splits", "val": "dev_splits_complete", "test": "output_repeated_splits_test"}
MELD_COLUMNS = ("Utterance", "Emotion", "Dialogue_ID", "Utterance_ID")
MELD_EMOTIONS = ("neutral", "joy", "sadness", "anger", "surprise", "fear", "disgust")
GTZAN_GENRES = ("blues", "classical", "country", "disco", "hiphop", "jazz", "metal", "pop", "reggae", "rock")
# The same instructions coat-mini trains on, so a fine-tuned model is asked what it learned to answer.
EMOTION_PROMPT = "What emotion does the speaker convey?"
TRANSCRIBE_PROMPT = "Transcribe the speech."
GENRE_PROMPT = "Which music genre is this?"


def _frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    df["audio_path"] = df["audio"]
    return df.astype({"choices": object})


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {sorted(SPLITS)}")


def _file(root: Path, name: str, layout: str) -> Path:
    """`root` itself when it is the file, else `root/name`."""
    path = root if root.is_file() else root / name
    if not path.is_file():
        raise FileNotFoundError(f"{root}: no {name} there; expected {layout}")
    return path


def _json_items(path: Path) -> list[dict]:
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err.msg} at line {err.lineno})") from err
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise ValueError(f"{path}: expected a JSON list of objects")
    return items


def _text(value: object) -> object:
    return value.strip() if isinstance(value, str) else value


def _choices(value: object) -> object:
    return [_text(c) for c in value] if isinstance(value, list) else value


def _resolve(folder: Path, relative: object) -> str | None:
    return os.path.normpath(folder / relative) if isinstance(relative, str) and relative.strip() else None


def _question_rows(path: Path, audio_key: str, category_key: str, split: str) -> pd.DataFrame:
    return _frame([
        {"id": str(item.get("id")), "audio": _resolve(path.parent, item.get(audio_key)), "task": "reasoning",
         "prompt": _text(item.get("question")), "answer": _text(item.get("answer")),
         "choices": _choices(item.get("choices")), "split": split, "category": item.get(category_key)}
        for item in _json_items(path)
    ])


def load_mmau(root: str | Path, split: str = "test") -> pd.DataFrame:
    """MMAU test-mini (audio reasoning, per sound/music/speech): `root` is the folder holding
    `mmau-test-mini.json` (or that file); audio paths (`audio_id`) resolve against its folder.

    Raises FileNotFoundError naming `root` and the layout, ValueError for malformed JSON or an unknown split.
    """
    _check_split(split)
    root = Path(root).absolute()
    path = _file(root, MMAU_FILE, f"{MMAU_FILE} (a JSON list of items with id, audio_id, question, choices, "
                                  "answer, task) beside test-mini-audios/")
    return _question_rows(path, "audio_id", "task", split)


def load_mmar(root: str | Path, split: str = "test") -> pd.DataFrame:
    """MMAR (audio reasoning, per modality): `root` is the folder holding `MMAR-meta.json` (or that file);
    `audio_path` resolves against its folder.

    Raises FileNotFoundError naming `root` and the layout, ValueError for malformed JSON or an unknown split.
    """
    _check_split(split)
    root = Path(root).absolute()
    path = _file(root, MMAR_FILE, f"{MMAR_FILE} (a JSON list of items with id, audio_path, question, choices, "
                                  "answer, modality) beside audio/")
    return _question_rows(path, "audio_path", "modality", split)


def load_meld(root: str | Path, split: str = "test") -> pd.DataFrame:
    """MELD speech emotion (7 classes): `root` holds `<split>_sent_emo.csv` (`dev_` for val) and MELD.Raw's
    folder for that split (`output_repeated_splits_test/`, `dev_splits_complete/`, `train_splits/`) with each
    utterance as `dia{Dialogue_ID}_utt{Utterance_ID}.wav`. Utterances without a WAV are kept, to be
    quarantined as `missing_file`.

    Raises FileNotFoundError naming the missing CSV or folder and the layout, ValueError for an unknown split
    or a CSV without the MELD columns.
    """
    _check_split(split)
    root = Path(root).absolute()
    layout = (f"{MELD_CSV[split]} (columns {', '.join(MELD_COLUMNS)}) and {MELD_AUDIO[split]}/ "
              "holding dia{D}_utt{U}.wav")
    csv = _file(root, MELD_CSV[split], layout)
    audio = root / MELD_AUDIO[split]
    if not audio.is_dir():
        raise FileNotFoundError(f"{root}: no {MELD_AUDIO[split]}/ folder there; expected {layout}")
    table = pd.read_csv(csv, encoding_errors="replace")
    missing = [c for c in MELD_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{csv}: lacks the MELD columns {missing}")
    return _frame([
        {"id": f"dia{d}_utt{u}", "audio": str(audio / f"dia{d}_utt{u}.wav"), "task": "emotion",
         "prompt": EMOTION_PROMPT, "answer": str(emotion).strip().lower(), "choices": list(MELD_EMOTIONS),
         "split": split, "category": None}
        for d, u, emotion in zip(table["Dialogue_ID"], table["Utterance_ID"], table["Emotion"], strict=True)
    ])


def load_librispeech(root: str | Path, split: str = "test") -> pd.DataFrame:
    """LibriSpeech transcription: `root` is one subset folder (e.g. `LibriSpeech/test-clean`) of
    `<speaker>/<chapter>/<speaker>-<chapter>.trans.txt` with `<utterance id>.flac` beside it. Answers are the
    transcripts in lower case, as coat-mini's are.

    Raises FileNotFoundError naming `root` and the layout, ValueError naming the file and line of a malformed
    transcript line or an unknown split.
    """
    _check_split(split)
    root = Path(root).absolute()
    transcripts = sorted(root.glob("*/*/*.trans.txt")) if root.is_dir() else []
    if not transcripts:
        raise FileNotFoundError(
            f"{root}: no transcripts found; expected a LibriSpeech subset folder (e.g. LibriSpeech/test-clean) "
            "of <speaker>/<chapter>/<speaker>-<chapter>.trans.txt with <utterance>.flac files beside it")
    rows = []
    for path in transcripts:
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            utterance, _, text = line.strip().partition(" ")
            if not text.strip():
                raise ValueError(f"{path}:{lineno}: expected '<utterance id> <TRANSCRIPT>', got {line!r}")
            rows.append({"id": utterance, "audio": str(path.parent / f"{utterance}.flac"),
                         "task": "transcription", "prompt": TRANSCRIBE_PROMPT, "answer": text.strip().lower(),
                         "choices": None, "split": split, "category": None})
    return _frame(rows)


def load_gtzan(root: str | Path, split: str = "test") -> pd.DataFrame:
    """GTZAN genre classification (10 genres, all of them the choices): `root` holds one folder per genre
    (`blues/blues.00000.wav`, ...), directly or under `genres_original/` (Kaggle) or `genres/` (the original
    archive, `.au` files). Every clip gets `split`: GTZAN has no official split.

    Raises FileNotFoundError naming `root` and the layout, ValueError for an unknown split.
    """
    _check_split(split)
    root = Path(root).absolute()
    folders = [root, root / "genres_original", root / "genres"]
    base = next((f for f in folders if any((f / g).is_dir() for g in GTZAN_GENRES)), None)
    if base is None:
        raise FileNotFoundError(
            f"{root}: no genre folders found; expected folders named {', '.join(GTZAN_GENRES)} of .wav or .au "
            "clips, directly under it or under genres_original/ or genres/")
    rows = [
        {"id": clip.stem, "audio": str(clip), "task": "music", "prompt": GENRE_PROMPT, "answer": genre,
         "choices": list(GTZAN_GENRES), "split": split, "category": None}
        for genre in GTZAN_GENRES
        for clip in sorted([*(base / genre).glob("*.wav"), *(base / genre).glob("*.au")])
    ]
    return _frame(rows)


LOADERS: dict[str, Callable[..., pd.DataFrame]] = {
    "mmau": load_mmau, "mmar": load_mmar, "meld": load_meld, "librispeech": load_librispeech, "gtzan": load_gtzan,
}
