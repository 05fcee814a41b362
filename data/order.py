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

Mixture. Each row comes from one source; the schedule gives the next row to the source furthest below its target
(largest target(n + 1) - rows_of_source, ties to the earlier source), where target(n) is the sum of the source's
weight over global rows 0..n-1. Fixed weights make the target weight * n; weights that follow knots (a source-mix
schedule: (global row, weights) knots, linear or held between them) make it the running sum of the scheduled
weight, in closed form per knot interval. The rule is deterministic, needs no state besides the row counts (so a
row's source is a function of its global index), and keeps every source within about one row of its target at any
point: over any run of rows, each source's realised share is the scheduled weight averaged over those rows, up to
about two rows, right after a knot as anywhere else.
"""

from __future__ import annotations

import math

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
    """Which source each row comes from (see the module docstring).

    weights: the mix from global row 0. knots: later (global row, weights) pairs, rows strictly increasing and
    > 0, weights >= 0 per source and not all 0 (an absent schedule: the weights hold forever). between: 'linear'
    moves the weights row by row from knot to knot; 'hold' keeps each knot's weights until the next knot. Every
    knot's weights are normalised to sum to 1."""

    def __init__(self, weights: list[float], knots: list[tuple[int, list[float]]] | None = None,
                 between: str = "linear"):
        if not weights or any(not w > 0 for w in weights):
            raise ValueError(f"mixture weights {weights} must all be > 0")
        if between not in ("linear", "hold"):
            raise ValueError(f"mixture schedule between={between!r}; choose linear or hold")
        self.weights = _normalised(weights)
        self.between = between
        self.knots: list[tuple[int, list[float]]] = [(0, self.weights)]
        for row, values in knots or []:
            if not isinstance(row, int) or row <= self.knots[-1][0]:
                raise ValueError(f"mixture schedule knot rows must be integers > 0 and strictly increasing, got "
                                 f"{[r for r, _ in knots or []]}")
            if len(values) != len(weights) or any(not (math.isfinite(w) and w >= 0) for w in values) \
                    or not sum(values) > 0:
                raise ValueError(f"mixture schedule knot at row {row}: weights {values} must be one number >= 0 "
                                 f"per source, not all 0")
            self.knots.append((row, _normalised(values)))
        # The target of every source at each knot's row: the running sum of its weight over the rows before.
        self._at_knot = [[0.0] * len(weights)]
        for k in range(1, len(self.knots)):
            self._at_knot.append(self._target_from(k - 1, self.knots[k][0]))

    @property
    def scheduled(self) -> bool:
        return len(self.knots) > 1

    def weights_at(self, row: int) -> list[float]:
        """The scheduled weights of global row `row`."""
        k = self._interval(row)
        start, values = self.knots[k]
        if self.between == "hold" or k == len(self.knots) - 1:
            return list(values)
        end, after = self.knots[k + 1]
        t = (row - start) / (end - start)
        return [a + (b - a) * t for a, b in zip(values, after, strict=True)]

    def target(self, n: int) -> list[float]:
        """Per source, the sum of its scheduled weight over global rows 0..n-1."""
        k = self._interval(max(n - 1, 0))
        return self._target_from(k, n)

    def _interval(self, row: int) -> int:
        k = 0
        while k + 1 < len(self.knots) and self.knots[k + 1][0] <= row:
            k += 1
        return k

    def _target_from(self, k: int, n: int) -> list[float]:
        """The targets at row n, from knot k's (knot k's row <= n <= the next knot's row)."""
        start, values = self.knots[k]
        m = n - start
        base = self._at_knot[k]
        if self.between == "hold" or k == len(self.knots) - 1:
            return [c + m * v for c, v in zip(base, values, strict=True)]
        span = self.knots[k + 1][0] - start
        after = self.knots[k + 1][1]
        ramp = m * (m - 1) / (2 * span)  # sum over j < m of j / span
        return [c + m * v + (b - v) * ramp for c, v, b in zip(base, values, after, strict=True)]

    def assign(self, counts: list[int], n: int) -> list[int]:
        """Sources of the next n rows given rows so far per source; updates counts in place."""
        if len(self.weights) == 1:
            counts[0] += n
            return [0] * n
        out = []
        if not self.scheduled:  # target(total) = weight * total
            for _ in range(n):
                total = sum(counts) + 1
                best = max(range(len(counts)), key=lambda s: (self.weights[s] * total - counts[s], -s))
                counts[best] += 1
                out.append(best)
            return out
        for _ in range(n):
            target = self.target(sum(counts) + 1)
            best = max(range(len(counts)), key=lambda s: (target[s] - counts[s], -s))
            counts[best] += 1
            out.append(best)
        return out


def _normalised(weights: list[float]) -> list[float]:
    total = float(sum(weights))
    return [float(w) / total for w in weights]
