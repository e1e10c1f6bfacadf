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
processes never replay the same record at once. A replay runs in a background thread of the process that writes,
in batches: consecutive metric records of a run go as one request, and the lock is let go between batches, so
training that goes on writing while a long outage is replayed waits for one batch at most. How far a replay got
is kept in the folder (`sent`, the sequence number of the last record delivered), so one cut short by a kill
goes on from there; whatever it sent after that is sent again, which stores nothing new.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

from coat.errors import UserError
from coat.locks import locked

WARN_EVERY_S = 60.0
PENDING = "pending-"
IDS_FILE = "run_ids.json"
SEQ_FILE = "sequence"  # the number of the last record appended, by any process
SENT_FILE = "sent"  # the number of the last record a replay delivered (or set aside as rejected)
BATCH_S = 0.25  # a replay lets the lock go after this long (and at least one request), so writers wait little
BATCH_METRICS = 500  # metrics merged into one request (MLflow's log_batch takes 1000)
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
        self.warned_at = -WARN_EVERY_S
        self.rejected = 0
        self.replayer: threading.Thread | None = None
        self.replayer_guard = threading.Lock()

    def waiting(self) -> bool:
        """Whether records wait to be replayed (in any process's file)."""
        return any(self.folder.glob("*.jsonl"))

    def write(self, record: dict) -> str | None:
        """Deliver `record` now, or spool it while the server is down or earlier records wait (a replay in the
        background sends them). Returns what `send` returns; for an `open` record that had to wait, a provisional
        id."""
        if not self.waiting():
            try:
                return self.send(record, self.ids())
            except Unreachable as err:
                self.warn(err)
        if record["kind"] == "open":
            record = {**record, "pending": f"{PENDING}{uuid.uuid4().hex}"}
        self.append(record)
        self.replay_in_background()
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
            seq = max(_number(counter), _number(self.folder / SENT_FILE)) + 1  # never at or below what was sent
            atomic_write(counter, str(seq))
            with open(self.own, "ab") as f:
                if f.tell() and _torn(self.own):  # a write cut short: end its line, or this record would join it
                    f.write(b"\n")
                f.write(json.dumps({**record, "seq": seq}).encode() + b"\n")
                f.flush()
                os.fsync(f.fileno())
            sync_folder(self.folder)

    def replay_in_background(self) -> None:
        """Start this process's replayer unless it runs: a daemon thread that replays every `retry_s` seconds
        until nothing waits, so the writer goes on meanwhile."""
        with self.replayer_guard:
            if self.replayer is None:
                self.replayer = threading.Thread(target=self._replay_until_empty, daemon=True,
                                                 name=f"coat-spool-{self.folder.name}")
                self.replayer.start()

    def _replay_until_empty(self) -> None:
        while True:
            if self.replay():
                with self.replayer_guard:  # under the guard: a record appended now starts a new replayer
                    if not self.waiting():
                        self.replayer = None
                        return
            else:
                time.sleep(max(self.retry_s, 0.1))

    def replay(self) -> bool:
        """Send every waiting record, in the order they were appended across processes, if the server answers, a
        batch per hold of the lock. A record the server rejects (its run deleted, a value it refuses) goes to the
        `rejected/` file with the reason, said once, and the rest go on. Returns whether none is left."""
        if not self.reachable():
            self.warn(None)
            return False
        sent = 0
        try:
            while True:
                with self.locked():
                    delivered = self._replay_batch()
                if delivered is None:
                    break
                sent += delivered
        except Unreachable as err:
            self.warn(err)
            return False
        if sent:
            log.warning("%s is back: replayed %d spooled writes from %s", self.where, sent, self.folder)
        return True

    def _replay_batch(self) -> int | None:
        """Under the lock: deliver the next records for `BATCH_S` seconds and move `sent` past them;
        returns how many records went, or None when none was left (the folder is then cleared)."""
        through = _number(self.folder / SENT_FILE, absent=-1)
        files = sorted(self.folder.glob("*.jsonl"))
        every = [r for path in files for r in records(path)]
        waiting = sorted((r for r in every if r.get("seq", 0) > through), key=lambda r: r.get("seq", 0))
        if not waiting:  # cleared in an order that a kill at any point leaves consistent, `sent` last
            for record in every:  # their own copies only: another process may be copying a new one in
                if "local" in record:
                    shutil.rmtree((self.folder / record["local"]).parent, ignore_errors=True)
            for path in files:
                path.unlink()
            sync_folder(self.folder)
            (self.folder / SENT_FILE).unlink(missing_ok=True)
            return None
        ids, count, started = self.ids(), 0, time.monotonic()
        try:
            for group in merged(waiting):
                self._deliver(group, ids)
                through, count = group[-1].get("seq", 0), count + len(group)
                if time.monotonic() - started > BATCH_S:
                    break
        finally:
            if count:
                atomic_write(self.folder / SENT_FILE, str(through))
        return count

    def _deliver(self, group: list[dict], ids: dict[str, str]) -> None:
        """Send records as one request; when the server refuses the merged request, each on its own, so that only
        the record it refuses is set aside. Raises `Unreachable`."""
        record = group[0] if len(group) == 1 else merge(group)
        if "local" in record:
            record = {**record, "local": str(self.folder / record["local"])}
            if not Path(record["local"]).exists():  # sent, then a kill cut the clean-up short
                return
        try:
            result = self.send(record, ids)
        except Unreachable:
            raise
        except Exception as err:  # rejected: kept aside, never in the way of the others
            if len(group) == 1:
                self.reject(record, err)
            else:
                for one in group:
                    self._deliver([one], ids)
            return
        if record["kind"] == "open":
            ids[record["pending"]] = result
            atomic_write(self.folder / IDS_FILE, json.dumps(ids))

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
        through, count = _number(self.folder / SENT_FILE, absent=-1), 0
        for path in self.folder.glob("*.jsonl"):  # outside the lock: a replay may take a file away meanwhile
            try:
                count += sum(r.get("seq", 0) > through for r in records(path))
            except FileNotFoundError:
                continue
        cause = f" ({str(err)[:200]})" if err is not None else ""
        log.warning("%s is unreachable%s: %d writes wait in %s and are replayed when it is back, or at the next "
                    "start of this run", self.where, cause, count, self.folder)

    def locked(self) -> AbstractContextManager[None]:
        self.folder.mkdir(parents=True, exist_ok=True)
        return locked(self.folder / ".lock")


def merged(waiting: list[dict]) -> list[list[dict]]:
    """`waiting` in order, as groups that go as one request each: consecutive metric-and-tag records of one run
    (up to `BATCH_METRICS` metrics), every other record alone."""
    groups: list[list[dict]] = []
    for record in waiting:
        last = groups[-1] if groups else None
        if (last is not None and record["kind"] == "log" and last[0]["kind"] == "log"
                and record.get("run") == last[0].get("run")
                and sum(len(r.get("metrics", [])) for r in last) + len(record.get("metrics", [])) <= BATCH_METRICS):
            last.append(record)
        else:
            groups.append([record])
    return groups


def merge(group: list[dict]) -> dict:
    """One `log` record holding the metrics and tags of `group` (a later tag value wins, as it would have)."""
    return {"kind": "log", "run": group[0]["run"], "metrics": [m for r in group for m in r.get("metrics", [])],
            "tags": {k: v for r in group for k, v in r.get("tags", {}).items()}}


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


def _number(path: Path, absent: int = 0) -> int:
    """The integer a counter file holds; `absent` when it is absent or garbled."""
    try:
        return int(path.read_text(encoding="utf-8").strip())
    except (FileNotFoundError, ValueError):
        return absent


def _torn(path: Path) -> bool:
    """Whether `path` ends mid-line."""
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"
