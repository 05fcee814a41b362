"""The contract between objectives/ and the trainer: what an objective returns.

An objective is a pure function of (rows, doc_ids, generator, TokenInfo, its config). It never
sees the model; the trainer passes the Batch fields to the model unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

IGNORE_INDEX = -100
"""Label value for positions that carry no loss (matches torch.nn.CrossEntropyLoss's default)."""

ATTENTION_KINDS = ("bidirectional", "causal", "prefix")


@dataclass(frozen=True)
class TokenInfo:
    """Token ids an objective needs. Built by the trainer from data/'s tokenizer, so objectives/
    does not import data/."""

    vocab_size: int
    """Size of the embedding table; valid ids are 0 .. vocab_size-1."""
    pad_id: int
    """[PAD]: never appears inside packed rows; may pad the tail of a short final row."""
    cls_id: int
    """[CLS]: starts every document."""
    sep_id: int
    """[SEP]: ends every document."""
    mask_id: int
    """[MASK]: replaces 80% (configurable) of the selected tokens."""
    special_ids: tuple[int, ...]
    """Every id that is never selected for prediction by MLM/span masking and never drawn as a
    random replacement ([PAD], [UNK], [CLS], [SEP], [MASK], mode tokens, ...)."""
    first_ordinary_id: int
    """Random replacements are drawn uniformly from first_ordinary_id .. vocab_size-1."""
    mode_ids: tuple[tuple[str, int], ...] = ()
    """(objective name, token id) pairs for UL2-style mode tokens, e.g. (("mlm", 5), ("span", 6),
    ("causal", 7), ("prefix", 8)). Read only by objectives built with mode_tokens=True; every id
    must also be listed in special_ids so that it is never selected or drawn as a replacement."""
    word_start: torch.Tensor | None = field(default=None, compare=False)
    """bool [vocab_size]: True for pieces that begin a word (SentencePiece pieces starting with
    U+2581). Needed by whole-word MLM and word-unit span masking; None when unknown."""

    def __post_init__(self) -> None:
        if not 0 <= self.first_ordinary_id < self.vocab_size:
            raise ValueError(
                f"first_ordinary_id={self.first_ordinary_id} must lie in [0, vocab_size={self.vocab_size})"
            )
        bad = [i for i in self.special_ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"special ids {bad} outside the vocabulary of size {self.vocab_size}")
        not_special = [(name, i) for name, i in self.mode_ids if i not in self.special_ids]
        if not_special:
            raise ValueError(f"mode token ids {not_special} must also be listed in special_ids")
        if self.word_start is not None and (
            self.word_start.dtype != torch.bool or tuple(self.word_start.shape) != (self.vocab_size,)
        ):
            raise ValueError(
                f"word_start must be a bool tensor of shape [{self.vocab_size}], got "
                f"{self.word_start.dtype} {tuple(self.word_start.shape)}"
            )


@dataclass
class Batch:
    """One micro-batch ready for the model. All tensors are [B, T] unless noted."""

    input_ids: torch.Tensor
    """int64 token ids fed to the encoder (after masking / replacement)."""
    labels: torch.Tensor
    """int64 target ids; IGNORE_INDEX (-100) where no loss is taken."""
    doc_ids: torch.Tensor
    """int64 per-token document index within the row (0, 1, 2, ...); attention never crosses
    documents."""
    attention: str
    """'bidirectional' | 'causal' | 'prefix' (prefix: bidirectional over the first prefix_len
    tokens, causal after)."""
    objective: str
    """Name of the objective that built this batch ('mlm', 'span', 'causal', ...), for logging."""
    prefix_len: torch.Tensor | None = None
    """[B] int64, only for attention='prefix'."""

    def __post_init__(self) -> None:
        assert self.attention in ATTENTION_KINDS, self.attention
        assert self.input_ids.shape == self.labels.shape == self.doc_ids.shape
        assert (self.prefix_len is not None) == (self.attention == "prefix")

    @property
    def num_labels(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())
