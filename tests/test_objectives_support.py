"""Synthetic packed rows and slow reference implementations for the objectives tests (no tests here).

The rows imitate data/'s packer: documents framed [CLS] ... [SEP], concatenated and cut into rows
of length T, so a row may start mid-document and end before a [SEP]; doc_ids restart at 0 per row;
a short final row is padded with [PAD]. Ids follow the real tokenizer: [PAD]0 [UNK]1 [CLS]2 [SEP]3
[MASK]4, mode tokens 5-8, ordinary tokens from 9.
"""

from __future__ import annotations

import torch

from objectives.batch import IGNORE_INDEX, TokenInfo

VOCAB = 1000
PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
MODE_IDS = (("mlm", 5), ("span", 6), ("causal", 7), ("prefix", 8))
FIRST_ORDINARY = 9


def make_tok(word_start_frac: float = 0.6, seed: int = 0) -> TokenInfo:
    """TokenInfo for VOCAB ids; a random word_start_frac of the ordinary ids begin a word."""
    gen = torch.Generator().manual_seed(seed)
    word_start = torch.rand(VOCAB, generator=gen) < word_start_frac
    word_start[:FIRST_ORDINARY] = False
    return TokenInfo(
        vocab_size=VOCAB,
        pad_id=PAD,
        cls_id=CLS,
        sep_id=SEP,
        mask_id=MASK,
        special_ids=tuple(range(FIRST_ORDINARY)),
        first_ordinary_id=FIRST_ORDINARY,
        mode_ids=MODE_IDS,
        word_start=word_start,
    )


def doc_ids_of(rows: torch.Tensor) -> torch.Tensor:
    """A new document starts at every [CLS] except one at position 0."""
    is_cls = (rows == CLS).long()
    return is_cls.cumsum(1) - is_cls[:, :1]


def pack(
    docs: list[list[int]], T: int, offset: int = 0, pad_tail: int = 0, framed: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [B, T] and doc_ids from document bodies (framed here with [CLS] ... [SEP] unless
    framed=False, where only doc_ids tell documents apart), skipping `offset` tokens of the stream
    and padding the last `pad_tail` positions of the last row."""
    stream: list[int] = []
    owner: list[int] = []
    for i, body in enumerate(docs):
        doc = [CLS, *body, SEP] if framed else body
        stream += doc
        owner += [i] * len(doc)
    stream, owner = stream[offset:], owner[offset:]
    usable = max(T, len(stream) - len(stream) % T)
    stream = (stream + [PAD] * usable)[:usable]
    owner = (owner + [owner[-1] if owner else 0] * usable)[:usable]
    rows = torch.tensor(stream, dtype=torch.int64).view(-1, T)
    if pad_tail:
        rows[-1, T - pad_tail :] = PAD
    if framed:
        docs_ = doc_ids_of(rows)
    else:
        by_owner = torch.tensor(owner, dtype=torch.int64).view(-1, T)
        changes = torch.zeros_like(by_owner)
        changes[:, 1:] = (by_owner[:, 1:] != by_owner[:, :-1]).long()
        docs_ = changes.cumsum(1)
    if pad_tail:  # the loader's choice is not ours to know: give the pads a document of their own
        docs_[-1, T - pad_tail :] = docs_[-1, T - pad_tail - 1] + 1
    return rows, docs_


def make_rows(
    B: int, T: int, seed: int = 0, doc_min: int = 20, doc_max: int = 600, unk: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """B packed rows of documents with uniform lengths in [doc_min, doc_max]; a fraction `unk` of
    body tokens is [UNK]. The first row starts part-way into a document."""
    gen = torch.Generator().manual_seed(seed)
    docs, total = [], 0
    while total < B * T + doc_max + 2:
        n = int(torch.randint(doc_min, doc_max + 1, (1,), generator=gen))
        body = torch.randint(FIRST_ORDINARY, VOCAB, (n,), generator=gen)
        if unk:
            body[torch.rand(n, generator=gen) < unk] = UNK
        docs.append(body.tolist())
        total += n + 2
    offset = int(torch.randint(1, doc_min + 1, (1,), generator=gen))
    rows, doc_ids = pack(docs, T, offset)
    return rows[:B].clone(), doc_ids[:B].clone()


def reference_next_token(rows: torch.Tensor, doc_ids: torch.Tensor, first_target: list[int]) -> torch.Tensor:
    """Slow reference: labels[b, t] = rows[b, t+1] when t+1 >= first_target[b], both positions are
    in one document and rows[b, t+1] is an ordinary token."""
    B, T = rows.shape
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.int64)
    r, d = rows.tolist(), doc_ids.tolist()
    for b in range(B):
        for t in range(T - 1):
            if t + 1 >= first_target[b] and d[b][t] == d[b][t + 1] and r[b][t + 1] >= FIRST_ORDINARY:
                labels[b, t] = r[b][t + 1]
    return labels


def runs(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, end) flat indices of maximal runs of True in a [B, T] bool tensor, rows kept apart."""
    B, T = flags.shape
    padded = torch.zeros(B, T + 2, dtype=torch.int8)
    padded[:, 1:-1] = flags.to(torch.int8)
    edges = padded[:, 1:] - padded[:, :-1]
    starts = (edges == 1).nonzero()
    ends = (edges == -1).nonzero()
    return starts[:, 0] * T + starts[:, 1], ends[:, 0] * T + ends[:, 1]


def tokenizer_token_info(spm_model) -> TokenInfo:
    """The TokenInfo the trainer builds from a prepared dataset's SentencePiece model (real ids, not the synthetic
    ones above)."""
    from data.tokenizer import Tokenizer

    tok = Tokenizer(spm_model)
    return TokenInfo(vocab_size=tok.vocab_size, pad_id=tok.pad_id, cls_id=tok.cls_id, sep_id=tok.sep_id,
                     mask_id=tok.mask_id, special_ids=tuple(tok.special_ids), first_ordinary_id=tok.first_ordinary_id,
                     mode_ids=tuple(sorted(tok.mode_ids.items())), word_start=torch.as_tensor(tok.word_start))
