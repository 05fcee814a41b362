"""The fixed evaluation set, split across ranks so that its rows, their masks and the reduced result do not depend on
the world size.

    share = eval_share("runs/heldout", seq_len=512, batch_size=8, batches=16, rank=r, world_size=w, seed=0)
    for b in share:            # ceil(16 / w) entries on every rank
        ...                    # b.index seeds b's masks; b.counted is False for a rank's padding entry

The set is the first `batches` batches of `batch_size` rows of the eval data read as one world-size-1 stream
(build_loader with rank 0 of 1, seeded by the eval seed), so any number of shards works, one included, with any
number of ranks. Batch k goes to rank k % world_size. Every rank gets the same number of entries,
ceil(batches / world_size), because under ZeRO-3 a forward pass is a collective (parameters are gathered): a rank
short of a batch gets batch (k % batches) again with counted=False, to run and leave out of its sums. Summing the
counted entries' statistics over ranks then gives, for the same weights, what one rank evaluating the whole set
gives, up to the order of the floating-point additions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class EvalBatch:
    """One entry of a rank's share of the evaluation set."""

    index: int
    """The batch's position in the whole set, 0..batches-1 (the same on every world size: seeds its masks)."""
    counted: bool
    """False for the padding entry of a rank with fewer batches than others: run it, do not count it."""
    input_ids: torch.Tensor
    """int64 [batch_size, seq_len]."""
    doc_ids: torch.Tensor
    """int64 [batch_size, seq_len]."""


def share_indices(batches: int, rank: int, world_size: int) -> list[tuple[int, bool]]:
    """(set index, counted) of each entry rank reads: k = rank, rank + world, ...; padded to ceil(batches / world)
    entries with repeats that are not counted."""
    if batches < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"eval batches={batches}, rank={rank}, world_size={world_size}: need batches >= 1 and "
                         "0 <= rank < world_size")
    slots = math.ceil(batches / world_size)
    out = []
    for j in range(slots):
        k = rank + j * world_size
        out.append((k, True) if k < batches else (k % batches, False))
    return out


def eval_share(path: str, seq_len: int, batch_size: int, batches: int, rank: int, world_size: int, seed: int,
               **read: Any) -> list[EvalBatch]:
    """This rank's entries of the evaluation set of `path` (a prepared folder, http(s) URL or pipe: command).
    `read` goes to build_loader: read_stall_s, read_timeout_s, cache_dir, cache_max_bytes, on_bad_data."""
    from data.loader import build_loader

    wanted = share_indices(batches, rank, world_size)
    needed = {k for k, _ in wanted}
    rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    loader = build_loader([(path, 1.0)], seq_len=seq_len, batch_size=batch_size, rank=0, world_size=1, seed=seed,
                          num_workers=0, **read)
    try:
        for k in range(max(needed) + 1):
            ids, docs = next(loader)
            if k in needed:
                rows[k] = (ids, docs)
    finally:
        loader.close()
    return [EvalBatch(k, counted, *rows[k]) for k, counted in wanted]
