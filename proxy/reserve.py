"""Disk space reserved up front for a store written through its map (LMDB's `writemap`).

With writemap, LMDB stores pages straight into a shared mapping of data.mdb and sets the file's length
to the map's (ftruncate): past the data, a sparse file. A store into a hole needs a block, and on a full
disk the kernel has none: the process gets SIGBUS and dies. So a store opened with writemap has every
byte of its map allocated first (posix_fallocate), and its map grows only once the growth is allocated;
where that is refused, the write fails as on a full disk (an error) and the process lives. Only file
systems that rewrite blocks in place keep such an allocation (IN_PLACE); on copy-on-write ones (btrfs,
zfs) and overlays a rewrite needs new blocks, so a store there is written with pwrite().

A writemap open or map change sets the file's length, so each runs under an exclusive flock of
data.mdb (`Space.locked`) and never makes the file shorter than it is: another sidecar's larger map on
the same store keeps its bytes.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import psutil

IN_PLACE = frozenset({"ext2", "ext3", "ext4", "xfs", "tmpfs"})


def in_place(path: Path) -> bool:
    """Whether the file system holding `path` keeps a file's allocated blocks when they are rewritten."""
    real = os.path.realpath(path)
    best = None
    try:
        partitions = psutil.disk_partitions(all=True)
    except OSError:
        return False
    for part in partitions:
        mount = part.mountpoint.rstrip("/") or "/"
        if (real == mount or real.startswith(mount.rstrip("/") + "/")) and (best is None or len(mount) > len(best[0])):
            best = (mount, part.fstype)
    return best is not None and best[1] in IN_PLACE


class Space:
    """data.mdb's own descriptor: for its lock and its reservation (`upto`: bytes known allocated)."""

    def __init__(self, data: Path):
        self.fd = os.open(data, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.upto = 0

    @contextmanager
    def locked(self) -> Iterator[None]:
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def length(self) -> int:
        return os.fstat(self.fd).st_size

    def reserve(self, size: int) -> bool:
        """Allocate the file's first `size` bytes (holes included); False where the disk refuses (full,
        a quota, an I/O error): the store then does without what it needed them for."""
        if size <= self.upto:
            return True
        try:   # what this descriptor allocated stays allocated: only the rest
            os.posix_fallocate(self.fd, self.upto, size - self.upto)
        except OSError:
            return False
        self.upto = size
        return True

    def close(self) -> None:
        os.close(self.fd)
