"""One partition of one rank: every source's reader and packer, the mixture, and the partition's exact state.

A partition is what one loader worker serves (the main process serves the only partition when num_workers=0).
It emits batches of rows; each row comes from one source, chosen by the mixture schedule (data/plan.py). After
every batch, state() describes exactly where the next batch starts, plus the counters accumulated so far; the
loader keeps the state of the last batch it handed out, so prefetched batches never leak into a checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from data.packing import Packer
from data.plan import MixSchedule, SourcePlan
from data.reader import Source, SourceReader


@dataclass(frozen=True)
class PartitionSpec:
    """What a partition needs besides the sources (all picklable, for worker processes)."""

    rank: int
    part: int
    seq_len: int
    batch_size: int
    on_bad_data: str
    cls_id: int
    sep_id: int


def epoch_rows(position: dict[str, Any]) -> int:
    """Rows the epoch rule counts for one source's position: its rows plus the optional `shift`, which a
    reshaped resume sets (data/reshape.py) so the mixture keeps its counts while the epoch restarts."""
    return int(position["rows"]) + int(position.get("shift", 0))


def initial_state(num_sources: int) -> dict[str, Any]:
    """The state of a partition that has emitted nothing."""
    return {"sources": [{"epoch": 0, "shard": 0, "member": 0, "offset": 0, "rows": 0} for _ in range(num_sources)],
            "counters": {}}


class PartitionStream:
    """Batches of one (rank, partition), resumable from state()."""

    def __init__(
        self,
        sources: list[Source],
        plans: list[SourcePlan],
        schedule: MixSchedule,
        spec: PartitionSpec,
        state: dict[str, Any] | None = None,
    ):
        self.sources, self.plans, self.schedule, self.spec = sources, plans, schedule, spec
        state = state if state is not None else initial_state(len(sources))
        if len(state.get("sources", ())) != len(sources):
            raise ValueError(f"loader state has {len(state.get('sources', ()))} sources, this loader {len(sources)}")
        self.counters: dict[str, int] = {str(k): int(v) for k, v in state.get("counters", {}).items()}
        self.opened: list[str] = []
        """Shard files opened since the last drain_opened(), as '<label>/<file>'."""
        self.rows = [int(s["rows"]) for s in state["sources"]]
        self.shifts = [int(s.get("shift", 0)) for s in state["sources"]]
        self.readers: list[SourceReader] = []
        self.packers: list[Packer] = []
        for source, plan, pos in zip(sources, plans, state["sources"], strict=True):
            reader = SourceReader(source, plan, spec.rank, spec.part, spec.on_bad_data, self.counters,
                                  self._opener(source.label))
            reader.seek((pos["epoch"], pos["shard"], pos["member"]))
            packer = Packer(reader.next_doc, spec.seq_len, spec.cls_id, spec.sep_id)
            packer.resume(int(pos["offset"]))
            self.readers.append(reader)
            self.packers.append(packer)

    def _opener(self, label: str):
        def opened(file: str) -> None:
            self.opened.append(f"{label}/{file}")

        return opened

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, doc_ids), int64 [batch_size, seq_len]."""
        b, seq = self.spec.batch_size, self.spec.seq_len
        if len(self.sources) == 1:
            ids, docs = self.packers[0].rows(b)
            self.rows[0] += b
        else:
            picks = np.asarray(self.schedule.assign(self.rows, b))
            ids = np.empty((b, seq), dtype=np.int64)
            docs = np.empty((b, seq), dtype=np.int64)
            for s in range(len(self.sources)):
                where = np.flatnonzero(picks == s)
                if where.size:
                    ids[where], docs[where] = self.packers[s].rows(where.size)
        return torch.from_numpy(ids), torch.from_numpy(docs)

    def state(self) -> dict[str, Any]:
        """JSON-serialisable: where the next batch starts, and the counters so far."""
        positions = []
        for reader, packer, rows, shift in zip(self.readers, self.packers, self.rows, self.shifts, strict=True):
            epoch, shard, member = packer.head_position if packer.head is not None else reader.position
            position = {"epoch": epoch, "shard": shard, "member": member, "offset": packer.offset, "rows": rows}
            if shift:
                position["shift"] = shift
            positions.append(position)
        return {"sources": positions, "counters": dict(self.counters)}

    def drain_opened(self) -> list[str]:
        out, self.opened = self.opened, []
        return out
