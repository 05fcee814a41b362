"""Span masking (SpanBERT), with T5's noise density and mean span length as the same knobs.

Span lengths follow SpanBERT: Geometric(p) on 1, 2, ... truncated at max_span and renormalised
(SpanBERT's "clipping"; mean 3.8 for p=0.2, max 10, whereas min(L, 10) would have mean 4.46),
counted in tokens or in whole words (unit="word", TokenInfo.word_start). T5's span corruption
(noise density 0.15, mean noise span length 3) is SpanConfig(rate=0.15, mean_span=3.0,
max_span=None): giving mean_span instead of p solves for the p with that mean.

Placement. Each *segment* (a maximal run of eligible units inside one document, so bounded by
[CLS]/[SEP], any other special token, a document change or a row edge) is tiled by an alternating
renewal process: gap, span, gap, span, ... Gaps are 1 + Geometric with mean
E[gap] = E[span] * (1 - rate) / rate, so adjacent spans never touch and a fraction `rate` of the
units is masked in expectation; this is the masking budget. The process starts in its stationary
state (inside a span with probability `rate`, with the equilibrium residual length), so every
position, the first of a segment included, is masked with probability `rate` and the budget holds
exactly in expectation whatever the segment lengths. A span that runs past its segment's end is
cut there; that and the residual first span are the only spans whose lengths are not drawn from
the distribution above, a few per cent of spans in documents of a few hundred tokens. rate must not
exceed E[span] / (E[span] + 1), where every gap would be a single unit.

Each span is then, as a whole, replaced by [MASK] tokens (mask_frac), by random ordinary tokens
(random_frac) or left unchanged. Labels are the original tokens of every masked position
(bidirectional attention). Fully vectorised: the whole batch is one flat array of units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from objectives.batch import IGNORE_INDEX, Batch, TokenInfo
from objectives.common import check_rows, corrupt, same_doc_as_previous, special_table, unit_starts

UNITS = ("token", "word")
_DEFAULT_P = 0.2


def truncated_geometric_mean(p: float, max_span: int | None) -> float:
    """Mean of Geometric(p) on 1, 2, ... conditioned on being <= max_span (None: not truncated)."""
    if p == 1.0:
        return 1.0
    q = 1.0 - p
    if max_span is None:
        return 1.0 / p
    total = (1.0 - q**max_span) / p - max_span * q**max_span  # sum of k p q^(k-1), k <= max_span
    return total / (1.0 - q**max_span)


def solve_p(mean_span: float, max_span: int | None) -> float:
    """The p whose truncated geometric has the given mean (the mean falls as p grows)."""
    if mean_span == 1.0:
        return 1.0
    if max_span is None:
        return 1.0 / mean_span
    lo, hi = 1e-12, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if truncated_geometric_mean(mid, max_span) > mean_span:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@dataclass
class SpanConfig:
    """Span masking parameters."""

    rate: float = 0.15
    """Expected fraction of eligible units (tokens or words) masked: the budget, in (0, 1)."""
    p: float | None = None
    """Geometric success probability of the span length, in (0, 1]; None means 0.2 (SpanBERT)
    unless mean_span is given."""
    mean_span: float | None = None
    """Alternative to p: the mean span length (T5's mean_noise_span_length); p is solved from it."""
    max_span: int | None = 10
    """Longest span in units; lengths are truncated there and renormalised. None: no limit."""
    unit: str = "token"
    """'token' or 'word' (SpanBERT: whole words, needs TokenInfo.word_start): what lengths count."""
    mask_frac: float = 0.8
    """Fraction of spans replaced by [MASK] tokens."""
    random_frac: float = 0.1
    """Fraction of spans replaced by random ordinary tokens; the rest stay unchanged."""

    def __post_init__(self) -> None:
        if self.max_span is not None and (not isinstance(self.max_span, int) or self.max_span < 1):
            raise ValueError(f"SpanConfig.max_span={self.max_span!r} must be an integer >= 1 or None")
        if self.p is not None and self.mean_span is not None:
            raise ValueError(f"SpanConfig: give p={self.p} or mean_span={self.mean_span}, not both")
        if self.p is not None and not 0.0 < self.p <= 1.0:
            raise ValueError(f"SpanConfig.p={self.p} must lie in (0, 1]")
        if self.mean_span is not None:
            top = math.inf if self.max_span is None else (self.max_span + 1) / 2
            if not 1.0 <= self.mean_span < top:
                raise ValueError(
                    f"SpanConfig.mean_span={self.mean_span} must lie in [1, {top}) for max_span={self.max_span}"
                )
        if self.unit not in UNITS:
            raise ValueError(f"SpanConfig.unit={self.unit!r} must be one of {UNITS}")
        for name in ("mask_frac", "random_frac"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"SpanConfig.{name}={value} must lie in [0, 1]")
        if self.mask_frac + self.random_frac > 1.0 + 1e-12:
            raise ValueError(f"SpanConfig.mask_frac + random_frac = {self.mask_frac} + {self.random_frac} exceeds 1")
        if self.p is not None:
            self._p = self.p
        elif self.mean_span is not None:
            self._p = solve_p(self.mean_span, self.max_span)
        else:
            self._p = _DEFAULT_P
        mean = self.expected_span()
        if not 0.0 < self.rate <= mean / (mean + 1.0):
            raise ValueError(
                f"SpanConfig.rate={self.rate} must lie in (0, {mean / (mean + 1.0):.4f}]: spans of mean length "
                f"{mean:.3f} need at least one unmasked unit between them"
            )

    @property
    def geometric_p(self) -> float:
        """The p in use (given, solved from mean_span, or the default)."""
        return self._p

    def expected_span(self) -> float:
        """Mean span length in units before any cut at a segment end."""
        return truncated_geometric_mean(self._p, self.max_span)


def _span_lengths(n: int, p: float, max_span: int | None, gen: torch.Generator) -> torch.Tensor:
    """n draws of the truncated geometric by inverting its CDF."""
    if p == 1.0:
        return torch.ones(n, dtype=torch.int64)
    u = torch.rand(n, dtype=torch.float64, generator=gen)
    q = 1.0 - p
    tail = 1.0 if max_span is None else 1.0 - q**max_span
    lengths = torch.ceil(torch.log1p(-u * tail) / math.log(q)).long().clamp(min=1)
    return lengths if max_span is None else lengths.clamp(max=max_span)


def _residual_lengths(n: int, p: float, max_span: int | None, gen: torch.Generator) -> torch.Tensor:
    """n draws of the equilibrium residual span length P(R = r) = P(L >= r) / E[L]."""
    if max_span is None or p == 1.0:  # memoryless: the residual is distributed as the span
        return _span_lengths(n, p, max_span, gen)
    q = 1.0 - p
    r = torch.arange(1, max_span + 1, dtype=torch.float64)
    survival = (q ** (r - 1) - q**max_span) / (1.0 - q**max_span)
    return torch.multinomial(survival, n, replacement=True, generator=gen) + 1


def _gaps(n: int, mean: float, gen: torch.Generator) -> torch.Tensor:
    """n draws of 1 + Geometric on 0, 1, ... with the given overall mean (>= 1)."""
    extra = mean - 1.0
    if extra <= 1e-12:
        return torch.ones(n, dtype=torch.int64)
    a = extra / (1.0 + extra)
    u = 1.0 - torch.rand(n, dtype=torch.float64, generator=gen)  # in (0, 1]
    return 1 + torch.floor(torch.log(u) / math.log(a)).long()


def _place_spans(
    eligible: torch.Tensor,
    doc_ids: torch.Tensor,
    starts: torch.Tensor,
    cfg: SpanConfig,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(masked [B, T] bool, per-token uniform shared by each span [B, T])."""
    shape = eligible.shape
    el = eligible.reshape(-1)
    st = starts.reshape(-1)
    continues = eligible & same_doc_as_previous(doc_ids)
    continues[:, 1:] &= eligible[:, :-1]
    seg_start = (eligible & ~continues).reshape(-1)
    unit_pos = st.nonzero().squeeze(1)
    n_units = unit_pos.numel()
    if n_units == 0:
        return torch.zeros_like(eligible), torch.zeros(shape, dtype=torch.float64)
    unit_of_token = (st.cumsum(0) - 1).clamp(min=0)
    seg_of_unit = seg_start[unit_pos].long().cumsum(0) - 1
    n_segs = int(seg_of_unit[-1]) + 1
    seg_len = torch.bincount(seg_of_unit, minlength=n_segs)
    seg_first = seg_len.cumsum(0) - seg_len

    # gap + span >= 2 after the first cycle (>= 1), so len // 2 + 2 cycles overrun every segment
    cycles = seg_len // 2 + 2
    seg_of_cycle = torch.repeat_interleave(torch.arange(n_segs), cycles)
    first_cycle = cycles.cumsum(0) - cycles
    n_cycles = int(cycles.sum())
    mean_span = cfg.expected_span()
    lengths = _span_lengths(n_cycles, cfg.geometric_p, cfg.max_span, gen)
    gaps = _gaps(n_cycles, mean_span * (1.0 - cfg.rate) / cfg.rate, gen)
    start_inside = torch.rand(n_segs, dtype=torch.float64, generator=gen) < cfg.rate
    residual = _residual_lengths(n_segs, cfg.geometric_p, cfg.max_span, gen)
    gaps[first_cycle] = torch.where(start_inside, 0, gaps[first_cycle])
    lengths[first_cycle] = torch.where(start_inside, residual, lengths[first_cycle])

    cycle_len = gaps + lengths
    ends = cycle_len.cumsum(0)
    ends = ends - (ends[first_cycle] - cycle_len[first_cycle])[seg_of_cycle]
    span_starts = ends - lengths
    seg_n = seg_len[seg_of_cycle]
    assert bool((ends[cycles.cumsum(0) - 1] > seg_len).all()), "renewal cycles did not cover a segment"
    keep = span_starts < seg_n
    g_start = (seg_first[seg_of_cycle] + span_starts)[keep]
    g_end = (seg_first[seg_of_cycle] + torch.minimum(ends, seg_n))[keep]

    depth = torch.zeros(n_units + 1, dtype=torch.int64)
    depth.index_add_(0, g_start, torch.ones_like(g_start))
    depth.index_add_(0, g_end, -torch.ones_like(g_end))
    masked_unit = depth.cumsum(0)[:n_units] > 0
    first = torch.zeros(n_units, dtype=torch.int64)
    first[g_start] = 1
    span_of_unit = (first.cumsum(0) - 1).clamp(min=0)
    span_u = torch.rand(g_start.numel() + 1, dtype=torch.float64, generator=gen)
    masked = el & masked_unit[unit_of_token]
    u = span_u[span_of_unit[unit_of_token]]
    return masked.reshape(shape), u.reshape(shape)


def span_mask(
    rows: torch.Tensor, doc_ids: torch.Tensor, gen: torch.Generator, tok: TokenInfo, cfg: SpanConfig
) -> Batch:
    """SpanBERT-style span masking batch from packed rows; see the module docstring."""
    check_rows(rows, doc_ids, tok)
    eligible = ~special_table(tok)[rows]
    starts = unit_starts(rows, doc_ids, eligible, tok, words=cfg.unit == "word")
    masked, u = _place_spans(eligible, doc_ids, starts, cfg, gen)
    inputs = corrupt(rows, masked, u, cfg.mask_frac, cfg.random_frac, tok, gen)
    labels = torch.where(masked, rows, IGNORE_INDEX)
    return Batch(inputs, labels, doc_ids.clone(), "bidirectional", "span")
