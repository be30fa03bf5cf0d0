"""Disk space reserved up front for a store written through its map (LMDB's `writemap`).

With writemap, LMDB stores pages straight into a shared mapping of data.mdb and sets the file's length
to the map's (ftruncate): past the data, a sparse file. A store into a hole needs a block, and on a full
disk the kernel has none: the process gets SIGBUS and dies. So a store opened with writemap has every
byte of its map allocated first (the fallocate system call), and its map grows only once the growth is
allocated; where that is refused, the write fails as on a full disk (an error) and the process lives.
Only where a block once allocated is rewritten in place does that hold (IN_PLACE: ext4 with extents,
tmpfs). Not on copy-on-write file systems (btrfs, zfs, xfs's reflinks) or overlays, and not where
fallocate is emulated (ext2/3, ext4 without extents: glibc's posix_fallocate writes zeros there, over
what other processes write meanwhile), so the real system call is used and a store elsewhere is written
with pwrite().

A writemap open or map change sets the file's length, so each runs under an exclusive flock of
data.mdb (`Space.locked`) and never makes the file shorter than it is: another sidecar's larger map on
the same store keeps its bytes. A store written with pwrite() lengthens the file as it commits, so it
commits under a shared flock (`Space.locked(shared=True)`): no map change cuts a commit's pages short.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import psutil

IN_PLACE = frozenset({"ext4", "tmpfs"})
_fallocate = getattr(ctypes.CDLL(None, use_errno=True), "fallocate", None)   # Linux's; None: no reservation
if _fallocate is not None:
    _fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)


def in_place(path: Path) -> bool:
    """Whether the file system holding `path` keeps a file's allocated blocks when they are rewritten."""
    real = os.path.realpath(path)
    found = None
    try:
        partitions = psutil.disk_partitions(all=True)
    except OSError:
        return False
    for part in partitions:   # the longest mount point holding the path; of equal ones the last (on top)
        mount = part.mountpoint.rstrip("/") or "/"
        if (real == mount or real.startswith(mount.rstrip("/") + "/")) and (found is None or len(mount) >= len(found[0])):
            found = (mount, part.fstype)
    return found is not None and found[1] in IN_PLACE


class Space:
    """data.mdb's own descriptor: for its locks and its reservation (`upto`: bytes known allocated)."""

    def __init__(self, data: Path):
        self.fd = os.open(data, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.upto = 0
        self.lacking = 0   # the free space the last refused reservation needed

    @contextmanager
    def locked(self, shared: bool = False) -> Iterator[None]:
        """The flock: exclusive for a change of the file's length, shared for a pwrite() commit."""
        fcntl.flock(self.fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def length(self) -> int:
        return os.fstat(self.fd).st_size

    def is_file(self, data: Path) -> bool:
        """Whether `data` is still the file this descriptor holds (`sidecar cache clear` moves it aside)."""
        try:
            st, own = os.stat(data), os.fstat(self.fd)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)

    def reserve(self, size: int) -> bool:
        """Allocate the file's first `size` bytes (holes included); False where the disk refuses (too little
        free, a quota, an I/O error, no real fallocate): the store then does without what it needed them for."""
        if size <= self.upto:
            return True
        if _fallocate is None:
            return False
        try:
            st, disk = os.fstat(self.fd), os.fstatvfs(self.fd)
        except OSError:
            return False
        # refused up front, as a failed fallocate keeps a part: the room the file lacks (blocks already
        # allocated, by this process before or by another sidecar, need none)
        need = max(0, size - st.st_blocks * 512)
        if need > disk.f_bavail * disk.f_frsize:
            self.lacking = need
            return False
        while _fallocate(self.fd, 0, self.upto, size - self.upto) != 0:   # what this descriptor allocated stays so
            if ctypes.get_errno() != errno.EINTR:   # (tmpfs stops at a pending signal)
                self.lacking = size - self.upto
                return False
        self.upto = size
        return True

    def close(self) -> None:
        os.close(self.fd)
