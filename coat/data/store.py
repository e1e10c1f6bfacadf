"""The feature store: expert outputs on disk, content-addressed, so trials read them and never recompute.

Layout under `root`:

    <expert>/<version>/part-<uuid>.parquet   rows (clip_hash, frames, dim, values: list<float32>, row-major)
    <expert>/<version>/stats/<id>.json       per-dim mean/std over one training split's frames (see `split_stats`)
    quarantine.jsonl                         clips whose audio no expert can read (clip_hash, path, reason)

A clip is keyed by the sha256 of its audio file's bytes: hashing needs no decode, and an expert's output is a
function of those bytes and the expert's version, which hashes its weights and settings. (A re-encoded copy
of the same sound hashes differently and is computed again: the price of not decoding to hash.) Parts are
written to a temporary name and renamed, so a writer killed mid-run leaves only whole parts behind.

Standardisation statistics belong to a training split, not to the store: they are computed over exactly that
split's clips and filed under an id that hashes the expert version and those clips, so adding clips of any
other split (or another corpus) never changes the targets a run trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema([("clip_hash", pa.string()), ("frames", pa.int32()), ("dim", pa.int32()),
                    ("values", pa.list_(pa.float32()))])
STATS_FOLDER = "stats"
QUARANTINE_FILE = "quarantine.jsonl"
STD_FLOOR = 1e-6  # a constant feature dim (silent mel bin) standardises to 0, not to inf


def clip_hash(path: str | Path) -> str:
    """sha256 hex digest of the file's bytes: the key of a clip in the store.

    Raises:
        FileNotFoundError: `path` does not exist.
    """
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def feature_rows(clip_hashes: Iterable[str], features: Iterable[np.ndarray]) -> pa.Table:
    """A table in the store's schema from per-clip features [T, D] (frame-level) or [D] (clip-level, T = 1).

    Raises:
        ValueError: a feature array is not 1-D or 2-D.
    """
    hashes, frames, dims, values = [], [], [], []
    for h, f in zip(clip_hashes, features, strict=True):
        f = np.asarray(f, dtype=np.float32)
        if f.ndim not in (1, 2):
            raise ValueError(f"clip {h}: features must be [T, D] or [D], got shape {f.shape}")
        f = f.reshape(1, -1) if f.ndim == 1 else f
        hashes.append(h)
        frames.append(f.shape[0])
        dims.append(f.shape[1])
        values.append(f.ravel())
    offsets = np.concatenate([[0], np.cumsum([len(v) for v in values])]).astype(np.int32)
    flat = np.concatenate(values) if values else np.zeros(0, np.float32)
    lists = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.float32()))
    return pa.table([pa.array(hashes, pa.string()), pa.array(frames, pa.int32()), pa.array(dims, pa.int32()),
                     lists], schema=SCHEMA)


class FeatureStore:
    """One directory of expert features; see the module docstring for the layout."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def folder(self, name: str, version: str) -> Path:
        return self.root / name / version

    def parts(self, name: str, version: str) -> list[Path]:
        """Finished part files of one expert version (temporary files of an interrupted write excluded)."""
        return sorted(self.folder(name, version).glob("part-*.parquet"))

    def index(self, name: str, version: str) -> pd.DataFrame:
        """Where each stored clip lives: columns `clip_hash`, `part` (path), `row` (index within the part).

        Reads only the clip_hash column. A clip stored twice (two runs raced) keeps its first copy.

        Raises:
            pyarrow.ArrowInvalid: a part file is not Parquet (the message names it).
        """
        frames = []
        for part in self.parts(name, version):
            hashes = pq.read_table(part, columns=["clip_hash"]).column("clip_hash").to_pylist()
            rows = np.arange(len(hashes))
            frames.append(pd.DataFrame({"clip_hash": hashes, "part": str(part), "row": rows}))
        if not frames:
            return pd.DataFrame({"clip_hash": [], "part": [], "row": []})
        return pd.concat(frames, ignore_index=True).drop_duplicates("clip_hash").reset_index(drop=True)

    def present(self, name: str, version: str) -> set[str]:
        """Clip hashes stored for this expert version."""
        return set(self.index(name, version)["clip_hash"])

    def missing(self, name: str, version: str, clip_hashes: Iterable[str]) -> set[str]:
        """The hashes among `clip_hashes` with no features for this expert version."""
        return set(clip_hashes) - self.present(name, version)

    def write(self, name: str, version: str, rows: pa.Table) -> Path | None:
        """Write one part (atomically: temporary name, then rename); returns its path, None for no rows.

        Raises:
            ValueError: `rows` does not have the store's columns.
        """
        if rows.num_rows == 0:
            return None
        try:
            rows = rows.select(SCHEMA.names).cast(SCHEMA)
        except (KeyError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
            raise ValueError(f"feature rows for {name}/{version} need columns {SCHEMA}: {err}") from err
        folder = self.folder(name, version)
        folder.mkdir(parents=True, exist_ok=True)
        part = folder / f"part-{uuid.uuid4().hex}.parquet"
        tmp = part.with_suffix(".tmp")
        pq.write_table(rows, tmp)
        os.replace(tmp, part)
        return part

    def read(self, name: str, version: str, clip_hashes: Iterable[str]) -> dict[str, np.ndarray]:
        """Features [frames, dim] per requested hash (see `read_located`).

        Raises:
            KeyError: naming the expert version and the first hash it does not hold.
        """
        wanted = list(dict.fromkeys(clip_hashes))
        index = self.index(name, version)
        found = index[index["clip_hash"].isin(wanted)]
        if len(found) < len(wanted):
            absent = sorted(set(wanted) - set(found["clip_hash"]))
            raise KeyError(f"feature store {self.root}: {name}/{version} has no features for clip "
                           f"{absent[0]} ({len(absent)} missing)")
        return read_located(found)

    def split_stats(self, name: str, version: str, clip_hashes: Iterable[str]) -> dict:
        """Per-dim mean and std (population) over every frame of exactly `clip_hashes` (a training split's clips).

        Returns `id` (sha256 of the version and the sorted distinct hashes: the identity a run records), `expert`,
        `version`, `dim`, `clips`, `frames`, `mean`, `std`. Computed once and kept in `stats/<id>.json`; float64
        sums accumulate part by part, so memory stays one part whatever the split's size.

        Raises:
            KeyError: the store lacks features of one of the clips (see `read`).
            ValueError: the clips' features disagree on `dim`, or `clip_hashes` is empty.
        """
        hashes = sorted(set(clip_hashes))
        if not hashes:
            raise ValueError(f"{name}/{version}: statistics need at least one clip")
        digest = hashlib.sha256(version.encode())
        for h in hashes:
            digest.update(h.encode())
        stats_id = digest.hexdigest()[:16]
        path = self.folder(name, version) / STATS_FOLDER / f"{stats_id}.json"
        if path.is_file():
            return json.loads(path.read_text())
        index = self.index(name, version)
        located = index[index["clip_hash"].isin(hashes)]
        if len(located) < len(hashes):
            absent = sorted(set(hashes) - set(located["clip_hash"]))
            raise KeyError(f"feature store {self.root}: {name}/{version} has no features for clip {absent[0]} "
                           f"({len(absent)} missing)")
        total, total_sq, count, dim = 0.0, 0.0, 0, None
        for part, rows in located.groupby("part", sort=False):
            table = pq.read_table(part, columns=["dim", "values"]).take(rows["row"].to_numpy())
            dims = set(table.column("dim").to_pylist()) | ({dim} if dim is not None else set())
            if len(dims) != 1:
                raise ValueError(f"{name}/{version}: stored rows disagree on dim {sorted(dims)}, see {part}")
            dim = dims.pop()
            x = table.column("values").combine_chunks().flatten().to_numpy(zero_copy_only=False)
            x = x.reshape(-1, dim).astype(np.float64)
            total, total_sq, count = total + x.sum(0), total_sq + (x * x).sum(0), count + len(x)
        mean = total / count
        std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
        stats = {"id": stats_id, "expert": name, "version": version, "dim": dim, "clips": len(hashes),
                 "frames": count, "mean": mean.tolist(), "std": std.tolist()}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps(stats))
        os.replace(tmp, path)
        return stats

    def quarantine(self, records: Iterable[Mapping[str, object]]) -> None:
        """Append records (`clip_hash`, `path`, `reason`) of clips whose audio cannot be decoded."""
        keys = ("clip_hash", "path", "reason")
        lines = "".join(json.dumps({k: r[k] for k in keys}) + "\n" for r in records)
        if lines:
            self.root.mkdir(parents=True, exist_ok=True)
            with open(self.root / QUARANTINE_FILE, "a", encoding="utf-8") as f:
                f.write(lines)

    def quarantined(self) -> dict[str, str]:
        """clip_hash -> reason for every clip a precompute found undecodable."""
        path = self.root / QUARANTINE_FILE
        if not path.is_file():
            return {}
        records = (json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
        return {r["clip_hash"]: r["reason"] for r in records}


def read_located(located: pd.DataFrame) -> dict[str, np.ndarray]:
    """Features [frames, dim] per `clip_hash` of an index slice (`clip_hash`, `part`, `row`), reading each
    part once and only its `frames`, `dim`, `values` columns.

    Raises:
        FileNotFoundError: a part file no longer exists.
    """
    out = {}
    for part, rows in located.groupby("part", sort=False):
        table = pq.read_table(part, columns=["frames", "dim", "values"]).take(rows["row"].to_numpy())
        frames, dims = table.column("frames").to_pylist(), table.column("dim").to_pylist()
        data = table.column("values").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        ends = np.cumsum(np.multiply(frames, dims))
        for h, f, d, end in zip(rows["clip_hash"], frames, dims, ends, strict=True):
            out[h] = data[end - f * d:end].reshape(f, d)
    return out


def feature_version(version: str, crop_seconds: float | None) -> str:
    """Where an expert's features of clips cropped to `crop_seconds` are filed: they differ from the whole clip's
    features whenever a clip is longer, so they get a version of their own."""
    return version if crop_seconds is None else f"{version}-crop{crop_seconds:g}s"


def standardise(values: np.ndarray, stats: Mapping[str, object]) -> np.ndarray:
    """(values - mean) / std per dim, float32; std floored at STD_FLOOR."""
    mean = np.asarray(stats["mean"], dtype=np.float32)
    std = np.maximum(np.asarray(stats["std"], dtype=np.float32), STD_FLOOR)
    return ((values - mean) / std).astype(np.float32)
