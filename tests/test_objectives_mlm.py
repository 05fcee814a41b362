"""MLM: selection rate, the 80/10/10 split, whole words, special tokens, validation."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from objectives import IGNORE_INDEX, MLMConfig, mlm
from tests.test_objectives_support import FIRST_ORDINARY, MASK, make_rows, make_tok

TOK = make_tok()
# 256 x 512 = 131k tokens, about 129k eligible: the walking skeleton asks for >= 100k.
ROWS, DOCS = make_rows(256, 512, seed=1, unk=0.01)
ELIGIBLE = ROWS >= FIRST_ORDINARY


def _split(batch, rows):
    """Fractions of selected tokens that became [MASK], stayed, or changed to another token."""
    sel = batch.labels != IGNORE_INDEX
    n = int(sel.sum())
    masked = int((batch.input_ids[sel] == MASK).sum()) / n
    kept = int((batch.input_ids[sel] == rows[sel]).sum()) / n
    return masked, kept, 1.0 - masked - kept


@pytest.mark.parametrize("rate", [0.15, 0.3, 0.4])
def test_rate_and_split(rate):
    batch = mlm(ROWS, DOCS, torch.Generator().manual_seed(0), TOK, MLMConfig(rate=rate))
    assert int(ELIGIBLE.sum()) >= 100_000
    sel = batch.labels != IGNORE_INDEX
    # Each row takes floor(rate * n + U) tokens, so the realised rate is within 1/n of the target
    # per row; +-1% (required) is loose.
    assert abs(int(sel.sum()) / int(ELIGIBLE.sum()) - rate) < 0.01
    masked, kept, random = _split(batch, ROWS)
    # >= 19k selected tokens: binomial sd of the 0.8 share is <= 0.29%, so +-1.5% is > 5 sd. A random
    # replacement equal to the original (p = 1/991) counts as "kept", a 0.01% shift.
    assert abs(masked - 0.8) < 0.015
    assert abs(random - 0.1) < 0.015
    assert abs(kept - 0.1) < 0.015


def test_split_is_configurable():
    cfg = MLMConfig(rate=0.3, mask_frac=0.5, random_frac=0.3)
    batch = mlm(ROWS, DOCS, torch.Generator().manual_seed(3), TOK, cfg)
    masked, kept, random = _split(batch, ROWS)
    # 38k selected tokens: sd of each share <= 0.26%; 1.5% is > 5 sd.
    assert abs(masked - 0.5) < 0.015 and abs(random - 0.3) < 0.015 and abs(kept - 0.2) < 0.015


def test_specials_never_selected_and_replacements_ordinary():
    batch = mlm(ROWS, DOCS, torch.Generator().manual_seed(1), TOK, MLMConfig(rate=0.4))
    sel = batch.labels != IGNORE_INDEX
    assert not sel[~ELIGIBLE].any()
    assert torch.equal(batch.input_ids[~sel], ROWS[~sel])
    assert torch.equal(batch.labels[sel], ROWS[sel])
    changed = sel & (batch.input_ids != ROWS) & (batch.input_ids != MASK)
    assert changed.sum() > 1000
    assert (batch.input_ids[changed] >= FIRST_ORDINARY).all()
    # replacements are uniform over the 991 ordinary ids: each of 10 equal bins holds 10% +- 1.5%
    # (about 5k draws: sd 0.42%, so 1.5% is > 3.5 sd per bin)
    bins = torch.bincount((batch.input_ids[changed] - FIRST_ORDINARY) * 10 // (1000 - FIRST_ORDINARY), minlength=10)
    assert ((bins.double() / bins.sum() - 0.1).abs() < 0.015).all()


def test_rate_one_selects_every_eligible_token():
    batch = mlm(ROWS, DOCS, torch.Generator().manual_seed(2), TOK, MLMConfig(rate=1.0))
    assert torch.equal(batch.labels != IGNORE_INDEX, ELIGIBLE)


def _word_ids(rows, docs):
    """Word index per token (a word-start piece or any token after a special/doc change starts one)."""
    starts = TOK.word_start[rows] | ~ELIGIBLE
    starts[:, 1:] |= ~ELIGIBLE[:, :-1] | (docs[:, 1:] != docs[:, :-1])
    starts[:, 0] = True
    return starts.reshape(-1).long().cumsum(0).view_as(rows)


def test_whole_word_masking():
    batch = mlm(ROWS, DOCS, torch.Generator().manual_seed(4), TOK, MLMConfig(whole_word=True))
    sel = batch.labels != IGNORE_INDEX
    words = _word_ids(ROWS, DOCS)[ELIGIBLE]
    picked = sel[ELIGIBLE]
    n_words = int(words.max()) + 1
    hits = torch.bincount(words, weights=picked.double(), minlength=n_words)
    size = torch.bincount(words, minlength=n_words).double()
    present = size > 0
    # every word is selected whole or not at all
    assert torch.all((hits[present] == 0) | (hits[present] == size[present]))
    assert ((size > 1) & (hits > 0)).sum() > 1000  # and multi-piece words do get selected
    # Budget met to within half a word per row in expectation: +-1% (as for token MLM).
    assert abs(int(sel.sum()) / int(ELIGIBLE.sum()) - 0.15) < 0.01
    masked, kept, random = _split(batch, ROWS)
    assert abs(masked - 0.8) < 0.015 and abs(random - 0.1) < 0.015


def test_whole_word_needs_word_start():
    tok = make_tok()
    tok = dataclasses.replace(tok, word_start=None)
    with pytest.raises(ValueError, match="word_start"):
        mlm(ROWS[:2], DOCS[:2], torch.Generator(), tok, MLMConfig(whole_word=True))


def test_left_to_right_order_labels_the_previous_position():
    cfg = MLMConfig(rate=0.3, mask_frac=1.0, random_frac=0.0, order="left_to_right")
    batch = mlm(ROWS, DOCS, torch.Generator().manual_seed(5), TOK, cfg)
    assert batch.attention == "causal"
    assert torch.equal(batch.input_ids, ROWS)
    lab = batch.labels != IGNORE_INDEX
    assert not lab[:, -1].any()
    assert torch.equal(batch.labels[:, :-1][lab[:, :-1]], ROWS[:, 1:][lab[:, :-1]])
    assert (DOCS[:, :-1][lab[:, :-1]] == DOCS[:, 1:][lab[:, :-1]]).all()
    # rate of the tokens that have a same-document predecessor: +-1% as above
    predictable = ELIGIBLE.clone()
    predictable[:, 0] = False
    predictable[:, 1:] &= DOCS[:, 1:] == DOCS[:, :-1]
    assert abs(int(lab.sum()) / int(predictable.sum()) - 0.3) < 0.01


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"rate": 0.0}, "rate"),
        ({"rate": 1.5}, "rate"),
        ({"mask_frac": -0.1}, "mask_frac"),
        ({"mask_frac": 0.8, "random_frac": 0.3}, "random_frac"),
        ({"order": "sideways"}, "order"),
        ({"order": "left_to_right"}, "mask_frac"),
    ],
)
def test_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MLMConfig(**kwargs)


def test_inputs_untouched_and_deterministic():
    rows, docs = ROWS[:8].clone(), DOCS[:8].clone()
    a = mlm(rows, docs, torch.Generator().manual_seed(9), TOK, MLMConfig())
    b = mlm(rows, docs, torch.Generator().manual_seed(9), TOK, MLMConfig())
    c = mlm(rows, docs, torch.Generator().manual_seed(10), TOK, MLMConfig())
    assert torch.equal(rows, ROWS[:8]) and torch.equal(docs, DOCS[:8])
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.labels, c.labels)


def test_bad_rows_are_value_errors():
    with pytest.raises(ValueError, match="vocab_size"):
        mlm(torch.full((1, 4), 5000), torch.zeros(1, 4, dtype=torch.int64), torch.Generator(), TOK, MLMConfig())
    with pytest.raises(ValueError, match="int64"):
        mlm(ROWS[:1].int(), DOCS[:1], torch.Generator(), TOK, MLMConfig())
    with pytest.raises(ValueError, match="doc_ids"):
        mlm(ROWS[:1], DOCS[:2], torch.Generator(), TOK, MLMConfig())
