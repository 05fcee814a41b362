"""Masked language modelling (BERT), with the knobs later work tuned.

- rate: fraction of eligible (non-special) tokens selected for prediction; 0.15 as BERT, 0.3-0.4
  as MosaicBERT, ModernBERT and Wettig et al. ("Should you mask 15% in MLM?") use. Each row gets a
  budget of rate * (its eligible tokens), met in expectation exactly (see common.select_units).
- mask_frac / random_frac: of the selected tokens, mask_frac become [MASK], random_frac a random
  ordinary token, the rest stay; chosen per token, also under whole-word masking (as BERT's
  whole-word release does).
- whole_word: select whole SentencePiece words (TokenInfo.word_start) instead of single pieces.
- order="left_to_right": the generalisation the design rests on. Each selected token is predicted
  from the position before it under causal attention (labels[t-1] = rows[t]), so the attention
  mask, not a [MASK] token, hides every target from the position that predicts it. Corrupting the
  input would hide context instead, so this order requires mask_frac=1.0 (hence random_frac=0).
  At rate 1.0 it selects every token that has a same-document predecessor, and the batch equals
  the causal objective's exactly (tests/test_objectives_causal_prefix.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from objectives.batch import IGNORE_INDEX, Batch, TokenInfo
from objectives.common import (
    check_rows,
    corrupt,
    next_token_labels,
    same_doc_as_previous,
    select_units,
    special_table,
    unit_starts,
)

ORDERS = ("any", "left_to_right")


@dataclass
class MLMConfig:
    """Masked language modelling parameters."""

    rate: float = 0.15
    """Fraction of eligible tokens selected for prediction, in (0, 1]."""
    mask_frac: float = 0.8
    """Fraction of selected tokens replaced by [MASK]."""
    random_frac: float = 0.1
    """Fraction of selected tokens replaced by a uniformly drawn ordinary token; the remaining
    1 - mask_frac - random_frac stay unchanged."""
    whole_word: bool = False
    """Select whole words (needs TokenInfo.word_start) rather than single pieces."""
    order: str = "any"
    """'any' (BERT: bidirectional attention, label at the token itself) or 'left_to_right' (label
    at the previous position, causal attention; requires mask_frac=1.0)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.rate <= 1.0:
            raise ValueError(f"MLMConfig.rate={self.rate} must lie in (0, 1]")
        for name in ("mask_frac", "random_frac"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"MLMConfig.{name}={value} must lie in [0, 1]")
        if self.mask_frac + self.random_frac > 1.0 + 1e-12:
            raise ValueError(f"MLMConfig.mask_frac + random_frac = {self.mask_frac} + {self.random_frac} exceeds 1")
        if self.order not in ORDERS:
            raise ValueError(f"MLMConfig.order={self.order!r} must be one of {ORDERS}")
        if self.order == "left_to_right" and self.mask_frac != 1.0:
            raise ValueError(
                f"MLMConfig.order='left_to_right' hides targets with the causal mask, so mask_frac must be "
                f"1.0 (and random_frac 0.0); got mask_frac={self.mask_frac}"
            )


def mlm(rows: torch.Tensor, doc_ids: torch.Tensor, gen: torch.Generator, tok: TokenInfo, cfg: MLMConfig) -> Batch:
    """Masked language modelling batch from packed rows; see the module docstring."""
    check_rows(rows, doc_ids, tok)
    eligible = ~special_table(tok)[rows]
    if cfg.order == "left_to_right":
        eligible &= same_doc_as_previous(doc_ids)
    starts = unit_starts(rows, doc_ids, eligible, tok, words=cfg.whole_word)
    selected = select_units(eligible, starts, cfg.rate, gen)
    if cfg.order == "left_to_right":
        labels = next_token_labels(rows, doc_ids, selected, tok)
        return Batch(rows.clone(), labels, doc_ids.clone(), "causal", "mlm")
    u = torch.rand(rows.shape, generator=gen)
    inputs = corrupt(rows, selected, u, cfg.mask_frac, cfg.random_frac, tok, gen)
    labels = torch.where(selected, rows, IGNORE_INDEX)
    return Batch(inputs, labels, doc_ids.clone(), "bidirectional", "mlm")
