"""WebDataset tar shards of tokenized documents: `shard-000000.tar`, ... each member `<key>.ids`.

A member holds one document's token ids (no specials) as little-endian uint16/uint32. Output is
byte-identical for the same input: fixed mtime/owner/mode in every tar header and keys numbered in input
order. Each shard is built in memory and renamed into place, so a crash never leaves a half-written shard
under a final name.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path

import numpy as np
import webdataset

from data.manifest import ShardInfo

SHARD_PATTERN = "shard-{:06d}.tar"
SHARD_RE = re.compile(r"^shard-\d{6}\.tar$")
SAMPLE_SUFFIX = "ids"
KEY_DIGITS = 10
_BLOCK = 512  # tar block: every header and every member's data is padded to it
_RECORD = 20 * _BLOCK  # tarfile pads the archive to a multiple of this on close
_END = 2 * _BLOCK  # end-of-archive marker
DEFAULT_SHARD_BYTES = 64 * 1024 * 1024
MAX_SHARD_BYTES = 1024 * 1024 * 1024
"""Largest shard written or read: the loader holds a whole shard in memory (per worker) and refuses a manifest's
claim of more before fetching anything."""


def member_bytes(payload: int) -> int:
    """Bytes one member with payload data bytes takes in the archive (header + padded data)."""
    return _BLOCK + -(-payload // _BLOCK) * _BLOCK


def archive_bytes(members: int) -> int:
    """Final file size for members bytes of members (end marker plus record padding added)."""
    return -(-(members + _END) // _RECORD) * _RECORD


def max_payload_bytes(max_bytes: int) -> int:
    """Largest member payload for which a one-member archive stays within max_bytes (0 if none fits)."""
    usable = (max_bytes // _RECORD) * _RECORD
    return max(usable - _END - _BLOCK, 0)


def id_bytes(ids: np.ndarray, id_dtype: str) -> bytes:
    """Little-endian bytes of ids in id_dtype ('uint16' / 'uint32'); refuses ids that do not fit."""
    ids = np.asarray(ids)
    limit = np.iinfo(np.dtype(id_dtype)).max
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) > limit):
        raise ValueError(f"token ids outside [0, {limit}] cannot be stored as {id_dtype}")
    return ids.astype(np.dtype(id_dtype).newbyteorder("<"), copy=False).tobytes()


class ShardWriter:
    """Append documents; shards roll over before they would pass max_bytes or max_documents.

    A single document bigger than max_payload_bytes(max_bytes) gets a shard of its own, the only way a shard
    exceeds the bound; data.pipeline splits documents before that can happen.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        id_dtype: str,
        max_bytes: int = DEFAULT_SHARD_BYTES,
        max_documents: int | None = None,
    ):
        if max_bytes < _RECORD:
            raise ValueError(f"shard size limit {max_bytes} bytes is below the minimum tar file size {_RECORD}")
        if max_bytes > MAX_SHARD_BYTES:
            raise ValueError(f"shard size limit {max_bytes} bytes is above {MAX_SHARD_BYTES}, the largest shard the "
                             "loader reads (it holds a whole shard in memory)")
        if max_documents is not None and max_documents < 1:
            raise ValueError(f"max_documents={max_documents} must be >= 1")
        if id_dtype not in ("uint16", "uint32"):
            raise ValueError(f"id_dtype={id_dtype!r} must be 'uint16' or 'uint32'")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.id_dtype = id_dtype
        self.max_bytes = max_bytes
        self.max_documents = max_documents
        self.shards: list[ShardInfo] = []
        self.documents = 0
        self.tokens = 0
        self._buffer: io.BytesIO | None = None
        self._tar: webdataset.TarWriter | None = None
        self._members = 0  # bytes of members in the open shard
        self._samples = 0
        self._shard_tokens = 0

    def add(self, ids: np.ndarray) -> None:
        """Write one document's ids (no specials) as the next sample."""
        payload = id_bytes(ids, self.id_dtype)
        size = member_bytes(len(payload))
        if self._tar is not None and (
            archive_bytes(self._members + size) > self.max_bytes
            or (self.max_documents is not None and self._samples >= self.max_documents)
        ):
            self._finish_shard()
        if self._tar is None:
            self._buffer = io.BytesIO()
            # mtime/owner/mode fixed: the same documents give the same bytes on every run
            self._tar = webdataset.TarWriter(
                self._buffer, user="cloze", group="cloze", mode=0o444, encoder=False, mtime=0
            )
        key = f"{self.documents:0{KEY_DIGITS}d}"
        self._tar.write({"__key__": key, SAMPLE_SUFFIX: payload})
        self._members += size
        self._samples += 1
        self._shard_tokens += len(payload) // np.dtype(self.id_dtype).itemsize
        self.documents += 1
        self.tokens += len(payload) // np.dtype(self.id_dtype).itemsize

    def _finish_shard(self) -> None:
        assert self._tar is not None and self._buffer is not None
        self._tar.close()
        data = self._buffer.getvalue()
        assert len(data) == archive_bytes(self._members), (len(data), self._members)
        name = SHARD_PATTERN.format(len(self.shards))
        path = self.out_dir / name
        tmp = path.with_name(name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        self.shards.append(ShardInfo(
            file=name,
            samples=self._samples,
            tokens=self._shard_tokens,
            bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
        ))
        self._tar = self._buffer = None
        self._members = self._samples = self._shard_tokens = 0

    def close(self) -> list[ShardInfo]:
        """Flush the last shard; return every shard written, in order."""
        if self._tar is not None:
            self._finish_shard()
        return list(self.shards)


def remove_stale_shards(out_dir: str | os.PathLike, keep: list[ShardInfo]) -> list[Path]:
    """Delete shard-NNNNNN.tar files a previous, larger run left in out_dir; return what was removed."""
    names = {s.file for s in keep}
    removed = []
    for path in sorted(Path(out_dir).iterdir()):
        if SHARD_RE.match(path.name) and path.name not in names:
            path.unlink()
            removed.append(path)
    return removed
