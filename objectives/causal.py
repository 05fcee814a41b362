"""Causal language modelling on packed rows.

labels[t] = rows[t+1] when t and t+1 lie in the same document and rows[t+1] is not special;
IGNORE_INDEX elsewhere (so no prediction crosses a document boundary and a row's last position has
no label). Attention is 'causal'; the model adds the document mask from doc_ids. Predicting 100% of
the tokens left to right is the limit of masking: MLMConfig(rate=1.0, mask_frac=1.0,
random_frac=0.0, order='left_to_right') builds this very batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from objectives.batch import Batch, TokenInfo
from objectives.common import check_rows, next_token_labels


@dataclass
class CausalConfig:
    """Causal language modelling has no parameters: every non-special token with a same-document
    predecessor is a target. The class exists so that every objective is configured alike."""


def causal(rows: torch.Tensor, doc_ids: torch.Tensor, gen: torch.Generator, tok: TokenInfo, cfg: CausalConfig) -> Batch:
    """Next-token labels under causal attention; draws nothing from gen."""
    check_rows(rows, doc_ids, tok)
    labels = next_token_labels(rows, doc_ids, torch.ones_like(rows, dtype=torch.bool), tok)
    return Batch(rows.clone(), labels, doc_ids.clone(), "causal", "causal")
