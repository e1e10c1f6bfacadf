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

WARN_EVERY_S = 60.0
PENDING = "pending-"
IDS_FILE = "run_ids.json"

log = logging.getLogger(__name__)


class Unreachable(Exception):
    """The server could not be reached (as opposed to a write it rejected): the write can wait."""


class Spool:
    """One run's spool folder, as seen from one process.

    `send(record, ids)` delivers one record (`ids`: provisional run id -> real id) and returns the run's id for
    an `open` record; it raises `Unreachable` when the server is down. `reachable()` is a quick check that
    does not wait out the server's retries.
    """

    def __init__(self, folder: Path, send: Callable[[dict, dict], str | None], reachable: Callable[[], bool],
                 where: str, retry_s: float):
        self.folder, self.send, self.reachable, self.where = Path(folder), send, reachable, where
        self.retry_s = retry_s
        self.own = self.folder / f"{time.time_ns()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        self.next_try = 0.0
        self.warned_at = -WARN_EVERY_S

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
        """Add a record to this process's file, durably; a file or folder it names is copied into the spool
        first (the caller may delete it as soon as this returns)."""
        if "local" in record:
            copy = Path("files", uuid.uuid4().hex, Path(record["local"]).name)  # relative: the folder may move
            (self.folder / copy.parent).mkdir(parents=True)
            (shutil.copytree if Path(record["local"]).is_dir() else shutil.copy2)(record["local"], self.folder / copy)
            record = {**record, "local": str(copy)}
        with self.locked(), open(self.own, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def replay(self) -> bool:
        """Send every waiting record, oldest file first, if the server answers. Returns whether none is left."""
        self.next_try = time.monotonic() + self.retry_s
        if not self.reachable():
            return False
        sent = 0
        try:
            with self.locked():
                ids = self.ids()
                for path in sorted(self.folder.glob("*.jsonl")):
                    for record in records(path):
                        if "local" in record:
                            record["local"] = str(self.folder / record["local"])
                        result = self.send(record, ids)
                        if record["kind"] == "open":
                            ids[record["pending"]] = result
                            atomic_write(self.folder / IDS_FILE, json.dumps(ids))
                        sent += 1
                    for record in records(path):
                        if "local" in record:
                            shutil.rmtree((self.folder / record["local"]).parent, ignore_errors=True)
                    path.unlink()
        except Unreachable as err:
            self.warn(err)
            return False
        if sent:
            log.warning("%s is back: replayed %d spooled writes from %s", self.where, sent, self.folder)
        return True

    def ids(self) -> dict[str, str]:
        """Provisional run id -> the real one, for runs a replay has opened."""
        path = self.folder / IDS_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    def warn(self, err: Exception | None) -> None:
        """One line a minute at most, however many writes wait."""
        now = time.monotonic()
        if now - self.warned_at < WARN_EVERY_S:
            return
        self.warned_at = now
        count = sum(len(records(path)) for path in self.folder.glob("*.jsonl"))
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


def records(path: Path) -> list[dict]:
    """The records of one spool file. A last line cut short (its writer was killed mid-append, so it was never
    acknowledged) is dropped."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(f".{uuid.uuid4().hex}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
