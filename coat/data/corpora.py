"""Loaders that turn a local copy of the paper's benchmarks into manifest rows, in their published layouts.

Each returns a DataFrame with the manifest columns (`id`, `audio` and `audio_path` as absolute paths, `task`,
`prompt`, `answer`, `choices`, `split`), `category` (the benchmark's headline split: MMAU's task, MMAR's
modality), `item` (the benchmark's own record, whole, so predictions can be written in its submission format)
and `group.<field>` columns for the fields its official scorer reports per value. Nothing is downloaded: a
missing copy is a FileNotFoundError that names the path and the layout expected there.

Nothing is dropped either: an item with missing fields becomes a row with those fields None, and one whose
answer is not among its choices stays as it is, for the evaluation (`coat.eval.evaluate`) to quarantine with the
reason. Suites without per-item questions (MELD, LibriSpeech, GTZAN) leave `prompt` None: the suite recipe
(`coat.config.default_suites`) owns their instruction. `load_suite` also counts each quirk it met.

| suite | layout under the root (`--data`) | task |
| --- | --- | --- |
| mmau | `mmau-test-mini.json` (`id`, `audio_id`, `question`, `choices`, `answer`, `task`, `difficulty`) | reasoning |
| mmar | `MMAR-meta.jsonl` or `.json` (`id`, `audio_path`, `question`, `choices`, `answer`, `modality`) | reasoning |
| meld | `test_sent_emo.csv` (`Utterance`, `Emotion`, `Dialogue_ID`, `Utterance_ID`) + WAV folder | emotion |
| librispeech | subset folder: `<speaker>/<chapter>/<speaker>-<chapter>.trans.txt` + `.flac` | transcription |
| gtzan | one folder per genre of `<genre>.000NN.wav` (or `.au`); the import's default seeded split | music |
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from coat.data.manifest import SPLITS, json_lines, read_manifest, seeded_split

COLUMNS = ("id", "audio", "audio_path", "task", "prompt", "answer", "choices", "split", "category", "item")
MELD_CSV = {"train": "train_sent_emo.csv", "val": "dev_sent_emo.csv", "test": "test_sent_emo.csv"}
# MELD.Raw's folder names, holding the utterances converted to WAV.
MELD_AUDIO = {"train": "train_splits", "val": "dev_splits_complete", "test": "output_repeated_splits_test"}
MELD_COLUMNS = ("Utterance", "Emotion", "Dialogue_ID", "Utterance_ID")
MELD_EMOTIONS = ("neutral", "joy", "sadness", "anger", "surprise", "fear", "disgust")
LIBRISPEECH_SUBSETS = {"train-": "train", "dev-": "val", "test-": "test"}  # a subset's split, by its name
GTZAN_GENRES = ("blues", "classical", "country", "disco", "hiphop", "jazz", "metal", "pop", "reggae", "rock")


@dataclass(frozen=True)
class QuestionLayout:
    """A benchmark of per-item questions in one JSON (Lines) file, and the fields its official scorer groups by."""

    files: tuple[str, ...]  # looked for in this order
    audio_key: str
    category_key: str
    groups: tuple[str, ...]


QUESTION_SUITES = {
    # MMAU's script reports per task, difficulty and sub-category; `category` is MMAU's skill (13 are lists).
    "mmau": QuestionLayout(("mmau-test-mini.json",), "audio_id", "task",
                           ("task", "difficulty", "category", "sub-category")),
    "mmar": QuestionLayout(("MMAR-meta.jsonl", "MMAR-meta.json"), "audio_path", "modality",
                           ("modality", "category", "sub-category")),
}


def _frame(rows: list[dict], groups: Iterable[str] = ()) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=[*COLUMNS, *(f"group.{g}" for g in groups)])
    df["audio_path"] = df["audio"]
    return df.astype({"choices": object, "item": object})


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {sorted(SPLITS)}")


def _file(root: Path, names: tuple[str, ...], layout: str) -> Path:
    """`root` itself when it is a file, else the first of `root/name` that exists."""
    if root.is_file():
        return root
    found = next((root / name for name in names if (root / name).is_file()), None)
    if found is None:
        raise FileNotFoundError(f"{root}: no {' or '.join(names)} there; expected {layout}")
    return found


def read_records(path: str | Path) -> list[tuple[str, dict]]:
    """The objects of a JSON list or a JSON Lines file, each with where it is (`file:line` or `file item N`).

    JSON Lines is read by suffix (`.jsonl`), or when a `.json` file holds one object per line.
    Raises ValueError naming the file and line of invalid JSON or of an entry that is not an object.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".jsonl":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            if err.msg != "Extra data":  # "Extra data" after a first object: JSON Lines under a .json name
                raise ValueError(f"{path}: invalid JSON ({err.msg} at line {err.lineno})") from err
        else:
            entries = data if isinstance(data, list) else [data]
            records = [(f"{path} item {i}", entry) for i, entry in enumerate(entries, 1)]
            for where, entry in records:
                if not isinstance(entry, dict):
                    raise ValueError(f"{where}: expected a JSON object, got {type(entry).__name__}")
            return records
    return [(f"{path}:{lineno}", entry) for lineno, entry in json_lines(path)]


def _missing(value: object) -> bool:
    if isinstance(value, float) and math.isnan(value):
        return True
    return value is None or (isinstance(value, str) and not value.strip())


def _text(value: object) -> object:
    return value.strip() if isinstance(value, str) else value


def _scalar(value: object) -> object:
    """A list-valued field as its one element, or its elements joined by "+"; empty as None."""
    if not isinstance(value, list):
        return value
    return "+".join(map(str, value)) or None


def _resolve(folder: Path, relative: object) -> str | None:
    return os.path.normpath(folder / relative) if isinstance(relative, str) and relative.strip() else None


def question_rows(suite: str, items: Iterable[dict], folder: str | Path, split: str = "test",
                  ) -> tuple[pd.DataFrame, Counter]:
    """Manifest rows for MMAU or MMAR items (audio resolved against `folder`), and the quirks counted.

    Answers and choices are stripped; duplicate choices are dropped (order kept) for what is asked and scored,
    while `item` keeps the original. Quirks: `duplicate_choices`, `list_valued_fields` (a breakdown field given
    as a list), `missing_fields`, `answer_not_in_choices`. Raises KeyError for a suite other than mmau/mmar.
    """
    layout = QUESTION_SUITES[suite]
    folder = Path(folder)
    quirks: Counter = Counter()
    rows = []
    for item in items:
        choices = item.get("choices")
        if isinstance(choices, list):
            stripped = [_text(c) for c in choices]
            choices = list(dict.fromkeys(stripped)) if all(isinstance(c, str) for c in stripped) else stripped
            quirks["duplicate_choices"] += len(choices) < len(stripped)
        answer = _text(item.get("answer"))
        groups = {f"group.{g}": _scalar(item.get(g)) for g in layout.groups}
        quirks["list_valued_fields"] += any(isinstance(item.get(g), list) for g in layout.groups)
        needed = ("id", "question", "answer", "choices", layout.audio_key)
        quirks["missing_fields"] += any(_missing(item.get(k)) for k in needed)
        quirks["answer_not_in_choices"] += (isinstance(choices, list) and not _missing(answer)
                                            and answer not in choices)
        rows.append({
            "id": None if _missing(item.get("id")) else str(item["id"]),
            "audio": _resolve(folder, item.get(layout.audio_key)), "task": "reasoning",
            "prompt": _text(item.get("question")), "answer": answer, "choices": choices, "split": split,
            "category": _scalar(item.get(layout.category_key)), "item": item, **groups,
        })
    return _frame(rows, layout.groups), +quirks


def _load_questions(suite: str, root: str | Path, split: str) -> tuple[pd.DataFrame, Counter]:
    _check_split(split)
    root = Path(root).absolute()
    layout = QUESTION_SUITES[suite]
    path = _file(root, layout.files, f"{' or '.join(layout.files)} (a JSON list or JSON Lines of items with id, "
                                     f"{layout.audio_key}, question, choices, answer) beside their audio folder")
    return question_rows(suite, (item for _, item in read_records(path)), path.parent, split)


def load_mmau(root: str | Path, split: str = "test") -> pd.DataFrame:
    """MMAU test-mini (audio reasoning): `root` is the folder holding `mmau-test-mini.json` (or that file);
    audio paths (`audio_id`) resolve against its folder. Breakdowns: `group.task` (sound/music/speech),
    `group.difficulty`, `group.category`, `group.sub-category`.

    Raises FileNotFoundError naming `root` and the layout, ValueError for malformed JSON or an unknown split.
    """
    return _load_questions("mmau", root, split)[0]


def load_mmar(root: str | Path, split: str = "test") -> pd.DataFrame:
    """MMAR (audio reasoning): `root` is the folder holding `MMAR-meta.jsonl` (the current release) or
    `MMAR-meta.json` (or that file); `audio_path` resolves against its folder. Breakdowns: `group.modality`,
    `group.category`, `group.sub-category`.

    Raises FileNotFoundError naming `root` and the layout, ValueError for malformed JSON or an unknown split.
    """
    return _load_questions("mmar", root, split)[0]


def _load_meld(root: str | Path, split: str) -> tuple[pd.DataFrame, Counter]:
    _check_split(split)
    root = Path(root).absolute()
    layout = (f"{MELD_CSV[split]} (columns {', '.join(MELD_COLUMNS)}) and {MELD_AUDIO[split]}/ "
              "holding dia{D}_utt{U}.wav")
    csv = _file(root, (MELD_CSV[split],), layout)
    audio = root / MELD_AUDIO[split]
    if not audio.is_dir():
        raise FileNotFoundError(f"{root}: no {MELD_AUDIO[split]}/ folder there; expected {layout}")
    table = pd.read_csv(csv, encoding_errors="replace")
    missing = [c for c in MELD_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{csv}: lacks the MELD columns {missing}")
    quirks: Counter = Counter()
    rows = []
    for item in table.to_dict(orient="records"):
        item = {k: None if _missing(v) else v for k, v in item.items()}
        d, u, emotion = item["Dialogue_ID"], item["Utterance_ID"], item["Emotion"]
        name = None if d is None or u is None else f"dia{int(d)}_utt{int(u)}"
        answer = None if emotion is None else str(emotion).strip().lower()
        quirks["missing_fields"] += name is None or answer is None
        quirks["answer_not_in_choices"] += answer is not None and answer not in MELD_EMOTIONS
        rows.append({"id": name, "audio": name and str(audio / f"{name}.wav"), "task": "emotion", "prompt": None,
                     "answer": answer, "choices": list(MELD_EMOTIONS), "split": split, "category": None,
                     "item": item})
    return _frame(rows), +quirks


def load_meld(root: str | Path, split: str = "test") -> pd.DataFrame:
    """MELD speech emotion (7 classes): `root` holds `<split>_sent_emo.csv` (`dev_` for val) and MELD.Raw's
    folder for that split (`output_repeated_splits_test/`, `dev_splits_complete/`, `train_splits/`) with each
    utterance as `dia{Dialogue_ID}_utt{Utterance_ID}.wav`. Utterances without a WAV are kept, to be
    quarantined as `missing_file`; `item` is the CSV row.

    Raises FileNotFoundError naming the missing CSV or folder and the layout, ValueError for an unknown split
    or a CSV without the MELD columns.
    """
    return _load_meld(root, split)[0]


def _load_librispeech(root: str | Path, split: str) -> tuple[pd.DataFrame, Counter]:
    _check_split(split)
    root = Path(root).absolute()
    named = next((s for prefix, s in LIBRISPEECH_SUBSETS.items() if root.name.startswith(prefix)), split)
    if named != split:
        raise ValueError(f"{root}: LibriSpeech's {root.name} is the {named} split (as `coat data import librispeech` "
                         f"reads it), not {split}: give the subset folder of the {split} split, e.g. "
                         "LibriSpeech/test-clean for test")
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
                         "task": "transcription", "prompt": None, "answer": text.strip().lower(),
                         "choices": None, "split": split, "category": None,
                         "item": {"id": utterance, "transcript": text.strip()}})
    return _frame(rows), Counter()


def load_librispeech(root: str | Path, split: str = "test") -> pd.DataFrame:
    """LibriSpeech transcription: `root` is one subset folder (e.g. `LibriSpeech/test-clean`) of
    `<speaker>/<chapter>/<speaker>-<chapter>.trans.txt` with `<utterance id>.flac` beside it. Answers are the
    transcripts in lower case; `item` keeps the original.

    Raises FileNotFoundError naming `root` and the layout, ValueError naming the file and line of a malformed
    transcript line, an unknown split, or a subset whose name gives another split (`train-*`, `dev-*`, `test-*`).
    """
    return _load_librispeech(root, split)[0]


GTZAN_SPLIT = {"seed": 0, "val_share": 0.1, "test_share": 0.1}  # `coat data import gtzan`'s default split


def gtzan_clips(root: str | Path) -> pd.DataFrame:
    """Every GTZAN clip under `root` as a manifest row (split unset). Raises FileNotFoundError naming `root` and
    the layout."""
    root = Path(root).absolute()
    folders = [root, root / "genres_original", root / "genres"]
    base = next((f for f in folders if any((f / g).is_dir() for g in GTZAN_GENRES)), None)
    if base is None:
        raise FileNotFoundError(
            f"{root}: no genre folders found; expected folders named {', '.join(GTZAN_GENRES)} of .wav or .au "
            "clips, directly under it or under genres_original/ or genres/")
    rows = [
        {"id": clip.stem, "audio": str(clip), "task": "music", "prompt": None, "answer": genre,
         "choices": list(GTZAN_GENRES), "split": None, "category": None,
         "item": {"file": str(clip.relative_to(base)), "genre": genre}}
        for genre in GTZAN_GENRES
        for clip in sorted([*(base / genre).glob("*.wav"), *(base / genre).glob("*.au")])
    ]
    return _frame(rows)


def gtzan_splits(rows: pd.DataFrame, seed: int, val_share: float, test_share: float) -> list[str]:
    """GTZAN has no official split: a seeded draw by clip, stratified by genre (`seeded_split`). The import and the
    `gtzan` suite both call this, so evaluation scores exactly the clips the import held out."""
    return seeded_split(list(rows["id"]), seed, val_share, test_share, strata=list(rows["answer"]))


def _load_gtzan(root: str | Path, split: str) -> tuple[pd.DataFrame, Counter]:
    _check_split(split)
    rows = gtzan_clips(root)
    rows["split"] = gtzan_splits(rows, **GTZAN_SPLIT)
    return rows[rows["split"] == split].reset_index(drop=True), Counter()


def load_gtzan(root: str | Path, split: str = "test") -> pd.DataFrame:
    """GTZAN genre classification (10 genres, all of them the choices): `root` holds one folder per genre
    (`blues/blues.00000.wav`, ...), directly or under `genres_original/` (Kaggle) or `genres/` (the original
    archive, `.au` files). The clips of `split` in the split `coat data import gtzan` makes by default (seed 0, a
    tenth each to validation and test, stratified by genre), so a model trained on the import is never scored on a
    clip it trained on.

    Raises FileNotFoundError naming `root` and the layout, ValueError for an unknown split.
    """
    return _load_gtzan(root, split)[0]


LOADERS: dict[str, Callable[..., pd.DataFrame]] = {
    "mmau": load_mmau, "mmar": load_mmar, "meld": load_meld, "librispeech": load_librispeech, "gtzan": load_gtzan,
}
_COUNTED: dict[str, Callable[[str | Path, str], tuple[pd.DataFrame, Counter]]] = {
    "mmau": lambda root, split: _load_questions("mmau", root, split),
    "mmar": lambda root, split: _load_questions("mmar", root, split),
    "meld": _load_meld, "librispeech": _load_librispeech, "gtzan": _load_gtzan,
}


def load_suite(suite: str, root: str | Path, split: str = "test") -> tuple[pd.DataFrame, dict[str, int]]:
    """Rows of one evaluation suite and the quirks met loading it (only those seen, e.g.
    `{"duplicate_choices": 27, "list_valued_fields": 13}` for MMAU test-mini), for the evaluation to report.

    `coat-mini` reads the manifest at `root` and keeps `split`; the benchmarks use their loaders.
    Raises ValueError naming an unknown suite, and whatever the suite's loader raises.
    """
    if suite == "coat-mini":
        rows = read_manifest(root)
        return rows[rows["split"] == split].reset_index(drop=True), {}
    if suite not in _COUNTED:
        raise ValueError(f"suite {suite!r} is not one of coat-mini, {', '.join(_COUNTED)}")
    rows, quirks = _COUNTED[suite](root, split)
    return rows, dict(quirks)
