"""PackedStream: an endless, resumable stream of fixed-length rows packed from the prepared shards.

Each epoch, the shards are permuted with a generator seeded by (seed, epoch) and rank r reads
perm[r::world_size], so ranks read disjoint shards and every rank computes the same permutation without
talking to the others. Documents become [CLS] ids [SEP] and are concatenated into rows of exactly seq_len
tokens: no padding, and a document that does not fit continues at the start of the next row (rows also run
on across epoch boundaries, so nothing is ever dropped).

Shards are read with webdataset's tar iterators, raw bytes only (no decoders, so nothing is unpickled).

The position is (epoch, shard position in this rank's order, sample index in the shard, token offset in the
framed document); it always points at the first token of the next row, so state_dict() taken between
batches resumes exactly there.
"""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from webdataset.gopen import gopen
from webdataset.tariterators import tar_file_expander

from data.manifest import Manifest, load_manifest

STATE_VERSION = 1
_MEMBER_RE = re.compile(r"^(?P<key>[^./]+)\.ids$")
_RERUN = "re-run `python -m launch.prepare` to rebuild the dataset"


@dataclass
class StreamState:
    """Where the next row starts."""

    epoch: int = 0
    """Epoch number; seeds the shard permutation together with the stream's seed."""
    shard_pos: int = 0
    """Index into this rank's shard list for the epoch."""
    sample: int = 0
    """Sample (document) index inside that shard."""
    offset: int = 0
    """Token offset inside the framed document [CLS] ids [SEP]."""


def _read_shard(url: str) -> Iterator[tuple[str, bytes]]:
    """(key, raw .ids bytes) for every member of one shard; anything but `<key>.ids` is an error."""
    stream = gopen(url, "rb")
    try:
        source = [{"url": url, "stream": stream}]
        for member in tar_file_expander(source, eof_value=None):
            name = member["fname"]
            match = _MEMBER_RE.match(name)
            if match is None:
                key = name.split(".", 1)[0]
                raise ValueError(f"shard {url}: unexpected member {name!r} (key {key!r}); cloze shards hold only "
                                 f"<key>.ids members; {_RERUN}")
            yield match["key"], member["data"]
    except (tarfile.TarError, EOFError) as e:
        raise ValueError(f"shard {url}: not a readable tar file ({e.args[0] if e.args else e}); {_RERUN}") from None
    finally:
        stream.close()


class PackedStream:
    """Endless iterator of (input_ids, doc_ids), both int64 tensors of shape [batch_size, seq_len]."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        seq_len: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must be >= 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
        self.manifest: Manifest = load_manifest(data_dir)
        n = len(self.manifest.shards)
        if n < world_size:
            raise ValueError(
                f"{self.manifest.root}: {n} shard(s) for {world_size} ranks; every rank needs its own shard, so at "
                f"least {world_size} are needed: re-run `python -m launch.prepare` with a smaller --shard-bytes"
            )
        empty = [s.file for s in self.manifest.shards if s.samples == 0]
        if empty:
            raise ValueError(f"{self.manifest.root}: shard(s) {', '.join(empty)} hold no documents; {_RERUN}")
        special = self.manifest.special_ids
        try:
            self.cls_id, self.sep_id = special["[CLS]"], special["[SEP]"]
        except KeyError as e:
            raise ValueError(f"{self.manifest.root}: manifest special_ids lack {e.args[0]}; {_RERUN}") from None
        self.seq_len, self.batch_size = seq_len, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.vocab_size = self.manifest.vocab_size
        self._dtype = np.dtype(self.manifest.id_dtype).newbyteorder("<")
        self.consumed_shards: list[str] = []
        """Shard files this stream opened, in order (a shard reopened after load_state_dict appears again)."""
        self._state = StreamState()
        self._order_cache: tuple[int, list[int]] | None = None
        self._reader: Iterator[tuple[str, bytes]] | None = None
        self._reader_at: tuple[int, int, int] | None = None  # (epoch, shard_pos, next sample) of _reader
        self._doc: np.ndarray | None = None  # framed current document

    # ----- shard order -------------------------------------------------------------------------------------
    def shard_order(self, epoch: int) -> list[int]:
        """Indices into manifest.shards that this rank reads in `epoch`, in reading order."""
        if self._order_cache is None or self._order_cache[0] != epoch:
            perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.manifest.shards))
            self._order_cache = (epoch, [int(i) for i in perm[self.rank :: self.world_size]])
        return self._order_cache[1]

    def epoch_tokens(self, epoch: int) -> int:
        """Tokens (with [CLS]/[SEP]) this rank reads in `epoch`; shard sizes differ, so epochs may differ."""
        shards = self.manifest.shards
        return sum(shards[i].tokens + 2 * shards[i].samples for i in self.shard_order(epoch))

    @property
    def tokens_per_epoch(self) -> int:
        """epoch_tokens() of the current epoch."""
        return self.epoch_tokens(self._state.epoch)

    @property
    def epoch(self) -> int:
        return self._state.epoch

    # ----- resumable position ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Small JSON-serialisable position: the next row starts exactly here."""
        return {
            "version": STATE_VERSION,
            **asdict(self._state),
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_shards": len(self.manifest.shards),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a position from state_dict() of a stream over the same data, seed, rank and world size."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"stream state version {state.get('version')!r} is not {STATE_VERSION}")
        mine = {"seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "num_shards": len(self.manifest.shards)}
        for key, value in mine.items():
            if state.get(key) != value:
                raise ValueError(f"stream state was saved with {key}={state.get(key)!r}, this stream has {value!r}; "
                                 "resume with the same data, seed and number of ranks")
        new = StreamState(*(int(state[k]) for k in ("epoch", "shard_pos", "sample", "offset")))
        order = self.shard_order(new.epoch)
        if not (0 <= new.shard_pos < len(order)
                and 0 <= new.sample < self.manifest.shards[order[new.shard_pos]].samples and new.offset >= 0):
            raise ValueError(f"stream state {asdict(new)} points outside the data")
        self._close_reader()
        self._doc = None
        self._state = new

    # ----- reading -----------------------------------------------------------------------------------------
    def _close_reader(self) -> None:
        if self._reader is not None:
            self._reader.close()  # type: ignore[attr-defined]
        self._reader = None
        self._reader_at = None

    def _shard_index(self) -> int:
        return self.shard_order(self._state.epoch)[self._state.shard_pos]

    def _load_doc(self) -> np.ndarray:
        """The framed document at the current position, reading (and skipping to) it as needed."""
        st = self._state
        index = self._shard_index()
        info = self.manifest.shards[index]
        url = str(self.manifest.shard_paths[index])
        if self._reader_at != (st.epoch, st.shard_pos, st.sample):
            self._close_reader()
            self._reader = _read_shard(url)
            self._reader_at = (st.epoch, st.shard_pos, 0)
            self.consumed_shards.append(info.file)
            for _ in range(st.sample):
                self._next_member(url, info.samples)
        key, data = self._next_member(url, info.samples)
        if len(data) % self._dtype.itemsize:
            raise ValueError(f"shard {url}, key {key!r}: {len(data)} bytes is not a whole number of "
                             f"{self.manifest.id_dtype} ids; {_RERUN}")
        ids = np.frombuffer(data, dtype=self._dtype)
        if ids.size and int(ids.max()) >= self.vocab_size:
            raise ValueError(f"shard {url}, key {key!r}: token id {int(ids.max())} >= vocab_size {self.vocab_size}; "
                             f"the shard does not belong to this tokenizer; {_RERUN}")
        doc = np.empty(ids.size + 2, dtype=np.int64)
        doc[0], doc[-1] = self.cls_id, self.sep_id
        doc[1:-1] = ids
        return doc

    def _next_member(self, url: str, expected: int) -> tuple[str, bytes]:
        assert self._reader is not None and self._reader_at is not None
        epoch, pos, sample = self._reader_at
        try:
            member = next(self._reader)
        except StopIteration:
            raise ValueError(f"shard {url} ends after {sample} samples, the manifest says {expected}; "
                             f"{_RERUN}") from None
        self._reader_at = (epoch, pos, sample + 1)
        return member

    def _advance_doc(self) -> None:
        """Move the position past the current document, to the next shard / epoch as needed."""
        st = self._state
        st.sample += 1
        st.offset = 0
        self._doc = None
        index = self._shard_index()
        info = self.manifest.shards[index]
        if st.sample < info.samples:
            return
        if self._reader is not None and self._reader_at == (st.epoch, st.shard_pos, st.sample):
            # the shard must end where the manifest says it does
            if next(self._reader, None) is not None:
                raise ValueError(f"shard {self.manifest.shard_paths[index]} holds more than the {info.samples} "
                                 f"samples the manifest lists; {_RERUN}")
        self._close_reader()
        st.sample = 0
        st.shard_pos += 1
        if st.shard_pos == len(self.shard_order(st.epoch)):
            st.shard_pos = 0
            st.epoch += 1

    def _fill_row(self, ids_out: np.ndarray, docs_out: np.ndarray) -> None:
        pos, doc_index = 0, 0
        while pos < self.seq_len:
            if self._doc is None:
                self._doc = self._load_doc()
            doc, st = self._doc, self._state
            if st.offset >= doc.size:
                raise ValueError(f"stream state offset {st.offset} lies beyond its document ({doc.size} tokens); "
                                 "the state does not belong to this data")
            take = min(self.seq_len - pos, doc.size - st.offset)
            ids_out[pos : pos + take] = doc[st.offset : st.offset + take]
            docs_out[pos : pos + take] = doc_index
            pos += take
            st.offset += take
            if st.offset == doc.size:
                self._advance_doc()
                doc_index += 1

    def __iter__(self) -> PackedStream:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        ids = np.empty((self.batch_size, self.seq_len), dtype=np.int64)
        docs = np.empty((self.batch_size, self.seq_len), dtype=np.int64)
        for row in range(self.batch_size):
            self._fill_row(ids[row], docs[row])
        return torch.from_numpy(ids), torch.from_numpy(docs)
