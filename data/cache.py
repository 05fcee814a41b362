"""A node's cache of verified remote shards, so an http(s) or pipe: source is fetched once, not once per epoch.

    cache = ShardCache("/local/scratch/cloze-cache", max_bytes=200 << 30)

Entries are named `<sha256>.tar` after the manifest's hash of the shard, never after a name from the data, so two
sources holding the same shard share one entry and no manifest can choose a path in the folder. An entry is only
ever written whole and verified: the fetch streams into a temporary file in the folder while it is hashed, and
only a file of the manifest's size and sha256 is fsync'ed and renamed (atomically) to its entry name. A shard
that does not match is never cached.

Every rank and loader worker of a node may share one folder:
- writers never collide: each writes its own temporary file; two that fetch the same shard at once both rename
  the same bytes into place;
- eviction (least recently used first, by modification time, which a hit refreshes) runs under an flock of
  `<folder>/.lock` after each new entry, until the entries total at most max_bytes; temporary files are not
  counted, and those older than a fetch can live (a crashed writer's) are removed;
- a reader opens an entry, then reads it: an entry evicted meanwhile stays readable through the open file.

An entry is re-verified at every open (size and sha256, one pass over a local file): a damaged or replaced entry
is removed and the shard fetched again, so a bad cache costs time, never wrong data.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import re
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

_ENTRY_RE = re.compile(r"^[0-9a-f]{64}\.tar$")
_TEMP_PREFIX = ".fetch-"
_LOCK_NAME = ".lock"
_CHUNK = 1 << 20
log = logging.getLogger("cloze.data")


@dataclass(frozen=True)
class ShardCache:
    """A folder of verified shards bounded in size; picklable, so loader workers get it with their sources."""

    folder: Path
    max_bytes: int
    """The entries (verified shards) never total more than this after an insertion; a shard larger than this is
    read without being cached."""
    stale_s: float = 3600.0
    """A temporary file untouched for this long belongs to a writer that died; eviction removes it."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "folder", Path(self.folder))
        if self.max_bytes < 1:
            raise ValueError(f"shard cache size bound {self.max_bytes} bytes must be >= 1")

    def prepare(self) -> None:
        """Create the folder (private to the user) when it is missing; OSError when it cannot be."""
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)

    def entry(self, sha256: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise ValueError(f"not a sha256: {sha256[:80]!r}")
        return self.folder / f"{sha256}.tar"

    # ----- reading ------------------------------------------------------------------------------------------
    def open(self, sha256: str, size: int) -> BinaryIO | None:
        """The entry opened for reading at offset 0, re-verified (a regular file of `size` bytes with that
        sha256), its last use refreshed; None when there is none or it was damaged (then it is removed)."""
        path = self.entry(sha256)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:  # a symlink was put in place of an entry: never followed
                self._drop(path, None, "is a symbolic link")
            return None
        f = os.fdopen(fd, "rb")
        try:
            info = os.fstat(fd)
            problem = ""
            if not stat.S_ISREG(info.st_mode):
                problem = "is not a regular file"
            elif info.st_size != size:
                problem = f"has {info.st_size} bytes, the manifest says {size}"
            elif _sha256_of(f) != sha256:
                problem = "does not match its sha256"
            if problem:
                f.close()
                self._drop(path, info, problem)
                return None
            f.seek(0)
            with contextlib.suppress(OSError):  # last use, for eviction; a read-only folder just forgets it
                os.utime(fd)
            return f
        except BaseException:
            f.close()
            raise

    def _drop(self, path: Path, opened: os.stat_result | None, problem: str) -> None:
        """Remove a damaged entry, unless another process has meanwhile renamed a good one into its place."""
        log.warning("shard cache entry %s %s: removed, the shard is fetched again", path, problem)
        with self._locked():
            try:
                now = os.lstat(path)
            except FileNotFoundError:
                return
            if opened is None or (now.st_ino, now.st_dev) == (opened.st_ino, opened.st_dev):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    # ----- writing ------------------------------------------------------------------------------------------
    def fits(self, size: int) -> bool:
        return size <= self.max_bytes

    @contextlib.contextmanager
    def new_entry(self) -> Iterator[PendingEntry]:
        """A temporary file in the folder to fetch into; its commit() makes it an entry, otherwise it is removed
        when the block ends."""
        self.prepare()
        fd, name = tempfile.mkstemp(prefix=_TEMP_PREFIX, dir=self.folder)
        pending = PendingEntry(self, os.fdopen(fd, "w+b"), Path(name))
        try:
            yield pending
        finally:
            pending.file.close()
            if not pending.committed:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name)

    def evict(self, keep: Path | None = None) -> None:
        """Remove least recently used entries until they total at most max_bytes (never `keep`, the entry just
        written), and temporary files of writers that died."""
        with self._locked():
            entries, now = [], time.time()
            with os.scandir(self.folder) as it:
                for e in it:
                    try:
                        info = e.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if e.name.startswith(_TEMP_PREFIX) and now - info.st_mtime > self.stale_s:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(e.path)
                    elif _ENTRY_RE.match(e.name) and stat.S_ISREG(info.st_mode):
                        entries.append((info.st_mtime, e.name, info.st_size))
            total = sum(size for _, _, size in entries)
            for _, name, size in sorted(entries):
                if total <= self.max_bytes:
                    break
                if keep is not None and name == keep.name:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.folder / name)
                total -= size

    def entries(self) -> dict[str, int]:
        """Entry file name -> bytes, for reports and tests ({} when the folder does not exist yet)."""
        out: dict[str, int] = {}
        if not self.folder.is_dir():
            return out
        with os.scandir(self.folder) as it:
            for e in it:
                if _ENTRY_RE.match(e.name) and e.is_file(follow_symlinks=False):
                    out[e.name] = e.stat(follow_symlinks=False).st_size
        return out

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """An exclusive flock on <folder>/.lock, shared by every process of the node using this folder."""
        fd = os.open(self.folder / _LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock


@dataclass
class PendingEntry:
    """A shard being fetched into the cache folder (ShardCache.new_entry)."""

    cache: ShardCache
    file: BinaryIO
    """Open for writing and reading; stays usable after commit()."""
    path: Path
    """Its temporary name."""
    committed: bool = False

    def commit(self, sha256: str) -> None:
        """Make the verified file the entry for sha256: flushed to disk, renamed atomically, then the cache
        evicted down to its bound (never this entry)."""
        self.file.flush()
        os.fsync(self.file.fileno())
        target = self.cache.entry(sha256)
        try:
            os.replace(self.path, target)
        except FileNotFoundError:  # removed as stale by another process's eviction: read it, just not cached
            return
        self.committed = True
        self.cache.evict(keep=target)


def _sha256_of(f: BinaryIO) -> str:
    digest = hashlib.sha256()
    while chunk := f.read(_CHUNK):
        digest.update(chunk)
    return digest.hexdigest()
