"""Who reads what, when: per-epoch shard orders, the equal-rows epoch rule, and the mixture's row schedule.

Everything here is a pure function of the manifests, the seed and the layout (world size, partitions per rank),
so every rank computes the same plan without talking to the others.

Shards. In epoch e, source s's shards are permuted by a generator seeded with (seed, s, e); rank r takes
perm[r::world_size] and its partition (loader worker) p takes that list's [p::partitions]. Partitions are
disjoint across ranks and within a rank.

Documents. Inside a shard, documents are visited in a permutation seeded by (seed, s, e, shard index):
prepare writes them in corpus order (files of one package, pages of one site side by side), and reading that
order would make every batch a run of near-duplicates. The permutation depends on the shard, not on who reads
it, so it is the same under any world size, and a position (epoch, shard position, member index) still names
one document: exact resume holds. `shuffle_documents=False` keeps the file order.

Equal batches per epoch. Ranks hold different numbers of tokens in an epoch (shards differ in size), so an
epoch defined by "my shards are exhausted" would end at different steps on different ranks. Instead, epoch e of
partition p ends, on every rank, after the same number of rows:

    end_rows(p, e) = min over ranks r of floor(framed tokens of (r, p) in epochs 0..e / seq_len)

(framed tokens: the shards' token counts plus [CLS] and [SEP] per document, from the manifest). Every rank
computes the same table, and the batch schedule (round robin over partitions, the mixture below) is the same on
every rank, so every rank crosses each epoch boundary at the same batch. A rank holding more tokens than the
minimum is not cut: its stream runs on, so its remainder is read at the start of the next epoch; nothing is
dropped. The data a row comes from is therefore never ahead of its epoch, only (by at most the rank's surplus)
behind it.

Mixture. Each row of a batch comes from one source; the schedule gives the next row to the source furthest
below its share (largest weight * rows_so_far - rows_of_source, ties to the earlier source). It is
deterministic, needs no state besides the row counts, and keeps every source within one row of its weight at
any point, so realised token proportions equal the weights up to one row per source.
"""

from __future__ import annotations

import bisect

import numpy as np


class SourcePlan:
    """Shard assignment and epoch boundaries of one source for a fixed layout."""

    def __init__(
        self,
        framed_tokens: list[int],
        seed: int,
        source_index: int,
        world_size: int,
        partitions: int,
        seq_len: int,
        shuffle_documents: bool = True,
    ):
        n = len(framed_tokens)
        if world_size * partitions > n:
            raise ValueError(f"{n} shards cannot give each of {world_size} ranks x {partitions} partitions one")
        self.framed = np.asarray(framed_tokens, dtype=np.int64)
        self.seed, self.source_index = seed, source_index
        self.world_size, self.partitions, self.seq_len = world_size, partitions, seq_len
        self.shuffle_documents = shuffle_documents
        # per partition: cumulative row counts at the end of epochs 0, 1, ... (extended on demand)
        self._ends: list[list[int]] = [[] for _ in range(partitions)]
        self._cum: list[np.ndarray] = [np.zeros(world_size, dtype=np.int64) for _ in range(partitions)]
        self._orders: dict[int, np.ndarray] = {}

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's permutation of all shard indices."""
        got = self._orders.get(epoch)
        if got is None:
            if len(self._orders) >= 4:  # readers move forward; a few recent epochs are all that is asked for
                self._orders.pop(next(iter(self._orders)))
            got = np.random.default_rng([self.seed, self.source_index, epoch]).permutation(len(self.framed))
            self._orders[epoch] = got
        return got

    def shards(self, epoch: int, rank: int, part: int) -> list[int]:
        """Shard indices partition `part` of `rank` reads in `epoch`, in reading order."""
        return [int(i) for i in self.order(epoch)[rank :: self.world_size][part :: self.partitions]]

    def documents(self, epoch: int, shard: int, count: int) -> np.ndarray:
        """Member indices of shard `shard` (manifest index, `count` members) in the order epoch `epoch` reads them."""
        if not self.shuffle_documents:
            return np.arange(count)
        return np.random.default_rng([self.seed, self.source_index, epoch, shard]).permutation(count)

    def epoch_tokens(self, epoch: int, rank: int, part: int) -> int:
        """Framed tokens ([CLS]/[SEP] included) that partition holds in that epoch, from the manifest."""
        return int(self.framed[self.shards(epoch, rank, part)].sum())

    def end_rows(self, part: int, epoch: int) -> int:
        """Rows partition `part` emits, on every rank, up to the end of `epoch` (see the module docstring)."""
        ends, cum = self._ends[part], self._cum[part]
        while len(ends) <= epoch:
            e = len(ends)
            order = self.order(e)
            for rank in range(self.world_size):
                cum[rank] += self.framed[order[rank :: self.world_size][part :: self.partitions]].sum()
            ends.append(int(cum.min()) // self.seq_len)
        return ends[epoch]

    def epoch_of_row(self, part: int, rows: int) -> int:
        """The epoch the partition's next row belongs to, after `rows` rows."""
        ends = self._ends[part]
        while not ends or ends[-1] <= rows:
            self.end_rows(part, len(ends))
        return bisect.bisect_right(ends, rows)


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
