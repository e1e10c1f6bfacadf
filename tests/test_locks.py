"""Storage whose locks do not exclude other hosts is refused before any compute. NFS, Lustre and FUSE mounts
cannot exist on this machine: their /proc/mounts lines are real ones written to a file that stands in for it, and
a file system that refuses flock is flock raising the errno Lustre and FUSE give."""

import errno
import fcntl
import os
from pathlib import Path

import pytest

from coat import locks
from coat.data.precompute import precompute
from coat.data.store import FeatureStore
from coat.locks import LockingUnavailableError, check_locking, local_only, mount_of

MOUNTS = """\
/dev/nvme0n1p1 / ext4 rw,relatime,discard 0 0
fs-0123456789abcdef0.efs.us-west-2.amazonaws.com:/ /mnt/shared nfs4 rw,relatime,vers=4.1,hard,noresvport,\
proto=tcp,timeo=600,retrans=2,sec=sys,clientaddr=10.0.0.12,local_lock=none,addr=10.0.0.5 0 0
filer:/export /mnt/old nfs rw,relatime,vers=3,rsize=65536,wsize=65536,hard,nolock,proto=tcp,timeo=600,\
retrans=2,sec=sys,mountaddr=10.0.0.7,mountvers=3,mountproto=tcp,local_lock=all,addr=10.0.0.7 0 0
filer:/scratch /mnt/shared/scratch nfs4 rw,relatime,vers=4.2,hard,proto=tcp,local_lock=flock,addr=10.0.0.8 0 0
10.0.0.1@o2ib:/lustre /mnt/lustre lustre rw,flock,lazystatfs 0 0
10.0.0.1@o2ib:/scratch /mnt/lscratch lustre rw,localflock,lazystatfs 0 0
10.0.0.1@o2ib:/home /mnt/lhome lustre rw,lazystatfs 0 0
data\\040disk /mnt/with\\040space ext4 rw 0 0
"""


@pytest.mark.parametrize(("path", "point", "fstype", "refused_by"), [
    ("/mnt/shared/coat/store", "/mnt/shared", "nfs4", None),  # EFS: NFSv4 locks reach the server
    ("/mnt/shared/scratch/runs", "/mnt/shared/scratch", "nfs4", "local_lock=flock"),  # the longest mount wins
    ("/mnt/old/data", "/mnt/old", "nfs", "nolock"),
    ("/mnt/lustre/coat", "/mnt/lustre", "lustre", None),
    ("/mnt/lscratch/coat", "/mnt/lscratch", "lustre", "localflock"),
    ("/mnt/lhome/coat", "/mnt/lhome", "lustre", "no flock option"),
    ("/mnt/with space/x", "/mnt/with space", "ext4", None),
    ("/home/user", "/", "ext4", None),
])
def test_mounts_whose_locks_stay_on_one_host_are_told_apart(path, point, fstype, refused_by):
    found = mount_of(Path(path), MOUNTS)
    assert found[:2] == (point, fstype)
    assert local_only(found[1], found[2]) == refused_by


def test_a_local_disk_passes_and_a_run_on_storage_without_locks_stops_before_any_compute(tmp_path, monkeypatch):
    check_locking.cache_clear()
    check_locking(tmp_path / "ok")
    assert (tmp_path / "ok").is_dir() and not any((tmp_path / "ok").iterdir()), "the probe leaves nothing behind"

    mounts = tmp_path / "mounts"
    mounts.write_text(f"filer:/export {tmp_path / 'nfs'} nfs rw,vers=3,nolock,local_lock=all 0 0\n")
    monkeypatch.setattr(locks, "MOUNTS", mounts)
    check_locking.cache_clear()
    with pytest.raises(LockingUnavailableError, match=rf"{tmp_path / 'nfs'}.*\(nfs\), mounted with nolock.*remount"):
        precompute(tmp_path / "absent.jsonl", ["mel"], tmp_path / "nfs" / "store", progress=False)
    assert not list((tmp_path / "nfs" / "store").iterdir()), "nothing written but the probe's folder"


def test_storage_that_refuses_flock_is_named_with_the_fix(tmp_path, monkeypatch):
    real = fcntl.flock

    def refuse(fd, operation):
        if str(tmp_path / "lustre") in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSYS, "Function not implemented")
        return real(fd, operation)

    monkeypatch.setattr(fcntl, "flock", refuse)
    check_locking.cache_clear()
    with pytest.raises(LockingUnavailableError, match=r"refuses file locks \(Function not implemented\).*-o flock"):
        FeatureStore(tmp_path / "lustre").quarantine([{"clip_hash": "a", "path": "a.wav", "reason": "x"}])
    check_locking.cache_clear()
