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

import lmdb
import psutil

IN_PLACE = frozenset({"ext4", "tmpfs"})
MB = 1 << 20
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


def extent(env: lmdb.Environment, psize: int | None = None) -> int:
    """Bytes of data.mdb's pages in use, as last committed (its page size, when known already)."""
    return (env.info()["last_pgno"] + 1) * (psize or env.stat()["psize"])


class Space:
    """data.mdb's own descriptor: for its locks and its reservation (`upto`: bytes known allocated), and the
    map of a store written through it (`map`: its size, as this process last set it)."""

    def __init__(self, data: Path):
        self.data = data
        self.fd = os.open(data, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.upto = 0
        self.map = 0
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

    def is_file(self) -> bool:
        """Whether data.mdb is still the file this descriptor holds (`sidecar cache clear` moves it aside)."""
        try:
            st, own = os.stat(self.data), os.fstat(self.fd)
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

    def covered(self) -> bool:
        """Whether the whole map is allocated (a map adopted while the disk was full may not be yet)."""
        return self.map <= self.upto or self.reserve(self.map)

    def open_mapped(self, path: Path, first: int, options: dict) -> lmdb.Environment | None:
        """lmdb.open with writemap and a map of at least `first` bytes (never shorter than the file: another
        sidecar's map may reach its end), all of it allocated; None, with nothing open, where it cannot be."""
        env = None
        try:
            with self.locked():
                env = lmdb.open(str(path), map_size=max(self.length(), first), writemap=True, **options)
                size = env.info()["map_size"]   # at least the data's extent
                if self.is_file() and self.reserve(size):   # the very file LMDB maps
                    self.map = size
                    return env
        except OSError:
            pass
        if env is not None:
            env.close()
        return None

    def adopt(self, env: lmdb.Environment) -> None:
        """Take on the map another process grew (MapResizedError): the whole file, allocated where the disk
        allows (else writes wait for room: `covered`)."""
        with self.locked():
            size = max(self.length(), self.map)
            self.reserve(size)
            env.set_mapsize(size)
            self.map = env.info()["map_size"]

    def grow(self, env: lmdb.Environment, size: int | None, within: int) -> bool:
        """A commit of `size` bytes (if known) found the map full: grow it, allocated first; False (`lacking`
        says the room needed) where the disk has not even the room this commit needs."""
        with self.locked():
            length = self.length()
            wanted, least = self._next(env, size, within)
            new = next((n for n in (max(wanted, length), max(least, length)) if self.reserve(n)), None)
            if new is None:
                return False
            env.set_mapsize(new)
            self.map = env.info()["map_size"]
        return True

    def _next(self, env: lmdb.Environment, size: int | None, within: int) -> tuple[int, int]:
        """The next map, and the least this commit needs (room for twice its bytes): half as large again (an
        eighth past `within`, the budget), held within the budget while the data fits; whole megabytes."""
        old = self.map
        least = max(extent(env) + 2 * (size or MB), old) + MB
        new = max(old + (old // 2 if old < within else old // 8), least)
        if old < within:
            new = max(min(new, within), least)
        return -(-new // MB) * MB, -(-least // MB) * MB

    def close(self) -> None:
        os.close(self.fd)
