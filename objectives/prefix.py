"""Prefix language modelling: UL2's S-denoiser on packed rows.

Each row is split at a random point n: attention is bidirectional over positions < n and causal
from n on (Batch.attention='prefix', Batch.prefix_len=n), and the loss is on the remainder only:
labels[t] = rows[t+1] for every t+1 >= n in t's document (the token at n is predicted from the
last prefix position, which sees the whole prefix). The split is per row, not per document: the
document that holds the split point is S-denoised, documents wholly inside the prefix are context
without loss, and documents after it are plain causal LM. The contract carries one prefix length
per row, which is what allows no finer split.

n is drawn uniformly from the integers in [ceil(min_frac * L), floor(max_frac * L)], L being the
row's non-[PAD] length (UL2 splits at a uniformly random point; the bounds keep both parts from
vanishing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from objectives.batch import Batch, TokenInfo
from objectives.common import check_rows, next_token_labels

_EPS = 1e-9  # keeps 0.2 * 500 = 100.00000000000001 from rounding up to 101


@dataclass
class PrefixConfig:
    """Prefix LM parameters."""

    min_frac: float = 0.2
    """Shortest prefix as a fraction of the row's non-[PAD] length, in [0, max_frac]."""
    max_frac: float = 0.8
    """Longest prefix as a fraction of the row's non-[PAD] length, in [min_frac, 1]."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_frac <= 1.0:
            raise ValueError(f"PrefixConfig.min_frac={self.min_frac} must lie in [0, 1]")
        if not 0.0 <= self.max_frac <= 1.0:
            raise ValueError(f"PrefixConfig.max_frac={self.max_frac} must lie in [0, 1]")
        if self.min_frac > self.max_frac:
            raise ValueError(f"PrefixConfig.min_frac={self.min_frac} exceeds max_frac={self.max_frac}")


def prefix_bounds(lengths: torch.Tensor, cfg: PrefixConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest and largest prefix length (inclusive) for rows of the given non-[PAD] lengths."""
    lengths = lengths.double()
    lo = torch.ceil(cfg.min_frac * lengths - _EPS).long()
    hi = torch.floor(cfg.max_frac * lengths + _EPS).long()
    return lo, torch.maximum(hi, lo)


def prefix_lm(
    rows: torch.Tensor, doc_ids: torch.Tensor, gen: torch.Generator, tok: TokenInfo, cfg: PrefixConfig
) -> Batch:
    """Prefix-LM batch: a random bidirectional prefix per row, next-token loss after it."""
    check_rows(rows, doc_ids, tok)
    B, T = rows.shape
    lo, hi = prefix_bounds((rows != tok.pad_id).sum(1), cfg)
    draw = torch.rand(B, dtype=torch.float64, generator=gen)
    n = torch.minimum(lo + (draw * (hi - lo + 1).double()).long(), hi)
    targets = torch.arange(T).unsqueeze(0) >= n.unsqueeze(1)
    labels = next_token_labels(rows, doc_ids, targets, tok)
    return Batch(rows.clone(), labels, doc_ids.clone(), "prefix", "prefix", prefix_len=n)
