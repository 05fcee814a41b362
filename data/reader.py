"""Reading one source's shards, verified, under the on_bad_data policy.

A shard is fetched whole (local file, http(s), pipe:), checked against the manifest (size, then sha256) before
any of its samples is used, then parsed as a plain, uncompressed tar (a gzip/bz2/xz shard is not a tar, so it can
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
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from data.location import FetchError, Location
from data.manifest import Manifest
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
        if info.bytes > MAX_SHARD_BYTES:  # read whole into memory: refuse before fetching a byte
            self._bad_shard(index, "size", f"the manifest says {info.bytes} bytes, more than the largest shard cloze "
                                           f"reads ({MAX_SHARD_BYTES} bytes; launch.prepare --shard-bytes)")
            return None
        try:
            data = self.source.location.read(info.file, limit=info.bytes)
        except FetchError as e:
            self._bad_shard(index, "missing", f"cannot be read ({e})")
            return None
        if len(data) != info.bytes:
            size = f"{len(data)} bytes" if len(data) < info.bytes else "longer"
            self._bad_shard(index, "size", f"{size}, the manifest says {info.bytes} (truncated or replaced?)")
            return None
        if hashlib.sha256(data).hexdigest() != info.sha256:
            self._bad_shard(index, "sha256", "content differs from the manifest's sha256 (corrupted or replaced?)")
            return None
        try:
            members = tar_members(data)
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            self._bad_shard(index, "not_tar", f"not a readable tar file ({str(e) or type(e).__name__})")
            return None
        if len(members) != info.samples:
            self._bad_shard(index, "count", f"{len(members)} members, the manifest lists {info.samples} samples")
            return None
        return members

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


def tar_members(data: bytes) -> list[tuple[str, bytes]]:
    """(name, payload) of every regular member of an uncompressed tar held in memory, in file order; WebDataset's
    `__...__` metadata members are passed over. tarfile.ReadError for anything else: a compressed archive (mode
    'r|' never decompresses), a sparse member, or members that claim more bytes in all than the archive holds
    (what a sparse member would expand to): the payloads never take more memory than the shard itself."""
    for magic, kind in _COMPRESSED:
        if data.startswith(magic):
            raise tarfile.ReadError(f"compressed ({kind}); shards are plain tar files")
    members, claimed = [], 0
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
        for info in tar:
            claimed += info.size
            if claimed > len(data):
                raise tarfile.ReadError(f"member {info.name[:100]!r} claims {info.size} bytes, more than the "
                                        f"{len(data)}-byte shard holds")
            if info.issparse():
                raise tarfile.ReadError(f"member {info.name[:100]!r} is a sparse file")
            if not info.isreg() or (info.name.startswith("__") and info.name.endswith("__") and "/" not in info.name):
                continue
            f = tar.extractfile(info)
            assert f is not None
            members.append((info.name, f.read()))
            tar.members = []  # a streamed archive keeps every TarInfo otherwise
    return members
