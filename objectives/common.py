"""Pieces every objective shares: seeding, token classes, unit selection, 80/10/10 corruption,
next-token labels and UL2 mode tokens.

Conventions every objective follows (tested in tests/test_objectives_properties.py):
- A *target* is never a special token (TokenInfo.special_ids: [PAD], [UNK], [CLS], [SEP], [MASK],
  mode tokens). This one rule serves MLM, span masking, causal and prefix LM alike, which is what
  makes MLM at rate 1.0 in left-to-right order equal the causal objective exactly. In particular
  causal LM does not learn to predict [SEP]: cloze trains encoders, and document ends are given.
- Next-token labels sit at the position that predicts them: labels[t] = rows[t+1] when t and
  t+1 belong to the same document (so no prediction crosses a document, and the last position of a
  row has no label).
- Rows live on the CPU (the loader yields them there) and so does the generator; every random draw
  comes from the generator passed in, so a batch is a pure function of (rows, doc_ids, generator
  state, TokenInfo, config), and the inputs are never modified.
"""

from __future__ import annotations

import torch

from objectives.batch import IGNORE_INDEX, Batch, TokenInfo

_MASK64 = (1 << 64) - 1
GOLDEN64 = 0x9E3779B97F4A7C15
"""2^64 / golden ratio: the increment of splitmix64 and of the mixer's low-discrepancy sequence."""


def _splitmix64(x: int) -> int:
    x = (x + GOLDEN64) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix64(*parts: int) -> int:
    """A 64-bit hash of a tuple of integers (order matters); stable across processes and Python
    versions, unlike hash()."""
    h = 0
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK64))
    return h


_GENERATOR_DOMAIN = 0x6F626A65  # keeps these seeds apart from other users of mix64(seed, ...)


def step_generator(seed: int, rank: int, step: int, micro: int = 0) -> torch.Generator:
    """A CPU generator seeded from (seed, rank, step, micro-batch): the trainer makes one per
    micro-batch, so a resumed run rebuilds exactly the batches an uninterrupted run would have."""
    for name, value in (("rank", rank), ("step", step), ("micro", micro)):
        if value < 0:
            raise ValueError(f"step_generator: {name}={value} must be >= 0")
    gen = torch.Generator()
    gen.manual_seed(mix64(_GENERATOR_DOMAIN, seed, rank, step, micro) >> 1)
    return gen


def check_rows(rows: torch.Tensor, doc_ids: torch.Tensor, tok: TokenInfo) -> None:
    """ValueError unless rows/doc_ids are matching [B, T] int64 CPU tensors of valid ids."""
    if rows.dim() != 2 or rows.dtype != torch.int64:
        raise ValueError(f"rows must be a [B, T] int64 tensor, got {rows.dtype} {tuple(rows.shape)}")
    if doc_ids.shape != rows.shape or doc_ids.dtype != torch.int64:
        raise ValueError(
            f"doc_ids must be int64 with the shape of rows {tuple(rows.shape)}, got {doc_ids.dtype} "
            f"{tuple(doc_ids.shape)}"
        )
    if rows.device.type != "cpu":
        raise ValueError(f"objectives run on CPU rows (the loader's); got rows on {rows.device}")
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= tok.vocab_size):
        raise ValueError(
            f"rows hold ids outside [0, vocab_size={tok.vocab_size}): min {int(rows.min())}, "
            f"max {int(rows.max())}; does TokenInfo match the tokenizer that wrote the shards?"
        )


def special_table(tok: TokenInfo) -> torch.Tensor:
    """bool [vocab]: True for every special id."""
    table = torch.zeros(tok.vocab_size, dtype=torch.bool)
    if tok.special_ids:
        table[list(tok.special_ids)] = True
    return table


def ordinary_ids(tok: TokenInfo) -> torch.Tensor:
    """int64 ids a random replacement may take: first_ordinary_id .. vocab_size-1 minus specials."""
    ids = torch.arange(tok.first_ordinary_id, tok.vocab_size)
    ids = ids[~special_table(tok)[ids]]
    if ids.numel() == 0:
        raise ValueError(f"TokenInfo leaves no ordinary ids for random replacement: {tok}")
    return ids


def same_doc_as_previous(doc_ids: torch.Tensor) -> torch.Tensor:
    """bool [B, T]: position t has a predecessor t-1 in the same document (False at t = 0)."""
    out = torch.zeros_like(doc_ids, dtype=torch.bool)
    out[:, 1:] = doc_ids[:, 1:] == doc_ids[:, :-1]
    return out


def unit_starts(
    rows: torch.Tensor, doc_ids: torch.Tensor, eligible: torch.Tensor, tok: TokenInfo, words: bool
) -> torch.Tensor:
    """bool [B, T]: where a selection unit (a token, or a whole word) begins among eligible tokens.

    A word is a word-start piece and the non-word-start pieces after it; a word also ends at a
    special token or a document edge, so whole words never span two documents."""
    if not words:
        return eligible.clone()
    if tok.word_start is None:
        raise ValueError("whole-word units need TokenInfo.word_start (a bool [vocab] table); it is None")
    continues = eligible & same_doc_as_previous(doc_ids)
    continues[:, 1:] &= eligible[:, :-1]
    return eligible & (tok.word_start[rows] | ~continues)


def select_units(eligible: torch.Tensor, starts: torch.Tensor, rate: float, gen: torch.Generator) -> torch.Tensor:
    """bool [B, T]: whole units chosen in random order until they cover `rate` of each row's
    eligible tokens.

    A unit is taken when a uniform point inside its token interval (one offset per row) falls
    below the budget, so the expected count is exactly rate * n for token units and is unbiased up
    to a fraction of a word for word units; rate 1.0 takes every unit."""
    B, T = eligible.shape
    el = eligible.reshape(-1)
    st = starts.reshape(-1)
    unit_pos = st.nonzero().squeeze(1)
    n_units = unit_pos.numel()
    if n_units == 0:
        return torch.zeros_like(eligible)
    unit_of_token = st.cumsum(0) - 1
    lengths = torch.bincount(unit_of_token[el], minlength=n_units)
    row_of_unit = unit_pos // T
    # sort by (row, random key): a random unit order within each row, rows kept apart
    keys = row_of_unit.double() + torch.rand(n_units, dtype=torch.float64, generator=gen)
    order = keys.argsort()
    len_sorted = lengths[order]
    row_sorted = row_of_unit[order]
    per_row = eligible.sum(1)
    row_base = per_row.cumsum(0) - per_row
    end = len_sorted.cumsum(0) - row_base[row_sorted]
    offset = torch.rand(B, dtype=torch.float64, generator=gen)
    budget = rate * per_row.double()
    take_sorted = (end - len_sorted + offset[row_sorted] * len_sorted) < budget[row_sorted]
    take = torch.empty_like(take_sorted)
    take[order] = take_sorted
    return (eligible.reshape(-1) & take[unit_of_token.clamp(min=0)]).reshape(B, T)


def corrupt(
    rows: torch.Tensor,
    selected: torch.Tensor,
    u: torch.Tensor,
    mask_frac: float,
    random_frac: float,
    tok: TokenInfo,
    gen: torch.Generator,
) -> torch.Tensor:
    """A copy of rows where selected tokens become [MASK] (u < mask_frac), a uniformly drawn
    ordinary token (u < mask_frac + random_frac), or stay as they are. u is [B, T] in [0, 1);
    passing one value per span makes the choice per span."""
    out = rows.clone()
    out[selected & (u < mask_frac)] = tok.mask_id
    to_random = selected & (u >= mask_frac) & (u < mask_frac + random_frac)
    n = int(to_random.sum())
    if n:
        pool = ordinary_ids(tok)
        out[to_random] = pool[torch.randint(pool.numel(), (n,), generator=gen)]
    return out


def next_token_labels(rows: torch.Tensor, doc_ids: torch.Tensor, targets: torch.Tensor, tok: TokenInfo) -> torch.Tensor:
    """labels [B, T]: labels[t] = rows[t+1] where position t+1 is a target, is not special and lies
    in t's document; IGNORE_INDEX elsewhere."""
    ok = targets & ~special_table(tok)[rows] & same_doc_as_previous(doc_ids)
    labels = torch.full_like(rows, IGNORE_INDEX)
    labels[:, :-1] = torch.where(ok[:, 1:], rows[:, 1:], IGNORE_INDEX)
    return labels


def mode_id_for(name: str, tok: TokenInfo) -> int:
    ids = dict(tok.mode_ids)
    if name not in ids:
        raise ValueError(
            f"mode tokens are on but TokenInfo.mode_ids has no entry for objective {name!r} "
            f"(it has {sorted(ids)}); add ({name!r}, <id>) or turn mode tokens off"
        )
    return ids[name]


def prepend_mode_token(batch: Batch, mode_id: int) -> Batch:
    """UL2 mode token at position 0 of every row, keeping T fixed: everything shifts right by one
    and the last position drops out (its label with it). The mode token joins the row's first
    document (so with document masking only that document attends to it), carries no label, and
    lies inside the bidirectional prefix of a prefix batch. Labels move with their positions, so
    next-token labels stay next-token labels."""
    B = batch.input_ids.shape[0]

    def shift(x: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        return torch.cat([first, x[:, :-1]], dim=1)

    ids = shift(batch.input_ids, torch.full((B, 1), mode_id, dtype=batch.input_ids.dtype))
    labels = shift(batch.labels, torch.full((B, 1), IGNORE_INDEX, dtype=batch.labels.dtype))
    docs = shift(batch.doc_ids, batch.doc_ids[:, :1])
    prefix = None
    if batch.prefix_len is not None:
        prefix = (batch.prefix_len + 1).clamp(max=batch.input_ids.shape[1])
    return Batch(ids, labels, docs, batch.attention, batch.objective, prefix)
