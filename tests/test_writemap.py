"""The proxy's store written through its map (writemap), with its disk reserved up front (reserve.py).

- test_the_map_is_all_allocated_disk: a writemap store grows its map as data comes, never maps a hole
  (allocated bytes >= the file's length), and holds the map within the budget while the data fits.
- test_a_full_disk_is_a_failed_write_never_a_bus_error: on a full tmpfs, a bare writemap LMDB dies of
  SIGBUS (the defect this prevents); the store keeps committing into its reserved map, then fails a write
  that needs more with an error naming the fix, lives, and writes again once space returns.
- test_two_sidecars_never_shorten_the_file: a second writemap store opened on a larger one's file keeps
  the file's length; the first then writes to its map's end, and the second adopts the first's growth.
- test_no_reservation_no_writemap: where the disk cannot hold the first map, or has no real fallocate
  (ext4 without extents), or the mount on top is another kind (ramfs over tmpfs), the store is written
  with pwrite(); in the proxy (`sidecar serve`) the store is a writemap one where a file system allows it.
- test_a_large_old_store_is_upgraded_with_pwrite: an upgrade that rewrites more than the first map holds
  is done with pwrite() (it failed with MDB_MAP_FULL, and the proxy ran uncached); the next open maps it.
- test_allocated_blocks_need_no_room: on a nearly full disk, a store whose map is allocated already opens
  as a writemap one again, and a sidecar adopts another's growth that is allocated already.
Real processes where a failure would be a signal; tmpfs mounts are skipped where mount is not permitted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from agent_sidecar.proxy.reserve import in_place
from agent_sidecar.proxy.store import START_MAP, Lmdb

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
MB = 1 << 20
pytestmark = pytest.mark.timeout(120)

# A store in a child process, driven by lines on stdin: "put N" writes N values of 1 MB in their own commits
# (stopping at the first error), "read" counts them; each line answers one JSON line.
DRIVER = r"""
import json, os, sys
from agent_sidecar.proxy.store import Lmdb, StoreError
env = Lmdb(__import__("pathlib").Path(sys.argv[1]), 1 << 20, writemap_within=int(sys.argv[2]))
tag, n = b"#" + sys.argv[3].encode() + b"-", 0

def state(**more):
    st = os.stat(env.path / "data.mdb")
    return {"writemap": env.writemap, "length": st.st_size, "allocated": st.st_blocks * 512,
            "map": env.env.info()["map_size"], **more}

print(json.dumps(state()), flush=True)
for line in sys.stdin:
    word, *args = line.split()
    if word == "put":
        error = None
        for _ in range(int(args[0])):
            value = os.urandom(1 << 20)
            try:
                env.write_now(lambda txn, key=b"%s-%d" % (tag, n), value=value: txn.put(key, value), 1 << 20)
            except StoreError as exc:
                error = str(exc)
                break
            n += 1
        print(json.dumps(state(written=n, error=error)), flush=True)
    elif word == "read":
        count = env.read(lambda txn: sum(1 for key in txn.cursor().iternext(values=False) if key.startswith(tag)))
        print(json.dumps(state(read=count)), flush=True)
env.close()
"""

BARE = r"""
import lmdb, os, sys
env = lmdb.open(sys.argv[1], map_size=64 << 20, writemap=True)
for n in range(64):
    with env.begin(write=True) as txn:
        txn.put(b"%d" % n, os.urandom(1 << 20))
print("every write committed")
"""


class Driven:
    def __init__(self, state: Path, within: int, tag: str):
        self.proc = subprocess.Popen([PY, "-c", DRIVER, str(state), str(within), tag], cwd=ROOT, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.opened = self._answer()

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"the store's process ended ({self.proc.wait()}): {self.proc.stderr.read()}")
        return json.loads(line)

    def __call__(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> int:
        self.proc.stdin.close()
        code = self.proc.wait(timeout=60)
        assert code == 0, (code, self.proc.stderr.read())
        return code


@pytest.fixture
def in_place_dir(tmp_path):
    """A directory on a file system that keeps allocations: the test's own, else /dev/shm."""
    if in_place(tmp_path):
        yield tmp_path
        return
    if not (os.path.isdir("/dev/shm") and in_place(Path("/dev/shm"))):
        pytest.skip("no ext4, xfs or tmpfs directory here: the store is written with pwrite() on this machine")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        yield Path(shm)


def small_tmpfs(tmp_path: Path, size_mb: int) -> Path:
    mount = tmp_path / f"tmpfs-{size_mb}m"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(mount)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a {size_mb} MB tmpfs here ({done.stderr.decode().strip()}); needs root")
    return mount


@pytest.fixture
def tmpfs(tmp_path):
    mounts: list[Path] = []
    yield lambda size_mb: mounts.append(small_tmpfs(tmp_path, size_mb)) or mounts[-1]
    for mount in mounts:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(mount: Path, leave: int) -> Path:
    """A file taking all but `leave` bytes of the file system."""
    st = os.statvfs(mount)
    filler = mount / "filler"
    with filler.open("wb") as out:
        out.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return filler


def test_the_map_is_all_allocated_disk(in_place_dir):
    env = Lmdb(in_place_dir / "state", 1 << 20, writemap_within=48 * MB)
    data = env.path / "data.mdb"
    try:
        assert env.writemap, "a writemap store on a file system that keeps allocations"
        assert data.stat().st_size == START_MAP
        lengths = []
        for n in range(40):   # 40 MB in commits of 1 MB: the map grows, within the budget
            env.write_now(lambda txn, n=n: txn.put(b"%d" % n, os.urandom(MB)), MB)
            st = data.stat()
            assert st.st_blocks * 512 >= st.st_size, f"a hole in the map at {n} MB written: {st}"
            assert st.st_size == env.env.info()["map_size"]
            lengths.append(st.st_size)
        assert lengths[-1] > START_MAP and max(lengths) <= 48 * MB, lengths
        assert lengths == sorted(lengths)
        assert env.read(lambda txn: txn.stat()["entries"]) == 40 + len(Lmdb.DATABASES)
    finally:
        env.close()


def test_a_full_disk_is_a_failed_write_never_a_bus_error(tmp_path, tmpfs):
    bare = tmpfs(32)
    fill(bare, 8 * MB)
    died = subprocess.run([PY, "-c", BARE, str(bare)], capture_output=True, timeout=60)
    assert died.returncode == -signal.SIGBUS, died   # what the reservation is for

    mount = tmpfs(48)
    store = Driven(mount / "state", 1 << 30, "a")
    assert store.opened["writemap"] and store.opened["map"] == START_MAP
    filler = fill(mount, 4 * MB)
    done = store("put 40")
    assert 8 <= done["written"] < 40, done   # the reserved map takes its writes on a full disk
    assert "to grow it by; free disk space there" in done["error"], done
    assert done["allocated"] >= done["length"], done
    assert store("read")["read"] == done["written"]
    filler.unlink()   # space returns: the store grows and writes again
    again = store("put 16")
    assert again["error"] is None and again["written"] == done["written"] + 16, again
    assert again["map"] > done["map"] and again["allocated"] >= again["length"], again
    store.close()


def test_two_sidecars_never_shorten_the_file(in_place_dir):
    state = in_place_dir / "state"
    first = Driven(state, 1 << 30, "first")
    grown = first("put 30")
    assert grown["error"] is None and grown["map"] > 32 * MB, grown
    second = Driven(state, 2 * MB, "second")   # its own first map would be 2 MB
    assert second.opened["writemap"] and second.opened["length"] == grown["length"], second.opened
    assert second("put 1")["length"] == grown["length"]
    tail = first("put 12")   # into the end of its map, then past it
    assert tail["error"] is None and tail["length"] > grown["length"], tail
    adopted = second("put 1")   # the first's growth: taken on, not cut back
    assert adopted["error"] is None and adopted["map"] == tail["length"] == adopted["length"], adopted
    assert second("read")["read"] == 2 and first("read")["read"] == 42
    first.close()
    second.close()


def test_no_reservation_no_writemap(tmp_path, tmpfs):
    mount = tmpfs(8)
    fill(mount, 4 * MB)   # less than a first map
    env = Lmdb(mount / "state", 1 << 20, writemap_within=1 << 30)
    try:
        assert not env.writemap and env.space is not None   # pwrite, under the shared lock
        env.write_now(lambda txn: txn.put(b"k", b"v" * 1000), 1000)
        assert env.read(lambda txn: txn.get(b"k")) == b"v" * 1000
    finally:
        env.close()


def test_the_proxys_store_is_a_writemap_one(tmp_path, in_place_dir):
    from test_state_store import Rig
    rig = Rig(tmp_path, in_place_dir / "proxy-state")
    try:
        assert rig.call("one question")[0] == 200
        data = in_place_dir / "proxy-state" / "lmdb" / "data.mdb"
        st = data.stat()
        assert st.st_size == START_MAP and st.st_blocks * 512 >= st.st_size, st   # the first map, all of it allocated
        assert rig.call("one question")[1].get("x-sidecar-cache") == "hit"
    finally:
        rig.close()


def test_a_ramfs_over_a_tmpfs_is_not_in_place(tmp_path, tmpfs):
    mount = tmpfs(8)
    assert in_place(mount)
    assert subprocess.run(["mount", "-t", "ramfs", "ramfs", str(mount)], capture_output=True).returncode == 0
    try:
        assert not in_place(mount) and not in_place(mount / "state")
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.fixture
def ext4(tmp_path):
    """A 32 MB ext4 file system in a file, mounted: ext4(features) makes one (e.g. "^extent")."""
    mounts: list[Path] = []

    def make(features: str = "") -> Path:
        image, mount = tmp_path / f"ext4-{len(mounts)}.img", tmp_path / f"ext4-{len(mounts)}"
        mount.mkdir()
        made = subprocess.run(["mkfs.ext4", "-q", "-F", *(["-O", features] if features else []), str(image), "32M"],
                              capture_output=True)
        if made.returncode != 0 or subprocess.run(["mount", "-o", "loop", str(image), str(mount)],
                                                  capture_output=True).returncode != 0:
            pytest.skip("cannot make and mount an ext4 image here (needs mkfs.ext4, loop devices and root)")
        mounts.append(mount)
        return mount
    yield make
    for mount in mounts:
        subprocess.run(["umount", str(mount)], check=True)


def test_ext4_without_extents_has_no_real_fallocate(ext4):
    mount = ext4("^extent,^flex_bg,^huge_file,^64bit")   # as ext3 is: glibc would fake fallocate with writes
    assert in_place(mount)   # ext4 by name; its fallocate is what tells
    env = Lmdb(mount / "state", 1 << 20, writemap_within=1 << 30)
    try:
        assert not env.writemap
        env.write_now(lambda txn: txn.put(b"k", b"v"), 1)
    finally:
        env.close()


def test_a_refused_reservation_takes_no_space(ext4):
    from agent_sidecar.proxy.reserve import Space
    mount = ext4()
    space = Space(mount / "data.mdb")
    try:
        assert space.reserve(4 * MB) and os.stat(mount / "data.mdb").st_blocks * 512 >= 4 * MB
        before = os.statvfs(mount).f_bavail
        assert not space.reserve(200 * MB)   # more than the disk has
        assert os.statvfs(mount).f_bavail == before and space.length() == 4 * MB and space.upto == 4 * MB
    finally:
        space.close()


def test_a_large_old_store_is_upgraded_with_pwrite(in_place_dir):
    from test_state_versions import write_format_1
    import lmdb
    import struct
    state = in_place_dir / "old"
    write_format_1(state)
    env = lmdb.open(str(state / "lmdb"), map_size=64 << 20, max_dbs=9)
    db = {name: env.open_db(name.encode()) for name in ("responses", "access", "lru")}
    with env.begin(write=True) as txn:   # 28 MB more of format-1 entries: more than a first map
        for n in range(600):
            key, used = b"old-%04d" % n, struct.pack(">d", 1e9 + n)
            txn.put(key, os.urandom(48_000), db=db["responses"])
            txn.put(key, used + struct.pack(">Q", 48_000), db=db["access"])
            txn.put(used + key, b"", db=db["lru"])
    env.close()
    store = Lmdb(state, 1 << 20, writemap_within=1 << 30)
    try:
        assert not store.writemap   # the upgrade needed more than the first map: pwrite
        assert store.read(lambda txn: txn.stat(store.db["responses"])["entries"]) == 0   # keyed in form 1: dropped
        assert store.read(lambda txn: txn.get(b"s:conv-old", db=store.db["sessions"])) is not None
    finally:
        store.close()
    store = Lmdb(state, 1 << 20, writemap_within=1 << 30)
    try:
        assert store.writemap   # upgraded: the next open writes through the map
        assert store.read(lambda txn: txn.get(b"s:conv-old", db=store.db["sessions"])) is not None
    finally:
        store.close()


def test_allocated_blocks_need_no_room(tmp_path, tmpfs):
    mount = tmpfs(64)
    state = mount / "state"
    first = Driven(state, 1 << 30, "first")
    second = Driven(state, 1 << 30, "second")
    grown = second("put 24")   # the second grows the map well past the first's
    assert grown["error"] is None and grown["map"] > first.opened["map"], grown
    fill(mount, 4 * MB)   # less free than either map
    adopted = first("put 1")
    assert adopted["error"] is None and adopted["map"] == grown["length"], adopted
    first.close()
    second.close()
    again = Driven(state, 1 << 30, "again")   # a restart on the nearly full disk
    assert again.opened["writemap"] and again.opened["map"] == grown["length"], again.opened
    assert again("put 1")["error"] is None
    again.close()
