"""The global row stream: every source's documents in the data order (data/order.py), packed into rows, the rows
mixed by the schedule, and each rank's batches dealt out of it.

Global rows. Each source's documents are packed in their global order into rows of seq_len tokens; global row i
of the run comes from the source the mixture schedule gives it, and is that source's next row. Row i is thus a
function of the data and the seed only: not of the world size, the number of loader workers or the batch size.

Shapes. A run may change its shape at global rows it names (sequence-length phases, RowSpec.shapes): from such a
row on, rows have the new seq_len and batches the new batch_size. Each source's packer simply cuts its next rows
at the new length, from where it stands (in the middle of a document, possibly): the concatenation of a source's
rows is the same token stream whatever the lengths, so no document is lost or repeated at a switch.

Dealing. Batch k of the loader (k counted from where it started, at global row c) holds, on rank r of W ranks
with batch size B, the global rows c + k*B*W + r*B ... + B: each global step of B*W rows is cut into contiguous
slices, rank by rank. Every rank hands out one batch per step, forever, so every rank gets the same number of
batches. A training step of `accum` batches per rank covers the rows [c + t*B*W*accum, ...) whatever split of
the global batch B*W*accum into ranks and accumulation steps, so the optimizer sees the same rows.

State. The position after a step is the cursor (global rows handed out), each source's position (epoch,
window, member, token offset of a document cut by a row; rows taken from it) and the bad-data counters. It is
the same on every rank, so any rank's state resumes any world size, worker count or batch size at the exact
next global row.

The cost of this order: rows are packed on the global document stream, so every rank (and every loader worker
of a rank) reads and verifies every shard, and keeps only its own rows: the read volume per rank is the whole
dataset, not 1/W of it, and the packing of the other ranks' rows is walked (documents counted, no rows built).
Reading a local or cached dataset, that costs a hash and a tar parse per shard on every rank; from a remote
source, W x the transfer. Splitting the shards between ranks instead reads each shard once, but makes the row
order depend on W. Memory per reader: one window (data.shuffle_window_shards shards) per source.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from data.order import MixSchedule, SourceOrder
from data.packing import Packer
from data.reader import Position, ShardReader, Source


@dataclass(frozen=True)
class RowSpec:
    """What a row stream needs besides the sources (all picklable, for worker processes)."""

    rank: int
    world_size: int
    seq_len: int
    batch_size: int
    on_bad_data: str
    cls_id: int
    sep_id: int
    shapes: tuple[tuple[int, int, int], ...] = ()
    """Shape knots after row 0: (global row, seq_len, batch_size), rows increasing; seq_len and batch_size above
    hold before the first. Each knot's row is the start of a global step (checked by the loader's config)."""

    def shape_at(self, row: int) -> tuple[int, int]:
        """(seq_len, batch_size) of the global step that starts at global row `row`."""
        seq, batch = self.seq_len, self.batch_size
        for at, knot_seq, knot_batch in self.shapes:
            if at > row:
                break
            seq, batch = knot_seq, knot_batch
        return seq, batch


POSITION_KEYS = ("epoch", "window", "member", "offset", "rows")
"""Every source position has these; "tokens" (tokens of its rows handed out) is kept besides them."""


def initial_state(num_sources: int) -> dict[str, Any]:
    """The state of a stream that has handed out nothing."""
    return {"rows": 0, "positions": [dict.fromkeys((*POSITION_KEYS, "tokens"), 0) for _ in range(num_sources)],
            "counters": {}}


class SourceStream:
    """One source's documents (token ids, no specials) in the global order, epoch after epoch."""

    def __init__(self, source: Source, order: SourceOrder, on_bad_data: str, counters: dict[str, int],
                 opened: Any):
        self.source, self.order = source, order
        self.reader = ShardReader(source, on_bad_data, counters, opened)
        self._epoch = self._window = self._member = 0
        self._docs: list[tuple[int, str, bytes]] | None = None  # the window's (shard, name, payload), reading order
        self._loaded_at: tuple[int, int] | None = None
        self._scan: tuple[int, bool] | None = None  # epoch read from its first window, and whether a document came
        self._sought = False

    @property
    def position(self) -> Position:
        """Where the next document is looked for."""
        return self._epoch, self._window, self._member

    def seek(self, position: Position) -> None:
        epoch, window, member = (int(x) for x in position)
        if epoch < 0 or member < 0 or not 0 <= window < self.order.windows_per_epoch:
            raise ValueError(f"loader state points outside source {self.source.label!r}: position {position}")
        self._epoch, self._window, self._member = epoch, window, member
        self._scan, self._sought = None, True
        if self._loaded_at != (epoch, window):
            self._docs, self._loaded_at = None, None

    def _load_window(self) -> list[tuple[int, str, bytes]]:
        """Every member of the window's usable shards, in the window's reading order: the whole window is held in
        memory, so documents of all its shards can be interleaved."""
        members: list[tuple[int, str, bytes]] = []
        for index in self.order.window(self._epoch, self._window):
            got = self.reader.load(index)
            if got is not None:
                members.extend((index, name, payload) for name, payload in got)
        return [members[i] for i in self.order.documents(self._epoch, self._window, len(members))]

    def next_doc(self) -> tuple[np.ndarray, Position]:
        """The next usable document's ids and its position; moves past it."""
        while True:
            if self._window >= self.order.windows_per_epoch:
                self._next_epoch()
                continue
            if self._loaded_at != (self._epoch, self._window):
                if self._window == 0 and self._member == 0:
                    self._scan = (self._epoch, False)
                self._docs = self._load_window()
                self._loaded_at = (self._epoch, self._window)
                if self._sought and self._member > len(self._docs):
                    raise ValueError(f"loader state points outside source {self.source.label!r}: member "
                                     f"{self._member} of a window of {len(self._docs)}; was it saved for this data?")
                self._sought = False
            docs = self._docs
            assert docs is not None
            if self._member >= len(docs):
                self._window, self._member = self._window + 1, 0
                self._docs, self._loaded_at = None, None
                continue
            position = self.position
            index, name, payload = docs[self._member]
            self._member += 1
            ids = self.reader.decode(index, name, payload)
            if ids is not None:
                if self._scan is not None:
                    self._scan = (self._scan[0], True)
                return ids, position

    def _next_epoch(self) -> None:
        if self._scan == (self._epoch, False):
            raise ValueError(f"source {self.source.label!r}: no usable document in all of epoch {self._epoch} "
                             f"({self.reader.skips()}); the data is unreadable, nothing is left to train on")
        self._epoch, self._window, self._member = self._epoch + 1, 0, 0
        self._docs, self._loaded_at = None, None


class RowStream:
    """The global rows, from a state; hands out one rank's batch of each global step (see the module docstring)."""

    def __init__(self, sources: list[Source], orders: list[SourceOrder], schedule: MixSchedule, spec: RowSpec,
                 state: dict[str, Any] | None = None):
        self.sources, self.schedule, self.spec = sources, schedule, spec
        state = state if state is not None else initial_state(len(sources))
        self.counters: dict[str, int] = {str(k): int(v) for k, v in state.get("counters", {}).items()}
        self.opened: list[str] = []
        """Shard files opened in the steps this stream handed out (and before its first), as '<label>/<file>'."""
        self.cursor = int(state["rows"])
        self.rows = [int(p["rows"]) for p in state["positions"]]
        self.tokens = [int(p.get("tokens", p["rows"] * spec.seq_len)) for p in state["positions"]]
        self.streams: list[SourceStream] = []
        self.packers: list[Packer] = []
        for source, order, pos in zip(sources, orders, state["positions"], strict=True):
            stream = SourceStream(source, order, spec.on_bad_data, self.counters, self._opener(source.label))
            stream.seek((pos["epoch"], pos["window"], pos["member"]))
            packer = Packer(stream.next_doc, spec.seq_len, spec.cls_id, spec.sep_id)
            packer.resume(int(pos["offset"]))
            self.streams.append(stream)
            self.packers.append(packer)

    def _opener(self, label: str):
        def opened(file: str) -> None:
            self.opened.append(f"{label}/{file}")

        return opened

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of the next global step: (input_ids, doc_ids), int64 [batch_size, seq_len]."""
        seq, b = self._shape()
        rank = self.spec.rank
        picks = np.asarray(self.schedule.assign(self.rows, b * self.spec.world_size))
        self._count_tokens(picks, seq)
        lo, hi = rank * b, (rank + 1) * b
        ids = np.empty((b, seq), dtype=np.int64)
        docs = np.empty((b, seq), dtype=np.int64)
        for s, packer in enumerate(self.packers):
            where = np.flatnonzero(picks == s)
            mine = where[(where >= lo) & (where < hi)]
            before = int((where < lo).sum())
            packer.skip(before)
            if mine.size:
                ids[mine - lo], docs[mine - lo] = packer.rows(mine.size)
            packer.skip(where.size - before - mine.size)
        self.cursor += picks.size
        return torch.from_numpy(ids), torch.from_numpy(docs)

    def skip_batch(self) -> None:
        """Move past the next global step without building rows (its batch is another worker's to hand out);
        the shards it opened are that worker's to report."""
        seq, b = self._shape()
        picks = np.asarray(self.schedule.assign(self.rows, b * self.spec.world_size))
        self._count_tokens(picks, seq)
        for s, packer in enumerate(self.packers):
            packer.skip(int((picks == s).sum()))
        self.cursor += picks.size
        self.opened = []

    def _shape(self) -> tuple[int, int]:
        """The next global step's (seq_len, batch_size); every packer cuts rows of that length from here on."""
        seq, batch = self.spec.shape_at(self.cursor)
        for packer in self.packers:
            packer.seq_len = seq
        return seq, batch

    def _count_tokens(self, picks: np.ndarray, seq: int) -> None:
        for s in range(len(self.tokens)):
            self.tokens[s] += int((picks == s).sum()) * seq

    def state(self) -> dict[str, Any]:
        """JSON-serialisable: where the next global step starts, and the counters so far."""
        positions = []
        for stream, packer, rows, tokens in zip(self.streams, self.packers, self.rows, self.tokens, strict=True):
            epoch, window, member = packer.head_position if packer.head is not None else stream.position
            positions.append({"epoch": epoch, "window": window, "member": member, "offset": packer.offset,
                              "rows": rows, "tokens": tokens})
        return {"rows": self.cursor, "positions": positions, "counters": dict(self.counters)}

    def drain_opened(self) -> list[str]:
        out, self.opened = self.opened, []
        return out
