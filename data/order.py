"""The data order: which document comes when, for every source, and which source each row comes from.

Everything here is a pure function of the manifests and the seed. The world size, the number of loader workers
and the batch size play no part: every rank and every worker computes the same order without talking to the
others, and a run resumed on other hardware continues the same order.

Shards. In epoch e, source s's shards are visited in a permutation seeded by (seed, s, e).

Windows. That shard order is cut into windows of `window_shards` consecutive shards (the last window of an
epoch may hold fewer). The documents of a window are visited in a permutation seeded by (seed, s, e, window
position), across all of its shards: prepare writes shards in corpus order (one topic, one site, one package
after another), and a window of several shards mixes documents that sit far apart in the corpus. A window of 1
shuffles inside each shard only. `shuffle_documents=False` keeps the file order of each shard (shards still in
the epoch's order). A position (epoch, window, member index in the window's order) names one document.

How well a window mixes: it holds the documents of `window_shards` shards drawn at random, so a topic that
fills a fraction p of the shards fills about p of a window, give or take sqrt(p(1-p)/window_shards); for topic
shares within a few points everywhere, a window must hold many shards (or all of them).

Memory: a reader holds one whole window (window_shards shards) at a time.

Mixture. Each row comes from one source; the schedule gives the next row to the source furthest below its share
(largest weight * rows_so_far - rows_of_source, ties to the earlier source). It is deterministic, needs no state
besides the row counts, and keeps every source within one row of its weight at any point, so realised token
proportions equal the weights up to one row per source.
"""

from __future__ import annotations

import numpy as np


class SourceOrder:
    """Shard and document order of one source, epoch after epoch."""

    def __init__(self, shards: int, seed: int, source_index: int, window_shards: int = 1,
                 shuffle_documents: bool = True):
        if shards < 1 or window_shards < 1:
            raise ValueError(f"shards={shards} and window_shards={window_shards} must be >= 1")
        self.num_shards, self.seed, self.source_index = shards, seed, source_index
        self.window_shards = min(window_shards, shards)
        self.shuffle_documents = shuffle_documents
        self._orders: dict[int, np.ndarray] = {}

    @property
    def windows_per_epoch(self) -> int:
        return -(-self.num_shards // self.window_shards)

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's permutation of all shard indices."""
        got = self._orders.get(epoch)
        if got is None:
            if len(self._orders) >= 4:  # readers move forward; a few recent epochs are all that is asked for
                self._orders.pop(next(iter(self._orders)))
            got = np.random.default_rng([self.seed, self.source_index, epoch]).permutation(self.num_shards)
            self._orders[epoch] = got
        return got

    def window(self, epoch: int, position: int) -> list[int]:
        """Shard indices of the epoch's window `position`, in the epoch's shard order."""
        k = self.window_shards
        return [int(i) for i in self.order(epoch)[position * k : (position + 1) * k]]

    def documents(self, epoch: int, position: int, count: int) -> np.ndarray:
        """Reading order of the `count` documents of window `position` (indices into its shards' members, shard
        after shard in the window's shard order, each shard's members in file order)."""
        if not self.shuffle_documents:
            return np.arange(count)
        return np.random.default_rng([self.seed, self.source_index, epoch, position]).permutation(count)


class MixSchedule:
    """Which source each row comes from (see the module docstring)."""

    def __init__(self, weights: list[float]):
        if not weights or any(not w > 0 for w in weights):
            raise ValueError(f"mixture weights {weights} must all be > 0")
        total = float(sum(weights))
        self.weights = [w / total for w in weights]

    def assign(self, counts: list[int], n: int) -> list[int]:
        """Sources of the next n rows given rows so far per source; updates counts in place."""
        if len(self.weights) == 1:
            counts[0] += n
            return [0] * n
        out = []
        for _ in range(n):
            total = sum(counts) + 1
            best = max(range(len(counts)), key=lambda s: (self.weights[s] * total - counts[s], -s))
            counts[best] += 1
            out.append(best)
        return out
