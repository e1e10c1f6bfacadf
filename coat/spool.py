"""Writes to the tracking server that outlive an outage: kept on local disk and replayed, exactly once.

A run's writes (metrics, params, tags, artifacts, its end) go straight to the server. When the server cannot be
reached, the write is appended to the run's spool folder instead (under the run's storage), and every later
write of the run follows it there until the folder has been replayed, so that writes reach the server in the
order they were made. Any process writing to the run tries a replay at most every `retry_s` seconds; the driver
replays at the end of the run and at the next start of the same run.

Exactly once: every record is idempotent. Metrics carry the time they were taken (the server stores a metric's
(key, value, timestamp, step) once), tags and params are set to the same values, artifacts overwrite, and a run
is found again by its name. A replay cut short and repeated therefore adds nothing. A run opened during an
outage gets a provisional id (`pending-…`); the replay opens it and records its real id in the folder, where
every process of the run looks it up.

Each process appends to a file of its own; appends and replays hold the folder's lock (`fcntl.flock`), so two
processes never replay the same record at once.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from coat.errors import UserError

WARN_EVERY_S = 60.0
PENDING = "pending-"
IDS_FILE = "run_ids.json"
SEQ_FILE = "sequence"  # the number of the last record appended, by any process
REJECTED = "rejected/records.jsonl"  # records the server refused, with why

log = logging.getLogger(__name__)


class Unreachable(Exception):
    """The server could not be reached (as opposed to a write it rejected): the write can wait."""


class SpoolFullError(UserError):
    """The writes waiting for the server would pass `tracking.spool_max_mb`; the message names the spool and the
    fix."""


class Spool:
    """One run's spool folder, as seen from one process.

    `send(record, ids)` delivers one record (`ids`: provisional run id -> real id) and returns the run's id for
    an `open` record; it raises `Unreachable` when the server is down. `reachable()` is a quick check that
    does not wait out the server's retries.
    """

    def __init__(self, folder: Path, send: Callable[[dict, dict], str | None], reachable: Callable[[], bool],
                 where: str, retry_s: float, max_bytes: float = float("inf")):
        self.folder, self.send, self.reachable, self.where = Path(folder), send, reachable, where
        self.retry_s, self.max_bytes = retry_s, max_bytes
        self.own = self.folder / f"{time.time_ns()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        self.next_try = 0.0
        self.warned_at = -WARN_EVERY_S
        self.rejected = 0

    def waiting(self) -> bool:
        """Whether records wait to be replayed (in any process's file)."""
        return any(self.folder.glob("*.jsonl"))

    def write(self, record: dict) -> str | None:
        """Deliver `record` now, or spool it while the server is down or earlier records wait. Returns what `send`
        returns; for an `open` record that had to wait, a provisional id."""
        if self.waiting() and time.monotonic() >= self.next_try:
            self.replay()
        cause = None
        if not self.waiting():
            try:
                return self.send(record, self.ids())
            except Unreachable as err:
                cause = err
        if record["kind"] == "open":
            record = {**record, "pending": f"{PENDING}{uuid.uuid4().hex}"}
        self.append(record)
        self.warn(cause)
        return record.get("pending")

    def append(self, record: dict) -> None:
        """Add a record to this process's file, durably, numbered in the order of every process's appends (`seq`,
        kept under the lock: file times and clocks can disagree); a file or folder it names is copied into the
        spool first (the caller may delete it as soon as this returns)."""
        held = _size(self.folder) + (_size(Path(record["local"])) if "local" in record else 0)
        if held > self.max_bytes:
            raise SpoolFullError(f"{self.where} is unreachable and {held / 2**20:.0f} MB of this run's writes would "
                                 f"wait in {self.folder}, over tracking.spool_max_mb={self.max_bytes / 2**20:g}: "
                                 "bring the server back (the run replays them at its next start), or raise the "
                                 "limit if the storage has room")
        if "local" in record:
            copy = Path("files", uuid.uuid4().hex, Path(record["local"]).name)  # relative: the folder may move
            (self.folder / copy.parent).mkdir(parents=True)
            (shutil.copytree if Path(record["local"]).is_dir() else shutil.copy2)(record["local"], self.folder / copy)
            record = {**record, "local": str(copy)}
        with self.locked():
            counter = self.folder / SEQ_FILE
            seq = _number(counter) + 1
            atomic_write(counter, str(seq))
            with open(self.own, "ab") as f:
                if f.tell() and _torn(self.own):  # a write cut short: end its line, or this record would join it
                    f.write(b"\n")
                f.write(json.dumps({**record, "seq": seq}).encode() + b"\n")
                f.flush()
                os.fsync(f.fileno())
            sync_folder(self.folder)

    def replay(self) -> bool:
        """Send every waiting record, in the order they were appended across processes, if the server answers.
        A record the server rejects (its run deleted, a value it refuses) goes to the `rejected/` file with the
        reason, said once, and the rest go on. Returns whether none is left."""
        self.next_try = time.monotonic() + self.retry_s
        if not self.reachable():
            return False
        sent = 0
        try:
            with self.locked():
                ids, files = self.ids(), sorted(self.folder.glob("*.jsonl"))
                waiting = [(record.get("seq", float("inf")), i, record)
                           for i, path in enumerate(files) for record in records(path)]
                for _, _, record in sorted(waiting, key=lambda item: item[:2]):
                    if "local" in record:
                        record = {**record, "local": str(self.folder / record["local"])}
                        if not Path(record["local"]).exists():  # sent, then a kill cut the clean-up short
                            continue
                    try:
                        result = self.send(record, ids)
                    except Unreachable:
                        raise
                    except Exception as err:  # rejected: kept aside, never in the way of the others
                        self.reject(record, err)
                        continue
                    if record["kind"] == "open":
                        ids[record["pending"]] = result
                        atomic_write(self.folder / IDS_FILE, json.dumps(ids))
                    sent += 1
                for path in files:  # the records first: a kill before the copies go leaves only garbage
                    path.unlink()
                sync_folder(self.folder)
                shutil.rmtree(self.folder / "files", ignore_errors=True)
        except Unreachable as err:
            self.warn(err)
            return False
        if sent:
            log.warning("%s is back: replayed %d spooled writes from %s", self.where, sent, self.folder)
        return True

    def reject(self, record: dict, err: Exception) -> None:
        """Keep a record the server refused in `rejected/records.jsonl`, with why; say so once per process."""
        path = self.folder / REJECTED
        path.parent.mkdir(exist_ok=True)
        with open(path, "ab") as f:
            f.write(json.dumps({"record": record, "error": str(err)[:2000]}).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        if not self.rejected:
            log.warning("%s refused a spooled write (%s): it is kept in %s and the other writes go on", self.where,
                        str(err).splitlines()[0][:200], path)
        self.rejected += 1

    def ids(self) -> dict[str, str]:
        """Provisional run id -> the real one, for runs a replay of this folder has opened (`opened_runs`)."""
        return opened_runs(self.folder)

    def warn(self, err: Exception | None) -> None:
        """One line a minute at most, however many writes wait."""
        now = time.monotonic()
        if now - self.warned_at < WARN_EVERY_S:
            return
        self.warned_at = now
        count = 0
        for path in self.folder.glob("*.jsonl"):  # outside the lock: a replay may take a file away meanwhile
            try:
                count += len(records(path))
            except FileNotFoundError:
                continue
        cause = f" ({str(err)[:200]})" if err is not None else ""
        log.warning("%s is unreachable%s: %d writes wait in %s and are replayed when it is back, or at the next "
                    "start of this run", self.where, cause, count, self.folder)

    @contextmanager
    def locked(self) -> Iterator[None]:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def opened_runs(folder: Path) -> dict[str, str]:
    """Provisional run id -> the real one, for the runs a replay of spool `folder` has opened. A file that does not
    read as such a map (garbled) counts as empty: the replay opens those runs again, which finds them by name."""
    try:
        ids = json.loads((Path(folder) / IDS_FILE).read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return {}
    return {k: v for k, v in ids.items() if isinstance(v, str)} if isinstance(ids, dict) else {}


def records(path: Path) -> list[dict]:
    """The records of one spool file. A line that does not parse (cut short when its writer was killed
    mid-append, so never acknowledged; or garbled) is skipped, and the records after it are kept."""
    out = []
    for line in path.read_bytes().splitlines():
        try:
            record = json.loads(line.decode("utf-8"))
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("kind"), str):
            out.append(record)
    return out


def atomic_write(path: Path, text: str) -> None:
    """`text` into `path` whole or not at all, durably: written under a temporary name, fsynced, renamed, and the
    folder fsynced so that the rename survives a power loss."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    sync_folder(path.parent)


def sync_folder(folder: Path) -> None:
    """fsync a folder, so the names just created, renamed or removed in it are on disk."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _size(path: Path) -> int:
    """Bytes of a file, or of every file under a folder (0 when absent)."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def _number(path: Path) -> int:
    """The integer a counter file holds; 0 when it is absent or garbled."""
    try:
        return int(path.read_text(encoding="utf-8").strip())
    except (FileNotFoundError, ValueError):
        return 0


def _torn(path: Path) -> bool:
    """Whether `path` ends mid-line."""
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"
