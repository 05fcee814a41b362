"""Reading one source's shards, verified, under the on_bad_data policy.

A shard is fetched whole (local file into memory; http(s) and pipe: streamed into a file while hashed, or taken
from the node's shard cache, data/cache.py), checked against the manifest (size, then sha256) before any of its
samples is used, then parsed as a plain, uncompressed tar (a gzip/bz2/xz shard is not a tar, so it can
never expand in memory) whose members may not claim more bytes in all than the shard holds (sparse ones could). A shard
the manifest declares larger than MAX_SHARD_BYTES is never fetched. Only members named `<key>.ids` are ever
interpreted, and only as little-endian integers: no decoder runs, so a `.pickle`, `.pyd`, `.pth` or `.npy`
member is never unpickled or imported; it is bad data like any other.

Bad data and the policy:
- shard level: `missing` (cannot be fetched in time), `size` (also: declared above MAX_SHARD_BYTES), `sha256`,
  `not_tar` (the tar cannot be parsed, or is compressed), `count` (another number of members than the manifest
  lists);
- sample level: `member` (not `<key>.ids`), `length` (not a whole number of ids), `vocab` (an id >= vocab size).
With on_bad_data='fail' the first one raises BadDataError naming the shard (and the sample key); with 'skip' it
is left out, counted under `skipped_shards/<reason>` or `skipped_samples/<reason>` and logged. (If a whole epoch
yields no usable document, data/rows.py raises whatever the policy: skipping would otherwise spin forever.)
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from data.location import FetchError, Location
from data.manifest import Manifest, ShardInfo
from data.shards import MAX_SHARD_BYTES

ON_BAD_DATA = ("fail", "skip")
SHARD_REASONS = ("missing", "size", "sha256", "not_tar", "count")
SAMPLE_REASONS = ("member", "length", "vocab")
_MEMBER_RE = re.compile(r"^(?P<key>[^/]+)\.ids$")
_RERUN = "re-run `python -m launch.prepare` to rebuild the dataset, or set on_bad_data='skip' to leave it out"
_COMPRESSED = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"))
"""Magic numbers of compressed files, named in the error for a shard that starts with one."""
_SAMPLE_WARNINGS = 5  # per reader; later skipped samples are only counted
log = logging.getLogger("cloze.data")

Position = tuple[int, int, int]
"""(epoch, window position, member index in the window's reading order): data/order.py."""


class BadDataError(ValueError):
    """Bad data under on_bad_data='fail'; the message names the shard and, for a sample, its key."""


@dataclass
class Source:
    """One prepared dataset as the loader uses it."""

    index: int
    """Position in the loader's source list (seeds its shard order)."""
    label: str
    """Short unique name used in metrics and shard names ('web', 'code')."""
    weight: float
    """Share of rows, normalised over the sources."""
    location: Location
    manifest: Manifest

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest.id_dtype).newbyteorder("<")

    def framed_tokens(self) -> list[int]:
        """Per shard: tokens plus [CLS] and [SEP] per document (what packing produces)."""
        return [s.tokens + 2 * s.samples for s in self.manifest.shards]


class ShardReader:
    """Whole shards of one source, fetched, verified and parsed; bad ones handled under the on_bad_data policy.
    Which shard comes when is the caller's business (data/rows.py, in the order of data/order.py)."""

    def __init__(self, source: Source, on_bad_data: str, counters: dict[str, int], opened: Callable[[str], None]):
        if on_bad_data not in ON_BAD_DATA:
            raise ValueError(f"on_bad_data={on_bad_data!r}; choose one of {ON_BAD_DATA}")
        self.source, self.on_bad_data = source, on_bad_data
        self.counters = counters
        self._opened = opened
        self._sample_warnings = 0

    def load(self, index: int) -> list[tuple[str, bytes]] | None:
        """Shard `index`'s (member name, payload) list in file order, or None when it is skipped as bad."""
        return self._load(index)

    def decode(self, index: int, name: str, payload: bytes) -> np.ndarray | None:
        """Member `name` of shard `index` as token ids, or None when it is skipped as bad."""
        return self._decode(index, name, payload)

    def skips(self) -> str:
        parts = [f"{k} {v}" for k, v in sorted(self.counters.items()) if k.startswith("skipped_") and v]
        return "skipped: " + ", ".join(parts) if parts else "nothing skipped"

    # ----- one shard --------------------------------------------------------------------------------------------
    def _url(self, index: int) -> str:
        return self.source.location.url(self.source.manifest.shards[index].file)

    def _bad_shard(self, index: int, reason: str, what: str) -> None:
        message = f"shard {self._url(index)} (source {self.source.label!r}): {what}"
        if self.on_bad_data == "fail":
            raise BadDataError(f"{message}; {_RERUN}")
        key = f"skipped_shards/{reason}"
        self.counters[key] = self.counters.get(key, 0) + 1
        log.warning("skipped %s", message)

    def _load(self, index: int) -> list[tuple[str, bytes]] | None:
        """The shard's (member name, payload) list, or None when it is skipped as bad."""
        info = self.source.manifest.shards[index]
        self._opened(info.file)
        if info.bytes > MAX_SHARD_BYTES:  # its members are held in memory: refuse before fetching a byte
            self._bad_shard(index, "size", f"the manifest says {info.bytes} bytes, more than the largest shard cloze "
                                           f"reads ({MAX_SHARD_BYTES} bytes; launch.prepare --shard-bytes)")
            return None
        try:
            members = self._verified_members(info)
        except _BadShard as e:
            self._bad_shard(index, e.reason, e.what)
            return None
        if len(members) != info.samples:
            self._bad_shard(index, "count", f"{len(members)} members, the manifest lists {info.samples} samples")
            return None
        return members

    def _verified_members(self, info: ShardInfo) -> list[tuple[str, bytes]]:
        """The members of a shard whose size and sha256 match the manifest; _BadShard otherwise. A local shard is
        read into memory; a remote one comes from the node's cache (re-verified) or is streamed into a file while
        hashed (a cache entry when there is a cache and the shard fits it, else a temporary file)."""
        location = self.source.location
        if location.is_local:
            try:
                data = location.read(info.file, limit=info.bytes)
            except FetchError as e:
                raise _BadShard("missing", f"cannot be read ({e})") from None
            _check_fetched(info, len(data), hashlib.sha256(data).hexdigest())
            return _parse(io.BytesIO(data), info.bytes)
        cache = location.cache
        if cache is not None:
            hit = cache.open(info.sha256, info.bytes)
            if hit is not None:
                with hit:
                    return _parse(hit, info.bytes)
        if cache is not None and cache.fits(info.bytes):
            with cache.new_entry() as entry:
                self._fetch_into(entry.file, info)
                entry.commit(info.sha256)
                entry.file.seek(0)
                return _parse(entry.file, info.bytes)
        with tempfile.TemporaryFile() as f:
            self._fetch_into(f, info)
            f.seek(0)
            return _parse(f, info.bytes)

    def _fetch_into(self, f: BinaryIO, info: ShardInfo) -> None:
        try:
            got, digest = self.source.location.fetch(info.file, f, limit=info.bytes)
        except FetchError as e:
            raise _BadShard("missing", f"cannot be read ({e})") from None
        _check_fetched(info, got, digest)

    def _decode(self, index: int, name: str, payload: bytes) -> np.ndarray | None:
        """The member's ids, or None when it is skipped as bad (never anything but integers is decoded)."""
        match = _MEMBER_RE.match(name)
        key = match["key"] if match else name.split(".", 1)[0]
        dtype, vocab = self.source.dtype, self.source.manifest.vocab_size
        if match is None:
            return self._bad_sample(index, key, "member", f"unexpected member {name!r}: only <key>.ids members are "
                                                          "read and nothing else is ever decoded")
        if len(payload) % dtype.itemsize:
            return self._bad_sample(index, key, "length", f"{len(payload)} bytes is not a whole number of "
                                                          f"{self.source.manifest.id_dtype} ids")
        ids = np.frombuffer(payload, dtype=dtype)
        if ids.size and int(ids.max()) >= vocab:
            return self._bad_sample(index, key, "vocab", f"token id {int(ids.max())} >= vocab_size {vocab} (the "
                                                         "shard does not belong to this tokenizer)")
        return ids

    def _bad_sample(self, index: int, key: str, reason: str, what: str) -> None:
        message = f"shard {self._url(index)} (source {self.source.label!r}), sample key {key!r}: {what}"
        if self.on_bad_data == "fail":
            raise BadDataError(f"{message}; {_RERUN}")
        counter = f"skipped_samples/{reason}"
        self.counters[counter] = self.counters.get(counter, 0) + 1
        self._sample_warnings += 1
        if self._sample_warnings <= _SAMPLE_WARNINGS:
            tail = "; further skipped samples are only counted" if self._sample_warnings == _SAMPLE_WARNINGS else ""
            log.warning("skipped %s%s", message, tail)
        return None


class _BadShard(Exception):
    """A shard that fails a check: the on_bad_data reason and what is wrong."""

    def __init__(self, reason: str, what: str):
        super().__init__(what)
        self.reason, self.what = reason, what


def _check_fetched(info: ShardInfo, got: int, digest: str) -> None:
    """Size first (a read stops at info.bytes + 1), then the sha256 of what was read."""
    if got != info.bytes:
        size = f"{got} bytes" if got < info.bytes else "longer"
        raise _BadShard("size", f"{size}, the manifest says {info.bytes} (truncated or replaced?)")
    if digest != info.sha256:
        raise _BadShard("sha256", "content differs from the manifest's sha256 (corrupted or replaced?)")


def _parse(f: BinaryIO, size: int) -> list[tuple[str, bytes]]:
    try:
        return tar_members(f, size)
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        raise _BadShard("not_tar", f"not a readable tar file ({str(e) or type(e).__name__})") from None


def tar_members(data: bytes | BinaryIO, size: int | None = None) -> list[tuple[str, bytes]]:
    """(name, payload) of every regular member of an uncompressed tar (bytes in memory, or a file of `size` bytes
    open at its start), in file order; WebDataset's `__...__` metadata members are passed over. tarfile.ReadError
    for anything else: a compressed archive (mode 'r|' never decompresses), a sparse member, or members that claim
    more bytes in all than the archive holds (what a sparse member would expand to): the payloads never take more
    memory than the shard itself."""
    if isinstance(data, (bytes, bytearray)):
        size, f = len(data), io.BytesIO(data)
    else:
        assert size is not None, "a file's size is needed"
        f = data
    head = f.read(8)
    f.seek(0)
    for magic, kind in _COMPRESSED:
        if head.startswith(magic):
            raise tarfile.ReadError(f"compressed ({kind}); shards are plain tar files")
    members, claimed = [], 0
    with tarfile.open(fileobj=f, mode="r|") as tar:
        for info in tar:
            claimed += info.size
            if claimed > size:
                raise tarfile.ReadError(f"member {info.name[:100]!r} claims {info.size} bytes, more than the "
                                        f"{size}-byte shard holds")
            if info.issparse():
                raise tarfile.ReadError(f"member {info.name[:100]!r} is a sparse file")
            if not info.isreg() or (info.name.startswith("__") and info.name.endswith("__") and "/" not in info.name):
                continue
            member = tar.extractfile(info)
            assert member is not None
            members.append((info.name, member.read()))
            tar.members = []  # a streamed archive keeps every TarInfo otherwise
    return members
