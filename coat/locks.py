"""Exclusive locks on shared files, and a check that the storage under them honours locks at all.

The feature store's ledger and quarantine, the mixture manifest and the tracking spool are written by several
processes, often on several hosts, under `flock`. On a local disk and on NFSv4 (EFS included) that excludes
across hosts. Elsewhere it silently does not: NFS mounted with `nolock` or `local_lock=flock|all` keeps locks on
the host that took them, Lustre mounted with `localflock` likewise, and Lustre without `flock` and many FUSE file
systems refuse the call (ENOSYS). `check_locking` finds those before any compute and names the mount and the fix.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from coat.errors import UserError

# errno values a file system answers flock with when it does not lock at all.
UNSUPPORTED = frozenset({errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL})
MOUNTS = Path("/proc/mounts")


class LockingUnavailableError(UserError, OSError):
    """Shared storage on which `flock` does not exclude other hosts, or fails."""


@contextmanager
def locked(lock_file: Path) -> Iterator[None]:
    """Hold an exclusive `flock` on `lock_file` (created if absent) until the block ends, once its folder has
    passed `check_locking`."""
    check_locking(lock_file.parent)
    with _flock(lock_file):
        yield


@contextmanager
def _flock(lock_file: Path) -> Iterator[None]:
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def mount_of(path: Path, mounts: str) -> tuple[str, str, set[str]]:
    """(mount point, file system type, mount options) of the mount holding `path`, from a /proc/mounts text."""
    best = ("/", "", set())
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        point = fields[1].replace("\\040", " ")
        if (path == Path(point) or Path(point) in path.parents) and len(point) >= len(best[0]):
            best = (point, fields[2], set(fields[3].split(",")))
    return best


def local_only(fstype: str, options: set[str]) -> str | None:
    """The mount option that keeps this file system's locks on one host, else None."""
    if fstype.startswith("nfs"):
        return next((o for o in ("nolock", "local_lock=flock", "local_lock=all") if o in options), None)
    if fstype == "lustre":
        return "localflock" if "localflock" in options else None if "flock" in options else "no flock option"
    return None


@functools.cache
def check_locking(folder: Path) -> None:
    """Refuse storage whose locks do not exclude other hosts, or that refuses `flock`: the mount's options first
    (/proc/mounts), then a real lock taken on a probe file in `folder` (created if absent). Once per folder and
    process.

    Raises:
        LockingUnavailableError: naming the folder, the mount, its type and the fix.
    """
    folder.mkdir(parents=True, exist_ok=True)
    folder = folder.resolve()  # the mount a link leads to
    point, fstype, options = mount_of(folder, MOUNTS.read_text() if MOUNTS.is_file() else "")
    where = f"{folder} is on {point} ({fstype or 'unknown file system'})"
    if option := local_only(fstype, options):
        raise LockingUnavailableError(
            f"{where}, mounted with {option}: its locks do not exclude other hosts, so concurrent writers would "
            "tear shared files; remount it with cross-host locks (NFSv4 without local_lock, Lustre with -o flock) "
            "or put this storage on a file system that has them")
    probe = folder / f".coat-lock-probe-{os.getpid()}"
    try:
        with _flock(probe):
            pass
    except OSError as err:
        if err.errno not in UNSUPPORTED:
            raise
        raise LockingUnavailableError(
            f"{where} refuses file locks ({os.strerror(err.errno)}): put this storage on a file system that "
            "supports flock (a local disk, NFSv4, Lustre mounted with -o flock)") from None
    finally:
        probe.unlink(missing_ok=True)
