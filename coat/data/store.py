"""The feature store: expert outputs on disk, content-addressed, so trials read them and never recompute.

Layout under `root`:

    <expert>/<version>/part-<uuid>.parquet   rows (clip_hash, frames, dim, values: list<float32>, row-major)
    <expert>/<version>/parts.jsonl           the ledger: one line per committed part (part, bytes, sha256, rows,
                                             clips: its clip hashes in row order)
    <expert>/<version>/parts.lock            flock'ed by whoever commits a part or rewrites the ledger
    <expert>/<version>/damaged/              parts set aside as damaged (kept for inspection, never read)
    <expert>/<version>/stats/<id>.json       per-dim mean/std over one training split's frames (see `split_stats`)
    quarantine.jsonl                         clips whose audio no expert can read (clip_hash, path, reason)
    quarantine.lock                          flock'ed by whoever appends to the quarantine

A clip is keyed by the sha256 of its audio file's bytes: hashing needs no decode, and an expert's output is a
function of those bytes and the expert's version, which hashes its weights and settings. (A re-encoded copy
of the same sound hashes differently and is computed again: the price of not decoding to hash.) Parts are
written to a temporary name, fsynced and renamed, so a writer killed mid-run leaves only whole parts behind.

A week on shared disks still damages parts (a copy cut short, a flipped block). The ledger is what a part was
when it was committed, so damage can be told from a part: the rename and its ledger line happen under the
version's lock, appends are whole fsynced lines, and two precomputes filling one store at once (duplicates are
harmless: a clip stored twice keeps one sound copy in the index) cannot corrupt it. Checks come in two costs:

- `index` (every training start) compares each part's size with the ledger's: a stat per part, no reads. The
  index keeps a damaged part's clips, marked, so reading them raises `DamagedFeaturesError` naming the part and
  the fix, rather than training on fewer clips.
- `verify` re-hashes every part (`coat data check --store`, `coat experts precompute`): one read of the features,
  less than a training epoch reads. The precompute of a training start verifies sizes only (and reads the parts a
  killed writer left unrecorded), so a large store costs a start no read. Reading a part checks the Parquet
  page checksums written with it, so bytes that change in place fail the read, never pass as features.

Repair: `set_aside` moves damaged parts into `damaged/` and drops their ledger lines, so their clips are missing,
and the next precompute recomputes exactly those. Parts the ledger does not list (written before it existed, or
committed by a writer killed between the rename and the ledger line) are legacy: indexed by reading their
clip_hash column as before, checked by `verify` by reading them whole, reported as without checksums.

Standardisation statistics belong to a training split, not to the store: they are computed over exactly that
split's clips and filed under an id that hashes the expert version and those clips, so adding clips of any
other split (or another corpus) never changes the targets a run trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from coat.data.manifest import open_regular
from coat.errors import UserError
from coat.locks import locked

SCHEMA = pa.schema([("clip_hash", pa.string()), ("frames", pa.int32()), ("dim", pa.int32()),
                    ("values", pa.list_(pa.float32()))])
STATS_FOLDER = "stats"
QUARANTINE_FILE = "quarantine.jsonl"
QUARANTINE_LOCK = "quarantine.lock"
LEDGER_FILE = "parts.jsonl"
LEDGER_LOCK = "parts.lock"
DAMAGED_FOLDER = "damaged"
STD_FLOOR = 1e-6  # a constant feature dim (silent mel bin) standardises to 0, not to inf


class NonFiniteFeaturesError(UserError, ValueError):
    """Stored features hold NaN or inf; the message names the part and the fix."""


class DamagedFeaturesError(UserError):
    """Features asked for sit in a damaged part; the message names the part and the command that repairs it."""


@dataclass(frozen=True)
class Damage:
    """A part that cannot be trusted: why, and the clip hashes it holds (empty when even those cannot be read)."""

    part: Path
    reason: str
    clips: tuple[str, ...]


def repair_hint(root: str | Path) -> str:
    """The fix for damaged parts, as every message about them says it."""
    return (f"run `coat data check --store {root} --repair` to set the damaged parts aside; the next "
            "`coat experts precompute` (or `coat train`, which precomputes first) recomputes exactly their clips")


def damaged_part_error(part: str | Path, reason: str, clips: int) -> DamagedFeaturesError:
    """The error for reading `clips` clips from a damaged `part` (`<root>/<expert>/<version>/part-*.parquet`)."""
    part = Path(part)
    root, name, version = part.parents[2], part.parent.parent.name, part.parent.name
    return DamagedFeaturesError(f"feature store {root}: part {part.name} of {name}/{version}, holding {clips} of "
                                f"the clips asked for, is damaged ({reason}); {repair_hint(root)}")


@dataclass(frozen=True)
class VersionCheck:
    """One expert version of a store, verified: its parts, clips, parts committed before checksums were recorded,
    and the damage found."""

    name: str
    version: str
    parts: int
    clips: int
    unrecorded: int
    damage: list[Damage]


def check_store(root: str | Path, repair: bool = False) -> list[VersionCheck]:
    """Verify every part of the store at `root` against the size and sha256 recorded at its commit; with `repair`,
    set the damaged parts aside, so that the next precompute recomputes exactly their clips.

    Raises:
        FileNotFoundError: `root` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"feature store {root} does not exist: give the folder of data.store")
    store = FeatureStore(root)
    checks = [VersionCheck(name, version, len(store.parts(name, version)), len(store.index(name, version)),
                           len(store.unrecorded(name, version)), store.verify(name, version))
              for name, version in store.versions()]
    if repair:
        for check in checks:
            store.set_aside(check.name, check.version, check.damage)
    return checks


def clip_hash(path: str | Path) -> str:
    """sha256 hex digest of the file's bytes: the key of a clip in the store.

    Raises:
        FileNotFoundError: `path` does not exist.
        NotRegularFileError: `path` is a FIFO, device or folder (read, it would hang or never end).
    """
    with open_regular(path) as f:
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

    def versions(self) -> list[tuple[str, str]]:
        """(expert, version) of every folder that holds parts or a ledger."""
        if not self.root.is_dir():
            return []
        return sorted((expert.name, folder.name) for expert in self.root.iterdir() if expert.is_dir()
                      for folder in expert.iterdir()
                      if (folder / LEDGER_FILE).is_file() or any(folder.glob("part-*.parquet")))

    def ledger(self, name: str, version: str) -> dict[str, dict]:
        """Part file name -> its ledger entry (`part`, `bytes`, `sha256`, `rows`, `clips`); empty for a legacy
        store. A line cut short or garbled is skipped: its part then counts as unrecorded, not as lost."""
        return {entry["part"]: entry for entry in read_json_lines(self.folder(name, version) / LEDGER_FILE)
                if _is_ledger_entry(entry)}

    def unrecorded(self, name: str, version: str) -> list[Path]:
        """Parts the ledger does not list: no checksum to check them against."""
        recorded = self.ledger(name, version)
        return [part for part in self.parts(name, version) if part.name not in recorded]

    def index(self, name: str, version: str) -> pd.DataFrame:
        """Where each stored clip lives: columns `clip_hash`, `part` (path), `row` (index within the part) and
        `damage` ("" for a sound part, else why it cannot be trusted).

        Cheap enough for every training start: clips come from the ledger and each recorded part costs one stat
        (its size against the ledger's); only unrecorded parts are opened, for their clip_hash column. A clip
        stored twice (two runs raced) keeps one copy, a sound one when there is. Sizes catch truncation and loss;
        `verify` catches changed bytes. An unrecorded part that cannot be read adds no clips (they count as
        missing, so precompute computes them again) and `verify` reports it.
        """
        folder = self.folder(name, version)
        recorded = self.ledger(name, version)  # before listing: a part committed in between is read as unrecorded
        parts = [(entry["clips"], folder / part, _size_problem(folder / part, entry) or "")
                 for part, entry in recorded.items()]
        for part in self.parts(name, version):
            if part.name not in recorded and (hashes := _stored_hashes(part)) is not None:
                parts.append((hashes, part, ""))
        # One frame from flat columns: a frame per part took 0.3 ms each, seconds per start for a large store.
        index = pd.DataFrame({
            "clip_hash": [clip for hashes, _, _ in parts for clip in hashes],
            "part": [str(part) for hashes, part, _ in parts for _ in hashes],
            "row": [row for hashes, _, _ in parts for row in range(len(hashes))],
            "damage": [damage for hashes, _, damage in parts for _ in hashes],
        })
        sound_first = index.sort_values("damage", key=lambda damage: damage != "", kind="stable")
        return sound_first.drop_duplicates("clip_hash").reset_index(drop=True)

    def present(self, name: str, version: str) -> set[str]:
        """Clip hashes stored for this expert version in a part that is not known to be damaged."""
        index = self.index(name, version)
        return set(index.loc[index["damage"] == "", "clip_hash"])

    def missing(self, name: str, version: str, clip_hashes: Iterable[str]) -> set[str]:
        """The hashes among `clip_hashes` with no sound features for this expert version."""
        return set(clip_hashes) - self.present(name, version)

    def verify(self, name: str, version: str, hashes: bool = True) -> list[Damage]:
        """Every part of this expert version that cannot be trusted: a recorded part that is gone, or whose size
        (or, with `hashes`, sha256 or values: NaN or inf) differs from what was committed, and an unrecorded part
        (what a writer killed between the rename and the ledger line leaves) that does not read whole. With
        `hashes` it reads every part; without, it stats the recorded ones and reads only the unrecorded (a read
        still checks the page checksums). The store is left as it is (see `set_aside`)."""
        folder = self.folder(name, version)
        recorded = self.ledger(name, version)
        damage = [Damage(folder / part, reason, tuple(entry["clips"])) for part, entry in recorded.items()
                  if (reason := _size_problem(folder / part, entry) or (hashes and (
                      _checksum_problem(folder / part, entry) or _value_problem(folder / part))))]
        for part in self.parts(name, version):
            if part.name not in recorded and (reason := _read_problem(part) or _value_problem(part)):
                damage.append(Damage(part, reason, tuple(_stored_hashes(part) or ())))
        return damage

    def set_aside(self, name: str, version: str, damage: Iterable[Damage]) -> None:
        """Move damaged parts into `damaged/` and drop their ledger lines, so their clips count as missing and the
        next precompute recomputes them. Under the version's lock, so commits of concurrent writers are kept; a
        part another process already set aside is skipped."""
        folder, names = self.folder(name, version), {d.part.name for d in damage}
        if not names:
            return
        with locked(folder / LEDGER_LOCK):
            for part_name in names:
                if (folder / part_name).exists():
                    (folder / DAMAGED_FOLDER).mkdir(exist_ok=True)
                    os.replace(folder / part_name, folder / DAMAGED_FOLDER / part_name)
            kept = [entry for part, entry in self.ledger(name, version).items() if part not in names]
            tmp = folder / f"{LEDGER_FILE}.{uuid.uuid4().hex}.tmp"
            _write_durably(tmp, "".join(json.dumps(entry) + "\n" for entry in kept).encode())
            os.replace(tmp, folder / LEDGER_FILE)  # readers without the lock see the old ledger or the new one

    def write(self, name: str, version: str, rows: pa.Table) -> Path | None:
        """Commit one part: written to a temporary name and fsynced, then renamed and recorded in the ledger (size,
        sha256, rows, clips) under the version's lock. Returns its path, None for no rows.

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
        data = _parquet_bytes(rows)
        tmp = part.with_suffix(".tmp")
        _write_durably(tmp, data)
        entry = {"part": part.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                 "rows": rows.num_rows, "clips": rows.column("clip_hash").to_pylist()}
        with locked(folder / LEDGER_LOCK):
            os.replace(tmp, part)
            _append_json_lines(folder / LEDGER_FILE, [entry])
        return part

    def locate(self, name: str, version: str, clip_hashes: Iterable[str]) -> pd.DataFrame:
        """The index rows of `clip_hashes` (each once), every one of them in a sound part.

        Raises:
            KeyError: naming the expert version and the first hash it does not hold.
            DamagedFeaturesError: a clip's only copy sits in a damaged part (naming it and the fix).
        """
        wanted = list(dict.fromkeys(clip_hashes))
        index = self.index(name, version)
        found = index[index["clip_hash"].isin(wanted)]
        if len(found) < len(wanted):
            absent = sorted(set(wanted) - set(found["clip_hash"]))
            raise KeyError(f"feature store {self.root}: {name}/{version} has no features for clip "
                           f"{absent[0]} ({len(absent)} missing)")
        raise_if_damaged(found)
        return found

    def read(self, name: str, version: str, clip_hashes: Iterable[str]) -> dict[str, np.ndarray]:
        """Features [frames, dim] per requested hash (see `locate` and `read_located`).

        Raises:
            KeyError: naming the expert version and the first hash it does not hold.
            DamagedFeaturesError: a requested clip sits in a damaged part.
        """
        return read_located(self.locate(name, version, clip_hashes))

    def split_stats(self, name: str, version: str, clip_hashes: Iterable[str]) -> dict:
        """Per-dim mean and std (population) over every frame of exactly `clip_hashes` (a training split's clips).

        Returns `id` (sha256 of the version and the sorted distinct hashes: the identity a run records), `expert`,
        `version`, `dim`, `clips`, `frames`, `mean`, `std`. Computed once and kept in `stats/<id>.json` (written
        whole and renamed, so concurrent runs each leave a whole file; one that does not parse is computed
        again); float64 sums accumulate part by part, so memory stays one part whatever the split's size.

        Raises:
            KeyError: the store lacks features of one of the clips (see `read`).
            DamagedFeaturesError: one of the clips sits in a damaged part.
            NonFiniteFeaturesError: the clips' features hold NaN or inf (naming the part and the fix).
            ValueError: the clips' features disagree on `dim`, or `clip_hashes` is empty.
        """
        hashes = sorted(set(clip_hashes))
        if not hashes:
            raise ValueError(f"{name}/{version}: statistics need at least one clip")
        digest = hashlib.sha256(version.encode())
        for h in hashes:
            digest.update(h.encode())
        return self.kept_stats(name, version, digest.hexdigest()[:16],
                               lambda stats_id: self._frame_stats(name, version, hashes, stats_id))

    def kept_stats(self, name: str, version: str, stats_id: str, compute: Callable[[str], dict]) -> dict:
        """Statistics of an expert version's features kept in `stats/<stats_id>.json`: read when a whole file with
        that `id` is there, else `compute(stats_id)` (a dict whose `id` is `stats_id`) written whole and renamed, so
        concurrent runs each leave a whole file. `stats_id` must name everything the statistics depend on; the
        features of a version never change, so the file never goes stale."""
        path = self.folder(name, version) / STATS_FOLDER / f"{stats_id}.json"
        kept = _read_json(path)
        if kept is not None and kept.get("id") == stats_id:
            return kept
        stats = compute(stats_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{uuid.uuid4().hex}.tmp")
        _write_durably(tmp, json.dumps(stats).encode())
        os.replace(tmp, path)
        return stats

    def _frame_stats(self, name: str, version: str, hashes: list[str], stats_id: str) -> dict:
        located = self.locate(name, version, hashes)
        total, total_sq, count, dim = 0.0, 0.0, 0, None
        for part, rows in located.groupby("part", sort=False):
            table = _read_part(part, ["dim", "values"], len(rows)).take(rows["row"].to_numpy())
            dims = set(table.column("dim").to_pylist()) | ({dim} if dim is not None else set())
            if len(dims) != 1:
                raise ValueError(f"{name}/{version}: stored rows disagree on dim {sorted(dims)}, see {part}")
            dim = dims.pop()
            x = table.column("values").combine_chunks().flatten().to_numpy(zero_copy_only=False)
            x = x.reshape(-1, dim).astype(np.float64)
            if not np.isfinite(x).all():
                raise NonFiniteFeaturesError(
                    f"feature store {self.root}: {name}/{version} part {part} holds NaN/inf features of the split's "
                    f"clips, which would make the standardisation and then training NaN: set the part aside (coat "
                    f"data check --store {self.root} --repair) and precompute again, which quarantines such clips")
            total, total_sq, count = total + x.sum(0), total_sq + (x * x).sum(0), count + len(x)
        mean = total / count
        std = np.sqrt(np.maximum(total_sq / count - mean * mean, 0.0))
        return {"id": stats_id, "expert": name, "version": version, "dim": dim, "clips": len(hashes),
                "frames": count, "mean": mean.tolist(), "std": std.tolist()}

    def quarantine(self, records: Iterable[Mapping[str, object]]) -> None:
        """Append records (`clip_hash`, `path`, `reason`) of clips whose audio cannot be decoded (whole lines,
        under a lock: concurrent precomputes append to the same file)."""
        keys = ("clip_hash", "path", "reason")
        records = [{k: r[k] for k in keys} for r in records]
        if records:
            self.root.mkdir(parents=True, exist_ok=True)
            with locked(self.root / QUARANTINE_LOCK):
                _append_json_lines(self.root / QUARANTINE_FILE, records)

    def quarantined(self) -> dict[str, str]:
        """clip_hash -> reason for every clip a precompute found undecodable."""
        return {r["clip_hash"]: r["reason"] for r in read_json_lines(self.root / QUARANTINE_FILE)
                if isinstance(r.get("clip_hash"), str) and isinstance(r.get("reason"), str)}


def raise_if_damaged(located: pd.DataFrame) -> None:
    """Raise `DamagedFeaturesError` for the first damaged part among index rows `located` (see `index`)."""
    damaged = located[located["damage"] != ""]
    if len(damaged):
        part = damaged.iloc[0]["part"]
        raise damaged_part_error(part, damaged.iloc[0]["damage"], int((damaged["part"] == part).sum()))


def read_located(located: pd.DataFrame) -> dict[str, np.ndarray]:
    """Features [frames, dim] per `clip_hash` of an index slice (`clip_hash`, `part`, `row`), reading each
    part once and only its `frames`, `dim`, `values` columns.

    Raises:
        DamagedFeaturesError: a part is gone or does not read (page checksums included), naming it and the fix.
    """
    out = {}
    for part, rows in located.groupby("part", sort=False):
        table = _read_part(part, ["frames", "dim", "values"], len(rows)).take(rows["row"].to_numpy())
        frames, dims = table.column("frames").to_pylist(), table.column("dim").to_pylist()
        data = table.column("values").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        ends = np.cumsum(np.multiply(frames, dims))
        for h, f, d, end in zip(rows["clip_hash"], frames, dims, ends, strict=True):
            out[h] = data[end - f * d:end].reshape(f, d)
    return out


def read_json_lines(path: Path) -> Iterator[dict]:
    """The objects of a JSON Lines file written by `_append_json_lines`, in order. A line that does not parse (cut
    short by a crash, still being appended, or garbled: not UTF-8, not JSON, not an object) is skipped: the records
    here can all be re-derived."""
    if not path.is_file():
        return
    for line in path.read_bytes().splitlines():
        try:
            record = json.loads(line.decode("utf-8"))
        except ValueError:  # not UTF-8, or not JSON
            continue
        if isinstance(record, dict):
            yield record


def _is_ledger_entry(entry: dict) -> bool:
    """Whether a ledger line has every field `index` and `verify` rely on."""
    return (isinstance(entry.get("part"), str) and isinstance(entry.get("bytes"), int)
            and isinstance(entry.get("sha256"), str) and isinstance(entry.get("clips"), list))


def _size_problem(part: Path, entry: Mapping) -> str | None:
    """Why a recorded part fails the cheap check (gone, or not the size it was committed at), else None."""
    try:
        size = part.stat().st_size
    except FileNotFoundError:
        return "missing: the ledger lists it, the folder does not hold it"
    if size != entry["bytes"]:
        return f"truncated or overwritten: {size} bytes, {entry['bytes']} when committed"
    return None


def _checksum_problem(part: Path, entry: Mapping) -> str | None:
    """Why a recorded part's bytes are not the ones committed (sha256 differs), else None."""
    try:
        with open(part, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
    except FileNotFoundError:
        return "missing: the ledger lists it, the folder does not hold it"
    if digest != entry["sha256"]:
        return "corrupt: its sha256 differs from the one recorded when it was committed"
    return None


def _read_problem(part: Path) -> str | None:
    """Why an unrecorded part does not read whole (page checksums included), else None."""
    try:
        pq.read_table(part, page_checksum_verification=True)
    except (pa.ArrowException, OSError) as err:
        return f"unreadable (no checksum recorded): {err}"
    return None


def _value_problem(part: Path) -> str | None:
    """Why a part's features cannot be trained on (NaN or inf values, which a buggy expert may have written before
    precompute refused them), else None."""
    values = pq.read_table(part, columns=["values"]).column("values").combine_chunks().flatten()
    bad = int((~np.isfinite(values.to_numpy(zero_copy_only=False))).sum())
    return f"non_finite: {bad} NaN/inf feature values" if bad else None


def _stored_hashes(part: Path) -> list[str] | None:
    """The clip_hash column of a part, None when it cannot be read."""
    try:
        return pq.read_table(part, columns=["clip_hash"]).column("clip_hash").to_pylist()
    except (pa.ArrowException, OSError):
        return None


def _read_part(part: str | Path, columns: list[str], clips: int) -> pa.Table:
    """Columns of a part read for `clips` clips, its page checksums verified; a part that is gone or does not read
    raises `DamagedFeaturesError`."""
    try:
        return pq.read_table(part, columns=columns, page_checksum_verification=True)
    except (pa.ArrowException, OSError) as err:
        raise damaged_part_error(part, f"unreadable: {err}", clips) from err


def _parquet_bytes(rows: pa.Table) -> bytes:
    """The part file's bytes, with page checksums, so a later flipped byte fails the read."""
    sink = pa.BufferOutputStream()
    pq.write_table(rows, sink, write_page_checksum=True)
    return sink.getvalue().to_pybytes()


def _read_json(path: Path) -> dict | None:
    """A JSON object from `path`, None when it is absent or does not parse."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):  # ValueError: not UTF-8, or not JSON
        return None
    return data if isinstance(data, dict) else None


def _write_durably(path: Path, data: bytes) -> None:
    """Write `data` to `path` and fsync it: a rename that follows never exposes unflushed bytes."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _append_json_lines(path: Path, records: Iterable[Mapping]) -> None:
    """Append one whole line per record, then fsync. The caller holds the file's lock. A last line left without
    its newline by a killed writer gets one first, so it cannot swallow the first new record."""
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        torn = size > 0 and os.pread(fd, 1, size - 1) != b"\n"
        pending = memoryview((("\n" if torn else "") + "".join(json.dumps(r) + "\n" for r in records)).encode())
        while pending:
            pending = pending[os.write(fd, pending):]
        os.fsync(fd)
    finally:
        os.close(fd)


def feature_version(version: str, crop_seconds: float | None) -> str:
    """Where an expert's features of clips cropped to `crop_seconds` are filed: they differ from the whole clip's
    features whenever a clip is longer, so they get a version of their own."""
    return version if crop_seconds is None else f"{version}-crop{crop_seconds:g}s"


def standardise(values: np.ndarray, stats: Mapping[str, object]) -> np.ndarray:
    """(values - mean) / std per dim, float32; std floored at STD_FLOOR."""
    mean = np.asarray(stats["mean"], dtype=np.float32)
    std = np.maximum(np.asarray(stats["std"], dtype=np.float32), STD_FLOOR)
    return ((values - mean) / std).astype(np.float32)
