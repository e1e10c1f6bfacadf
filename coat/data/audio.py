"""Decode one audio file into the float32 mono waveform that experts and backbones consume.

soundfile reads (libsndfile ships in its wheel; torchaudio 2.11's `load` would need torchcodec) and
torchaudio resamples. Every failure is an `AudioError` carrying a stable quarantine code, so a pipeline can
set the row aside and go on with the rest.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd
import soundfile as sf
import torch
import torchaudio.functional as AF

from coat.data.manifest import (
    NotRegularFileError,
    open_regular,
    quarantine_records,
    read_manifest,
    validate_rows,
    write_table,
)

SILENCE_PEAK = 1e-4

# libsndfile clamps a WAV/AIFF whose data chunk runs past the end of the file to the bytes present and only
# says so in its log ("data : 64000 (should be 31978)"): that log is the one place truncation shows.
_CHUNK_SIZE = re.compile(r"^\s*(?:data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
# Streaming writers (ffmpeg or sox on a pipe) cannot seek back and leave these sizes in the header.
_OPEN_SIZES = frozenset({0, 0xFFFFFFFF, 0x7FFFF000})


class AudioError(Exception):
    """An audio file that cannot be used; `code` is the quarantine code, `reason` the quarantine reason."""

    def __init__(self, code: str, detail: str = "", path: str | Path | None = None):
        self.code, self.detail, self.path = code, detail, path
        super().__init__(f"{path}: {self.reason}" if path is not None else self.reason)

    @property
    def reason(self) -> str:
        return f"{self.code}: {self.detail}" if self.detail else self.code


def _shortfall(log: str) -> str | None:
    for declared, present in _CHUNK_SIZE.findall(log):
        if int(declared) > int(present) and int(declared) not in _OPEN_SIZES:
            return f"header declares {declared} data bytes, file holds {present}"
    return None


def load(path: str | Path, max_seconds: float | None = None, crop: bool = False) -> tuple[torch.Tensor, int, int]:
    """Read `path` at its native rate and mix it down to mono.

    Returns (float32 waveform [N], native sample rate, channels in the file). The length cap is checked
    from the header, before any samples are read: a longer file is refused, or with `crop` only its first
    `int(max_seconds * rate)` samples are read.

    Raises:
        AudioError: naming the file, with code `missing_file`, `not_a_file` (a FIFO, device or folder),
            `empty_file` (0 bytes or 0 frames), `undecodable` (not a format libsndfile reads), `truncated` (the
            header promises more than the file holds), `too_long` (over `max_seconds`), `non_finite` (NaN/inf
            samples) or `silent` (peak below `SILENCE_PEAK`).
    """
    path = Path(path)
    with _open_audio(path) as raw, _sound_file(raw, path) as f:
        rate, channels, frames = f.samplerate, f.channels, f.frames
        short = _shortfall(f.extra_info)
        if short:
            raise AudioError("truncated", short, path)
        if frames == 0:
            raise AudioError("empty_file", "0 frames", path)
        seconds = frames / rate
        if max_seconds is not None and seconds > max_seconds:
            if not crop:
                raise AudioError("too_long", f"{seconds:.1f}s > {max_seconds:.1f}s", path)
            frames = crop_length(max_seconds, rate)
        try:
            data = f.read(frames, dtype="float32", always_2d=True)
        except (RuntimeError, ValueError) as e:
            raise AudioError("truncated", f"read failed after the header promised {frames} frames: {e}",
                             path) from e
    if len(data) < frames:
        raise AudioError("truncated", f"header promises {frames} frames, file holds {len(data)}", path)
    finite = np.isfinite(data)
    if not finite.all():
        raise AudioError("non_finite", f"{int((~finite).sum())} NaN/inf samples", path)
    mono = np.ascontiguousarray(data.mean(axis=1), dtype=np.float32)
    peak = float(np.abs(mono).max())
    if peak < SILENCE_PEAK:
        raise AudioError("silent", f"peak {peak:.2g} < {SILENCE_PEAK:g}", path)
    return torch.from_numpy(mono), rate, channels


def _open_audio(path: Path) -> BinaryIO:
    try:
        raw = open_regular(path)
    except FileNotFoundError:
        raise AudioError("missing_file", "", path) from None
    except NotRegularFileError as e:
        raise AudioError("not_a_file", str(e).removeprefix(f"{path} is "), path) from None
    except OSError as e:
        raise AudioError("missing_file", e.strerror or "", path) from None
    if os.fstat(raw.fileno()).st_size == 0:
        raw.close()
        raise AudioError("empty_file", "0 bytes", path)
    return raw


def _sound_file(raw: BinaryIO, path: Path) -> sf.SoundFile:
    try:
        return sf.SoundFile(raw)
    except (RuntimeError, TypeError, ValueError) as e:  # LibsndfileError is a RuntimeError
        raw.close()
        raise AudioError("undecodable", str(e).replace(f"{raw!r}", "file"), path) from e


def header_seconds(path: str | Path) -> float:
    """The clip's length from its header, without reading its samples; NaN when the file cannot be opened (it
    then fails, with its reason, where it is decoded)."""
    try:
        with _open_audio(Path(path)) as raw, _sound_file(raw, Path(path)) as f:
            return f.frames / f.samplerate
    except AudioError:
        return float("nan")


def crop_length(seconds: float, rate: int) -> int:
    """Samples of a clip cropped to `seconds` at `rate`: the same span whatever the rate, so an expert at its
    rate and a backbone at its own hear the same audio."""
    return max(1, int(seconds * rate))


def decode(path: str | Path, target_rate: int, max_seconds: float | None = None, crop: bool = False
           ) -> torch.Tensor:
    """Decode `path` to a float32 mono waveform [N] at `target_rate` (what every row of a pipeline gets).
    Audio longer than `max_seconds` is refused (`too_long`), or with `crop` cut to its first `max_seconds`.

    Raises:
        AudioError: as `load`, naming the file.
        ValueError: if `target_rate` is not positive.
    """
    if target_rate <= 0:
        raise ValueError(f"target_rate must be positive, got {target_rate}")
    wave, rate, _ = load(path, max_seconds, crop)
    return wave if rate == target_rate else AF.resample(wave, rate, target_rate)


def resampled_length(frames: int, rate: int, target_rate: int) -> int:
    """Samples `torchaudio.functional.resample` returns for `frames` at `rate` (it rounds up)."""
    return -(-frames * target_rate // rate)


def check_audio_rows(good_df: pd.DataFrame, target_rate: int, max_seconds: float | None = None,
                     progress: Callable[[Iterable[str]], Iterable[str]] | None = None,
                     ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Open every row's audio once (rows sharing a file share the outcome) and split off the failures.

    `good_df` is the first output of `validate_rows` (it needs `id` and `audio_path`). `progress` may wrap
    the iteration over unique files (e.g. `rich.progress.track`). Returns (rows whose audio decodes,
    quarantine table `id`/`path`/`reason`, stats per good row: `id`, `duration_s`, native `sample_rate`,
    `channels`, `num_samples` at `target_rate`).

    Raises:
        ValueError: if `target_rate` is not positive.
    """
    if target_rate <= 0:
        raise ValueError(f"target_rate must be positive, got {target_rate}")
    paths = list(dict.fromkeys(good_df["audio_path"]))
    outcome: dict[str, AudioError | tuple[int, int, int]] = {}
    for p in progress(paths) if progress else paths:
        try:
            wave, rate, channels = load(p, max_seconds)
            outcome[p] = (len(wave), rate, channels)
        except AudioError as e:
            outcome[p] = e
    failed = np.array([isinstance(outcome[p], AudioError) for p in good_df["audio_path"]], dtype=bool)
    reasons = [outcome[p].reason for p in good_df["audio_path"][failed]]
    quarantine = quarantine_records(good_df[failed], reasons)
    good = good_df[~failed].reset_index(drop=True)
    stats = pd.DataFrame(
        [(i, n / r, r, c, resampled_length(n, r, target_rate))
         for i, (n, r, c) in zip(good["id"], (outcome[p] for p in good["audio_path"]), strict=True)],
        columns=["id", "duration_s", "sample_rate", "channels", "num_samples"])
    return good, quarantine, stats


@dataclass
class ManifestCheck:
    """What `check_manifest` found: rows read, rows kept, rows quarantined (with reasons), decode stats per kept
    row (see `check_audio_rows`)."""

    read: int
    kept: pd.DataFrame
    quarantine: pd.DataFrame
    stats: pd.DataFrame


def check_manifest(manifest: str | Path, target_rate: int, max_seconds: float | None, quarantine_out: str | Path,
                   progress: Callable[[Iterable[str]], Iterable[str]] | None = None) -> ManifestCheck:
    """Validate every row of `manifest` and decode every clip once, before anything trains on it; the rows that
    fail go to `quarantine_out` (.jsonl or .parquet) with their reasons.

    Raises:
        ManifestError: the manifest itself cannot be read.
    """
    rows = read_manifest(manifest)
    valid, bad_rows = validate_rows(rows)
    kept, bad_audio, stats = check_audio_rows(valid, target_rate, max_seconds, progress=progress)
    quarantine = pd.concat([bad_rows, bad_audio], ignore_index=True)
    write_table(quarantine, quarantine_out)
    return ManifestCheck(len(rows), kept, quarantine, stats)
