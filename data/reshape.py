"""Resuming on another layout: every old rank's loader state mapped onto a loader with a new world size or
number of workers (Loader.load_reshaped).

The old positions name places in a shard split that no longer exists, so they cannot be continued. The rule
(also in launch/train/resume.py): per source, the new loader restarts the earliest epoch that any old rank's
partition was still reading, from its first shard, with the new split. Nothing is skipped: every epoch before
it was read whole by every old partition. What the old partitions had already read of that epoch (and beyond
it) is read again, about one epoch at most.

"Still reading" is judged by the data position, not by the reported epoch: the equal-rows rule (data/plan.py)
lets a rank's reader lag its reported epoch by its surplus, and restarting the reported epoch would skip that
rank's unread tail. A position just past the last document of an epoch counts as the next epoch.

Two things carry over besides the epochs:
- the mixture counts. Each new partition starts with the same row counts per source (the old rows of the whole
  world shared out evenly, split by weight), so the mixture schedule continues balanced instead of feeding
  the restarted source alone until its count catches up; the per-source `shift` (data/partition.py) makes the
  epoch rule count rows from the restarted epoch's first row. tokens/<source> summed over ranks therefore
  continues, give or take a row per partition.
- the counters (skipped shards and samples): the old ranks' totals go to the new rank 0, so sums over ranks
  continue.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from data.partition import epoch_rows
from data.plan import SourcePlan

if TYPE_CHECKING:
    from data.loader import Loader

_SAME = ("seed", "shuffle_documents", "seq_len", "batch_size")
_KEYS = ("epoch", "shard", "member", "offset", "rows")


def _refuse(what: str) -> ValueError:
    return ValueError(f"cannot resume from the old ranks' loader states: {what}")


def _checked(loader: Loader, old_states: Any, version: int) -> list[dict[str, Any]]:
    """The old states sorted by rank, after checking they are a whole world's, over this loader's data."""
    if not isinstance(old_states, (list, tuple)) or not old_states:
        raise _refuse(f"expected a non-empty list of every old rank's state_dict(), got {type(old_states).__name__}")
    mine = loader._fingerprint()
    for i, state in enumerate(old_states):
        if not isinstance(state, dict) or state.get("version") != version:
            got = state.get("version") if isinstance(state, dict) else type(state).__name__
            raise _refuse(f"state {i} has version {got!r}, not {version} (saved by another cloze?)")
        for key in _SAME:
            if state.get(key) != mine[key]:
                raise _refuse(f"they were saved with {key}={state.get(key)!r}, this loader has {mine[key]!r}; "
                              "resume with the same seed, seq_len and batch size (only ranks and workers may change)")
        saved = [s[::2] if isinstance(s, list) and len(s) == 3 else s for s in state.get("sources") or []]
        wanted = [[label, shards] for label, _, shards in mine["sources"]]
        if saved != wanted:
            raise _refuse(f"they cover sources {saved} ([label, shards]), this loader {wanted}; resume over the "
                          "same data sources")
    world = len(old_states)
    ranks = sorted(s.get("rank") for s in old_states if isinstance(s.get("rank"), int))
    if ranks != list(range(world)) or any(s.get("world_size") != world for s in old_states):
        raise _refuse(f"{world} state(s) with ranks {[s.get('rank') for s in old_states]} and world sizes "
                      f"{sorted({s.get('world_size') for s in old_states}, key=str)}; pass one state per old rank")
    parts = old_states[0].get("partitions")
    for s in old_states:
        states = s.get("partition_states")
        if (not isinstance(parts, int) or parts < 1 or s.get("partitions") != parts or not isinstance(states, list)
                or len(states) != parts):
            raise _refuse(f"rank {s['rank']}'s partitions / partition_states are damaged or differ between ranks")
    return sorted(old_states, key=lambda s: s["rank"])


def _restart_epoch(old_states: list[dict[str, Any]], loader: Loader, s: int, old_plan: SourcePlan) -> int:
    """Source s's earliest epoch any old partition was still reading (see the module docstring)."""
    samples = [shard.samples for shard in loader.sources[s].manifest.shards]
    earliest = None
    for state in old_states:
        rank = state["rank"]
        for part, saved in enumerate(state["partition_states"]):
            positions = saved.get("sources") if isinstance(saved, dict) else None
            pos = positions[s] if isinstance(positions, list) and len(positions) == len(loader.sources) else None
            if not (isinstance(pos, dict) and all(isinstance(pos.get(k), int) and pos[k] >= 0 for k in _KEYS)):
                raise _refuse(f"rank {rank}, partition {part}: bad position {pos!r}")
            order = old_plan.shards(pos["epoch"], rank, part)
            if pos["shard"] >= len(order):
                raise _refuse(f"rank {rank}, partition {part}: position {pos!r} is past its shards; was it saved "
                              "for this dataset?")
            epoch = pos["epoch"]
            if pos["shard"] == len(order) - 1 and pos["offset"] == 0 and pos["member"] >= samples[order[-1]]:
                epoch += 1  # the epoch's last document is handed out whole: that epoch is done
            earliest = epoch if earliest is None else min(earliest, epoch)
    assert earliest is not None
    return earliest


def _apportion(weights: list[float], total: int) -> list[int]:
    """total rows split by weight, each within one row of its share (largest remainders, ties to the first)."""
    exact = [w * total for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda s: (-(exact[s] - counts[s]), s))
    for s in by_remainder[: total - sum(counts)]:
        counts[s] += 1
    return counts


def reshaped_states(loader: Loader, old_states: Any, version: int) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """This loader's partition states for resuming from every old rank's state_dict(), and the epoch each
    source restarts (by label)."""
    old = _checked(loader, old_states, version)
    cfg = loader.config
    old_world, old_parts = len(old), old[0]["partitions"]
    epochs: list[int] = []
    for s, source in enumerate(loader.sources):
        try:
            old_plan = SourcePlan(source.framed_tokens(), cfg.seed, source.index, old_world, old_parts, cfg.seq_len,
                                  cfg.shuffle_documents)
        except ValueError as e:
            raise _refuse(f"source {source.label!r}: {e}") from None
        epochs.append(_restart_epoch(old, loader, s, old_plan))
    old_rows = sum(int(pos["rows"]) for state in old for saved in state["partition_states"]
                   for pos in saved["sources"])
    counts = _apportion(loader.schedule.weights, old_rows // (cfg.world_size * loader.partitions))
    counters: dict[str, int] = {}
    for state in old:
        for saved in state["partition_states"]:
            for key, value in (saved.get("counters") or {}).items():
                counters[str(key)] = counters.get(str(key), 0) + int(value)
    states = []
    for part in range(loader.partitions):
        positions = []
        for plan, epoch, rows in zip(loader.plans, epochs, counts, strict=True):
            start = plan.end_rows(part, epoch - 1) if epoch > 0 else 0  # the epoch rule's rows at its first row
            position = {"epoch": epoch, "shard": 0, "member": 0, "offset": 0, "rows": rows}
            if start != rows:
                position["shift"] = start - rows
            assert epoch_rows(position) == start
            positions.append(position)
        first = cfg.rank == 0 and part == 0
        states.append({"sources": positions, "counters": dict(counters) if first else {}})
    return states, {source.label: epoch for source, epoch in zip(loader.sources, epochs, strict=True)}
