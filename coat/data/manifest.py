"""The manifest: one row per example, read from JSONL or Parquet, checked row by row.

A bad row never sinks the manifest: `validate_rows` moves it to a quarantine table (`id`, `path`, `reason`)
and the rest go on. `reason` starts with a machine-stable code (`reason_code` extracts it), optionally
followed by `:` and a human detail, e.g. `missing_field:answer` or `too_long: 41.2s > 30.0s`.
"""

from __future__ import annotations

import json
import math
import os
import stat
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd

from coat.errors import UserError

REQUIRED = ("id", "audio", "task", "prompt", "answer", "split")
TASKS = frozenset({"reasoning", "understanding", "music", "emotion", "transcription"})
SPLITS = frozenset({"train", "val", "test"})
QUARANTINE_COLUMNS = ("id", "path", "reason")
SUFFIXES = (".jsonl", ".parquet")


class ManifestError(UserError, ValueError):
    """The manifest file as a whole cannot be read (missing, wrong suffix, malformed)."""


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read a JSONL or Parquet manifest (chosen by suffix) into a DataFrame, one row per example.

    Adds `audio_path`: the absolute, normalised audio path (`audio` is relative to the manifest's folder;
    the original column is kept). Required columns absent from the file are added empty, so their rows
    quarantine as `missing_field`. `choices` cells become lists or None whatever the format, so JSONL and
    Parquet read the same. Rows are not validated here: see `validate_rows`.

    Raises:
        ManifestError: naming the file, if it is missing, has another suffix, or cannot be parsed.
    """
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise ManifestError(f"{path}: unsupported manifest suffix {path.suffix!r}; expected {SUFFIXES}")
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    df = _read_jsonl(path) if path.suffix == ".jsonl" else _read_parquet(path)
    for col in REQUIRED:  # a column absent from the whole file is a missing field on every row
        if col not in df.columns:
            df[col] = None
    if "choices" in df.columns:
        df["choices"] = [_as_choices(c) for c in df["choices"]]
    root = path.absolute().parent
    df["audio_path"] = pd.Series([os.path.normpath(root / a) if isinstance(a, str) and a.strip() else None
                                  for a in df["audio"]], index=df.index, dtype=object)
    return df


class NotRegularFileError(OSError):
    """A path that names a FIFO, a device, a socket or a folder where a file was expected."""


def open_regular(path: str | Path) -> BinaryIO:
    """Open `path` for reading, if it is a regular file (or a link to one).

    A manifest is data from elsewhere: a FIFO or a device such as /dev/zero in it would hang a read or never end
    one, so they are refused before anything is read (O_NONBLOCK keeps the open of a FIFO from waiting for a
    writer; it changes nothing for a regular file).

    Raises:
        FileNotFoundError: nothing at `path`.
        NotRegularFileError: a FIFO, device, socket or folder.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "folder" if stat.S_ISDIR(mode) else "FIFO" if stat.S_ISFIFO(mode) else "device or socket"
        raise NotRegularFileError(f"{path} is a {kind}, not a file")
    return os.fdopen(fd, "rb")


def outside_root(paths: Sequence[str | None], root: str | Path) -> np.ndarray:
    """Which of `paths` (absolute, normalised, as `read_manifest` gives them) lie outside the folder `root`: an
    absolute path or a `..` in a corpus's table points wherever its author chose. Lexical, so a corpus that links
    to audio on another disk stays inside; a missing path is not outside (it fails as missing)."""
    top = os.path.normpath(Path(root).absolute())
    return np.array([isinstance(p, str) and os.path.commonpath([top, os.path.normpath(p)]) != top for p in paths],
                    dtype=bool)


def json_lines(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON Lines file.

    Raises:
        ManifestError: naming the file and line of text that is not UTF-8, invalid JSON or a line that is not an
            object.
    """
    records = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ManifestError(f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x} at column "
                                    f"{e.start + 1}): save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ManifestError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise ManifestError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            records.append((lineno, row))
    return records


def _read_jsonl(path: Path) -> pd.DataFrame:
    return pd.DataFrame([row for _, row in json_lines(path)])


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise ManifestError(f"{path}: cannot read Parquet ({type(e).__name__}: {e})") from e


def _as_choices(value: object) -> object:
    """Parquet gives numpy arrays, JSONL lists, absent cells NaN or None: make them list or None."""
    if isinstance(value, np.ndarray | tuple):
        return list(value)
    return None if _missing(value) else value


def _missing(value: object) -> bool:
    if value is None or value is pd.NA:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def _row_problem(row: pd.Series) -> str | None:
    missing = [f for f in REQUIRED if _missing(row.get(f))]
    if missing:
        return "missing_field:" + ",".join(missing)
    wrong_type = [f for f in REQUIRED if f != "id" and not isinstance(row[f], str)]
    if wrong_type:
        return "bad_type:" + ",".join(wrong_type)
    if row["task"] not in TASKS:
        return f"unknown_task:{row['task']}"
    if row["split"] not in SPLITS:
        return f"unknown_split:{row['split']}"
    choices = row.get("choices")
    if choices is None or (not isinstance(choices, list) and _missing(choices)):
        return None
    if not isinstance(choices, list):
        return f"bad_choices: expected a list of str, got {type(choices).__name__}"
    if not choices or not all(isinstance(c, str) for c in choices):
        return "bad_choices: expected a non-empty list of str"
    if row["answer"] not in choices:
        return "answer_not_in_choices"
    return None


def validate_rows(df: pd.DataFrame, keep: frozenset[str] | set[str] = frozenset()) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split a manifest into rows fit to use and a quarantine table (`id`, `path`, `reason`).

    Checks: every field of `REQUIRED` present and non-empty (`missing_field:<fields>`), text fields are
    strings (`bad_type:<fields>`), `task` in `TASKS`, `split` in `SPLITS`, `choices` (when given) a
    non-empty list of str that contains `answer`. Duplicate ids are checked last, among rows that passed:
    the first keeps its place and later ones get `duplicate_id`, so a broken first copy does not take a good
    one down with it. Audio files are not opened here: see `coat.data.audio.check_audio_rows`. Rows whose only
    problem has a reason code in `keep` pass (a benchmark's own scorer scores an answer outside the choices).

    Raises nothing for bad rows; a DataFrame without the columns `read_manifest` adds raises KeyError.
    """
    reasons = pd.Series([_row_problem(row) for _, row in df.iterrows()], index=df.index, dtype=object)
    reasons[reasons.map(lambda r: r is not None and reason_code(r) in keep)] = None
    ok = reasons.isna()
    dup = df.loc[ok, "id"].astype(str).duplicated(keep="first")
    reasons[dup.index[dup]] = "duplicate_id"
    bad = reasons.notna()
    return df[~bad].reset_index(drop=True), quarantine_records(df[bad], reasons[bad])


def quarantine_records(rows: pd.DataFrame, reasons: pd.Series | list[str]) -> pd.DataFrame:
    """The quarantine table for `rows` of a manifest (as `read_manifest` gives them), one reason per row."""
    out = pd.DataFrame({
        "id": [_plain(i) for i in (rows["id"] if "id" in rows else [None] * len(rows))],
        "path": [_plain(p) for p in (rows["audio_path"] if "audio_path" in rows else [None] * len(rows))],
        "reason": list(reasons),
    }, columns=list(QUARANTINE_COLUMNS))
    return out.astype(object)


def _plain(value: object) -> object:
    """numpy scalars (Parquet ints) as Python values, missing as None, so the table writes as JSON."""
    if value is None or value is pd.NA or (isinstance(value, float | np.floating) and math.isnan(value)):
        return None
    return value.item() if isinstance(value, np.generic) else value


def reason_code(reason: str) -> str:
    """The stable code of a quarantine reason: `too_long: 41.2s > 30.0s` -> `too_long`."""
    return reason.split(":", 1)[0].strip()


def write_table(df: pd.DataFrame, path: str | Path) -> Path:
    """Write a table (e.g. a quarantine) as JSONL or Parquet, chosen by suffix; creates parent folders.

    Raises:
        ValueError: naming the path, for any other suffix.
    """
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise ValueError(f"{path}: unsupported table suffix {path.suffix!r}; expected one of {SUFFIXES}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":
        with path.open("w", encoding="utf-8") as f:
            for rec in df.to_dict(orient="records"):
                rec = {k: _plain(v) for k, v in rec.items()}
                f.write(json.dumps(rec, ensure_ascii=False, default=str) + "\n")
    else:
        df.to_parquet(path, index=False)
    return path


def model_prompt(prompt: str, choices: object = None) -> str:
    """The instruction the model sees: the row's prompt, with the options spelled out for multiple choice,
    so training and evaluation ask the same question."""
    if isinstance(choices, list | tuple) and len(choices):
        return f"{prompt} Options: {', '.join(map(str, choices))}."
    return prompt


def seeded_split(groups: Sequence[str], seed: int, val_share: float, test_share: float,
                 strata: Sequence[str] | None = None) -> list[str]:
    """A split per row such that rows of one group (a speaker, a clip) share it, the same whatever the row order:
    per stratum, the sorted group keys shuffled by `numpy.random.default_rng([seed, crc32(stratum)])`, the first
    `round(n * test_share)` to test and the next `round(n * val_share)` to val (shares of groups, not rows).

    Raises nothing.
    """
    strata = list(strata) if strata is not None else [""] * len(groups)
    chosen: dict[tuple[str, str], str] = {}
    for stratum in sorted(set(strata)):
        keys = sorted({g for g, s in zip(groups, strata, strict=True) if s == stratum})
        order = np.random.default_rng([seed, zlib.crc32(stratum.encode())]).permutation(len(keys))
        n_test = int(len(keys) * test_share + 0.5)
        n_val = int(len(keys) * val_share + 0.5)
        for rank, index in enumerate(order):
            chosen[stratum, keys[index]] = "test" if rank < n_test else "val" if rank < n_test + n_val else "train"
    return [chosen[s, g] for g, s in zip(groups, strata, strict=True)]


def stratified_subsample(rows: pd.DataFrame, count: int | None, seed: int, by: str | list[str] = "task"
                         ) -> pd.DataFrame:
    """`count` rows drawn with `seed`, each value of the column(s) `by` keeping its share (largest remainders, ties
    broken by the seed); all rows when `count` is None or not smaller. Rows keep their order. Raises nothing."""
    if count is None or count >= len(rows):
        return rows
    by = by[0] if isinstance(by, list) and len(by) == 1 else by  # one column: plain group keys, not 1-tuples
    rng = np.random.default_rng(seed)
    shares = rows.groupby(by, dropna=False).size()
    exact = shares * count / len(rows)
    quota = np.floor(exact).astype(int)
    remainders = (exact - quota + rng.random(len(shares)) * 1e-9).sort_values(ascending=False)
    quota[remainders.index[:count - quota.sum()]] += 1
    picked = [g.index[rng.choice(len(g), quota[key], replace=False)] for key, g in rows.groupby(by, dropna=False)]
    return rows.loc[sorted(np.concatenate(picked))]
