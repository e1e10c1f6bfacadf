"""Build a manifest from a local copy of a real corpus in its published layout (`coat data import`).

The published layouts are parsed by the corpus loaders (`coat.data.corpora`, which evaluation reads too), so a
corpus is read the same way for training as for evaluation, and suites without per-item questions get the
instruction their eval recipe asks (`coat.config.default_suites`). Every row then goes through the quarantine
(`validate_rows`, then `check_audio_rows`): `DIR/manifest.jsonl` holds the rows fit to use,
`DIR/quarantine.jsonl` the others with their reason, so nothing is lost silently.

Splits come from the corpus where it defines them, else from a seeded draw. The rule per format:

- librispeech: the subset folder's name (`train-*` -> train, `dev-*` -> val, `test-*` -> test). LibriSpeech's
  subsets are speaker-disjoint already. Keeps `speaker` (the speaker folder) and `subset`.
- meld: the CSV a row comes from (`train_sent_emo.csv`, `dev_sent_emo.csv` -> val, `test_sent_emo.csv`). Ids are
  `<split>-dia{D}_utt{U}`: MELD numbers dialogues per split, so the bare names repeat across splits.
  Audio: a pre-extracted `dia{D}_utt{U}.wav` in MELD.Raw's split folder, else the released `.mp4` there with
  its audio track extracted to `DIR/audio/<split>/` (16 kHz mono PCM16); a video without a usable audio track
  is quarantined as `bad_audio`. Keeps `speaker` (MELD's `Speaker`).
- gtzan: no split in the corpus: a seeded draw by clip, stratified by genre, so every genre is split in the
  same shares. (GTZAN repeats artists across clips; it names none, so the split cannot keep them apart.)
- mmau (test-mini), mmar: every row `test`, the only split these benchmarks define.
- table: the `--split-col` values (`dev`/`valid`/`validation` read as val) when given; else a seeded draw by
  speaker when `--speaker-col` is given (no speaker in two splits), else by clip (rows sharing an audio file stay
  together, so questions about one clip never straddle train and test).

A seeded draw shuffles the sorted group keys with `numpy.random.default_rng([seed, crc32(stratum)])` and gives
the first `round(n * test_share)` groups to test, the next `round(n * val_share)` to val: the same seed gives the
same split whatever the row order, and a stratum's split does not depend on which other strata exist. Shares are
of groups (speakers, clips), not of rows.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import av  # only MELD videos need FFmpeg
import numpy as np
import pandas as pd
import soundfile as sf

from coat.config import default_suites
from coat.data import corpora
from coat.data.audio import check_audio_rows  # torch: only once there is something to decode
from coat.data.import_spec import ImportSpec, ImportUsageError, TableColumns
from coat.data.manifest import (
    SUFFIXES,
    TASKS,
    NotRegularFileError,
    json_lines,
    open_regular,
    outside_root,
    quarantine_records,
    seeded_split,
    validate_rows,
    write_table,
)
from coat.errors import UserError

LAYOUTS = {
    "librispeech": "LibriSpeech/ holding subset folders (train-clean-100, dev-clean, test-clean, ...) or one subset "
                   "folder, each of <speaker>/<chapter>/<speaker>-<chapter>.trans.txt with <utterance>.flac beside it",
    "meld": "train_sent_emo.csv, dev_sent_emo.csv and/or test_sent_emo.csv beside MELD.Raw's folders train_splits/, "
            "dev_splits_complete/, output_repeated_splits_test/ holding dia{D}_utt{U}.mp4 (or .wav)",
    "gtzan": "one folder per genre (blues/, classical/, ...) of .wav or .au clips, directly or under "
             "genres_original/ or genres/",
    "mmau": "mmau-test-mini.json beside its audio folder",
    "mmar": "MMAR-meta.jsonl (or .json) beside its audio folder",
    "table": "a .csv or .jsonl file with one row per example; audio paths relative to its folder",
}
SPLIT_ALIASES = {"dev": "val", "valid": "val", "validation": "val"}
MELD_SPEAKER = "Speaker"


class CorpusError(UserError, ValueError):
    """The corpus copy cannot be read: missing, not in the expected layout, or a malformed file."""


@dataclass(frozen=True)
class ImportSummary:
    """What an import wrote: the manifest (rows fit to use), the quarantine table and the rows behind them."""

    manifest: Path
    quarantine_path: Path
    rows: pd.DataFrame  # the manifest's rows, with `audio_path`
    quarantine: pd.DataFrame  # id, path, reason
    rows_read: int

    @property
    def counts(self) -> pd.DataFrame:
        return split_counts(self.rows)


def split_counts(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows per task family (index) and split (columns train, val, test, total), for the summary tables."""
    splits = ["train", "val", "test"]
    if rows.empty:
        return pd.DataFrame(columns=[*splits, "total"], dtype=int)
    counts = pd.crosstab(rows["task"], rows["split"]).reindex(columns=splits, fill_value=0)
    counts["total"] = counts.sum(axis=1)
    return counts


class NoAudio(Exception):
    """A video whose audio cannot be used; `code` is the quarantine code, the message its detail."""

    def __init__(self, detail: str, code: str = "bad_audio"):
        super().__init__(detail)
        self.code = code


def extract_audio(video: str | Path, wav: str | Path, rate: int = 16000, max_seconds: float | None = None) -> None:
    """Write the first audio track of `video` to `wav` as mono PCM16 at `rate` (MELD ships utterances as .mp4).

    Decoding stops as soon as the track runs past `max_seconds`, so a long or endless file costs no more memory
    than the longest clip kept. Written to a temporary name and renamed, so an interrupted import never leaves a
    half file that a rerun would take for done.

    Raises:
        NoAudio: with the quarantine detail, for a video without an audio track, one that fails to decode
            (`bad_audio`) or one longer than `max_seconds` (`too_long`).
    """
    limit = float("inf") if max_seconds is None else int(max_seconds * rate)
    chunks: list[np.ndarray] = []
    try:
        with open_regular(video) as raw, av.open(raw) as container:
            if not container.streams.audio:
                raise NoAudio("no audio track")
            resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
            decoded = 0
            for frame in itertools.chain(container.decode(container.streams.audio[0]), [None]):  # None: flush
                out = [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
                chunks += out
                decoded += sum(map(len, out))
                if decoded > limit:
                    raise NoAudio(f"longer than {max_seconds:g}s (decoding stopped there)", "too_long")
    except NotRegularFileError as e:
        raise NoAudio(str(e), "not_a_file") from e
    except (av.FFmpegError, OSError, ValueError) as e:
        raise NoAudio(f"cannot decode the audio track ({type(e).__name__}: {e})") from e
    samples = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
    if not len(samples):
        raise NoAudio("the audio track decodes to no samples")
    wav = Path(wav)
    wav.parent.mkdir(parents=True, exist_ok=True)
    tmp = wav.with_name(f".{wav.stem}.tmp.wav")
    sf.write(tmp, samples, rate, subtype="PCM_16")
    os.replace(tmp, wav)


def _recipe_prompt(suite: str) -> str:
    """The eval recipe's instruction, so a model is trained on the question it is evaluated with."""
    return default_suites()[suite].prompt


def _loaded(load: Callable[[], pd.DataFrame]) -> pd.DataFrame:
    """A benchmark loader's rows; its FileNotFoundError/ValueError (naming the file) become a CorpusError."""
    try:
        return load()
    except (FileNotFoundError, ValueError) as e:
        raise CorpusError(str(e)) from e


def _librispeech(root: Path) -> pd.DataFrame:
    frames = []
    for subset in _librispeech_subsets(root):
        split = next(s for prefix, s in corpora.LIBRISPEECH_SUBSETS.items() if subset.name.startswith(prefix))
        df = _loaded(lambda subset=subset, split=split: corpora.load_librispeech(subset, split))
        df["speaker"] = [Path(a).parent.parent.name for a in df["audio"]]
        df["subset"] = subset.name
        frames.append(df)
    rows = pd.concat(frames, ignore_index=True)
    rows["prompt"] = _recipe_prompt("librispeech")
    return rows


def _librispeech_subsets(root: Path) -> list[Path]:
    """`root` itself when it is a subset folder, else its subset folders (also under `root/LibriSpeech`)."""
    def is_subset(folder: Path) -> bool:
        return (folder.is_dir() and folder.name.startswith(tuple(corpora.LIBRISPEECH_SUBSETS))
                and next(folder.glob("*/*/*.trans.txt"), None) is not None)

    if is_subset(root):
        return [root]
    for base in (root, root / "LibriSpeech"):
        subsets = sorted(d for d in base.iterdir() if is_subset(d)) if base.is_dir() else []
        if subsets:
            return subsets
    raise CorpusError(f"{root}: no LibriSpeech subset found; expected {LAYOUTS['librispeech']} (the split comes "
                      "from the subset name: train-* -> train, dev-* -> val, test-* -> test)")


def _meld(root: Path) -> pd.DataFrame:
    frames = []
    for split, csv in corpora.MELD_CSV.items():
        if not (root / csv).is_file():
            continue
        df = _loaded(lambda split=split: corpora.load_meld(root, split))
        df["speaker"] = [item.get(MELD_SPEAKER) for item in df["item"]]
        # The released videos: where no WAV was extracted beforehand, ours goes under DIR/audio/<split>/ (until
        # then `audio_path`, which the quarantine reports, is the video).
        df["video"] = [None if a is None or Path(a).is_file() or not Path(a).with_suffix(".mp4").is_file()
                       else str(Path(a).with_suffix(".mp4")) for a in df["audio"]]
        extracted = df["video"].notna()
        df.loc[extracted, "audio_path"] = df.loc[extracted, "video"]
        df.loc[extracted, "audio"] = [f"audio/{split}/{Path(v).stem}.wav" for v in df.loc[extracted, "video"]]
        df["id"] = [f"{split}-{i}" if isinstance(i, str) else None for i in df["id"]]
        frames.append(df)
    if not frames:
        raise CorpusError(f"{root}: no MELD CSV there; expected {LAYOUTS['meld']}")
    rows = pd.concat(frames, ignore_index=True)
    rows["prompt"] = _recipe_prompt("meld")
    return rows


def _extract_videos(rows: pd.DataFrame, out: Path, rate: int, max_seconds: float | None, progress: Callable | None
                    ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Extract the audio of rows that point at a video to `out/<audio>`; those that fail go to the quarantine
    with their reason. Only rows that passed `validate_rows` get here, so no time goes on rows set aside anyway."""
    rows = rows.copy()
    todo = rows.index[rows["video"].notna()] if "video" in rows else rows.index[:0]
    failed: dict[int, str] = {}
    for i in progress(todo, "extracting audio") if progress else todo:
        video, wav = Path(rows.at[i, "video"]), out / rows.at[i, "audio"]
        try:
            if not (wav.is_file() and wav.stat().st_mtime >= video.stat().st_mtime):  # else: an earlier run's
                extract_audio(video, wav, rate, max_seconds)
            rows.at[i, "audio_path"] = str(wav)
        except NoAudio as e:
            failed[i] = f"{e.code}: {e}"
    quarantine = quarantine_records(rows.loc[list(failed)], list(failed.values()))
    return rows.drop(index=list(failed)).reset_index(drop=True), quarantine


def _gtzan(root: Path, spec: ImportSpec) -> pd.DataFrame:
    rows = _loaded(lambda: corpora.gtzan_clips(root))
    rows["split"] = corpora.gtzan_splits(rows, spec.seed, spec.val_share, spec.test_share)
    rows["prompt"] = _recipe_prompt("gtzan")
    return rows


def _questions(fmt: str, root: Path) -> pd.DataFrame:
    return _loaded(lambda: (corpora.load_mmau if fmt == "mmau" else corpora.load_mmar)(root, "test"))


def _table(path: Path, spec: ImportSpec) -> pd.DataFrame:
    columns, task, prompt = spec.columns or TableColumns(), spec.task, spec.prompt
    if path.suffix not in (".csv", ".jsonl") or not path.is_file():
        raise CorpusError(f"{path}: not a .csv or .jsonl file; the table format expects {LAYOUTS['table']}")
    if task not in TASKS:
        raise ImportUsageError(f"table import of {path}: --task must be one of {', '.join(sorted(TASKS))}, "
                               f"got {task!r}")
    if (columns.question is None) == (prompt is None):
        raise ImportUsageError(f"table import of {path}: give exactly one of a question column (--question-col) "
                               "and one instruction for every row (--prompt)")
    if path.suffix == ".csv":
        try:
            table = pd.read_csv(path, dtype=str, keep_default_na=False)
        except (ValueError, UnicodeDecodeError) as e:
            raise CorpusError(f"{path}: cannot read the CSV ({e})") from e
    else:
        try:
            table = pd.DataFrame([row for _, row in json_lines(path)])
        except UserError as e:
            raise CorpusError(str(e)) from e
    named = {"--audio-col": columns.audio, "--question-col": columns.question, "--answer-col": columns.answer,
             "--choices-col": columns.choices, "--split-col": columns.split, "--speaker-col": columns.speaker,
             "--id-col": columns.id}
    absent = [f"{option} {col!r}" for option, col in named.items() if col is not None and col not in table.columns]
    if absent:
        raise ImportUsageError(f"{path}: no column {', '.join(absent)}; its columns are {list(table.columns)}: "
                               "name the right ones with those options")

    def text(col: str | None) -> list:
        return [None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v).strip()
                for v in table[col]] if col else [None] * len(table)

    audio = [os.path.normpath(path.absolute().parent / a) if a else None for a in text(columns.audio)]
    rows = pd.DataFrame({
        "id": text(columns.id) if columns.id else [f"{path.stem}-{i}" for i in range(len(table))],
        "audio": audio, "audio_path": audio, "task": task,
        "prompt": text(columns.question) if columns.question else prompt,
        "answer": text(columns.answer),
        "choices": [_choices(c) for c in table[columns.choices]] if columns.choices else None,
        "split": None, "speaker": text(columns.speaker),
    }).astype({"choices": object})
    if columns.split:
        rows["split"] = [SPLIT_ALIASES.get(s.lower(), s.lower()) if s else None for s in text(columns.split)]
    else:
        groups = [f"speaker:{s}" if s else f"clip:{a}" for s, a in zip(rows["speaker"], rows["audio"], strict=True)]
        rows["split"] = seeded_split(groups, spec.seed, spec.val_share, spec.test_share)
    if not columns.speaker:
        rows = rows.drop(columns="speaker")
    return rows


def _choices(value: object) -> object:
    """A choices cell: a list (JSONL), a JSON list or `a|b|c` (CSV); anything else is left for the quarantine."""
    if isinstance(value, str):
        value = value.strip()
        if not value:
            return None
        if value.startswith("["):
            try:
                return json.loads(value)
            except json.JSONDecodeError:
                return value  # quarantined as bad_choices
        return [c.strip() for c in value.split("|")]
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return value


def import_corpus(fmt: str, root: str | Path, out: str | Path, spec: ImportSpec | None = None,
                  progress: Callable[[Iterable, str], Iterable] | None = None) -> ImportSummary:
    """Read the corpus at `root` in the published layout of `fmt` and write `out/manifest.jsonl` (rows fit to
    use) and `out/quarantine.jsonl` (the rest, with reasons), as `spec` asks (default: `ImportSpec()`). Splits as
    the module docstring says. `progress(iterable, description)` may wrap the slow loops (video extraction,
    decoding). Rows whose audio lies outside the corpus (the folder of `root`, or of the table file: an absolute path
    or a `..` in a table points wherever its author chose) are quarantined as `outside_root` before any file is
    opened, unless `spec.allow_outside_root`. The manifest is written last and atomically.

    Raises:
        ImportUsageError: unknown format, table options with another format, shares outside [0, 1).
        CorpusError: naming the path and the layout expected, when `root` is missing or not in that layout.
    """
    spec = spec or ImportSpec()
    spec.check(fmt)
    root, out = Path(root).absolute(), Path(out).absolute()
    if not root.exists():
        raise CorpusError(f"{root}: not found; the {fmt} format expects {LAYOUTS[fmt]}")
    if fmt == "librispeech":
        rows = _librispeech(root)
    elif fmt == "meld":
        rows = _meld(root)
    elif fmt == "gtzan":
        rows = _gtzan(root, spec)
    elif fmt in ("mmau", "mmar"):
        rows = _questions(fmt, root)
    else:
        rows = _table(root, spec)
    rows = rows.drop(columns=[c for c in ("item",) if c in rows]).assign(source=fmt)

    good, bad_rows = validate_rows(rows)
    if not spec.allow_outside_root:
        corpus = root if root.is_dir() else root.parent
        outside = outside_root(good["audio_path"], corpus) | outside_root(
            good["video"] if "video" in good else [None] * len(good), corpus)
        bad_rows = pd.concat([bad_rows, quarantine_records(good[outside], [
            f"outside_root: not under the corpus folder {corpus} (--allow-outside-root imports it)"] * outside.sum())],
            ignore_index=True)
        good = good[~outside].reset_index(drop=True)
    good, bad_videos = _extract_videos(good, out, spec.sample_rate, spec.max_seconds, progress)
    good, bad_audio, _ = check_audio_rows(
        good, spec.sample_rate, spec.max_seconds,
        progress=(lambda paths: progress(paths, "decoding")) if progress else None)
    good = good.drop(columns=[c for c in ("video",) if c in good])
    quarantine = pd.concat([bad_rows, bad_videos, bad_audio], ignore_index=True)

    out.mkdir(parents=True, exist_ok=True)
    quarantine_path, manifest = out / "quarantine.jsonl", out / "manifest.jsonl"
    for df, path in ((quarantine, quarantine_path), (good.drop(columns="audio_path"), manifest)):
        tmp = write_table(df, path.with_name(f".{path.stem}.tmp{SUFFIXES[0]}"))
        os.replace(tmp, path)
    return ImportSummary(manifest, quarantine_path, good, quarantine, len(rows))
