"""Causal LM, prefix LM, MLM-as-causal generalisation, mode tokens."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from objectives import (
    IGNORE_INDEX,
    CausalConfig,
    MLMConfig,
    PrefixConfig,
    build_objective,
    causal,
    mlm,
    prefix_lm,
)
from objectives.prefix import prefix_bounds
from tests.test_objectives_support import (
    FIRST_ORDINARY,
    MODE_IDS,
    PAD,
    make_rows,
    make_tok,
    pack,
    reference_next_token,
)

TOK = make_tok()
ROWS, DOCS = make_rows(8, 512, seed=4, doc_min=5, doc_max=200, unk=0.01)


def test_causal_labels_are_next_tokens_within_documents():
    batch = causal(ROWS, DOCS, torch.Generator(), TOK, CausalConfig())
    assert batch.attention == "causal" and batch.objective == "causal"
    assert torch.equal(batch.input_ids, ROWS) and torch.equal(batch.doc_ids, DOCS)
    assert torch.equal(batch.labels, reference_next_token(ROWS, DOCS, [0] * ROWS.shape[0]))
    lab = batch.labels[:, :-1] != IGNORE_INDEX
    assert torch.equal(batch.labels[:, :-1][lab], ROWS[:, 1:][lab])  # shifted by one
    assert (DOCS[:, :-1][lab] == DOCS[:, 1:][lab]).all()  # never across documents
    assert (batch.labels[:, -1] == IGNORE_INDEX).all()
    assert lab.sum() > 0.9 * ROWS.numel()


def test_causal_handles_a_padded_short_row():
    rows, docs = pack([[10, 11, 12], [13, 14]], T=12, pad_tail=3)
    batch = causal(rows, docs, torch.Generator(), TOK, CausalConfig())
    # [CLS] 10 11 12 [SEP] [CLS] 13 14 [SEP] [PAD]x3: targets 10 11 12 and 13 14 only
    assert batch.labels.tolist() == [[10, 11, 12, -100, -100, 13, 14, -100, -100, -100, -100, -100]]


def test_mlm_at_full_rate_left_to_right_is_causal():
    """The design's generalisation: predicting every token left to right is language modelling."""
    cfg = MLMConfig(rate=1.0, mask_frac=1.0, random_frac=0.0, order="left_to_right")
    for seed in range(3):
        a = mlm(ROWS, DOCS, torch.Generator().manual_seed(seed), TOK, cfg)
        b = causal(ROWS, DOCS, torch.Generator(), TOK, CausalConfig())
        assert torch.equal(a.labels, b.labels)
        assert torch.equal(a.input_ids, b.input_ids)
        assert a.attention == b.attention == "causal"


def test_prefix_length_distribution():
    T, B = 64, 40_000
    rows = torch.randint(FIRST_ORDINARY, 1000, (B, T))
    docs = torch.zeros(B, T, dtype=torch.int64)
    batch = prefix_lm(rows, docs, torch.Generator().manual_seed(0), TOK, PrefixConfig(min_frac=0.2, max_frac=0.8))
    n = batch.prefix_len
    assert batch.attention == "prefix" and n.shape == (B,)
    lo, hi = 13, 51  # ceil(0.2 * 64), floor(0.8 * 64)
    assert int(n.min()) == lo and int(n.max()) == hi
    counts = torch.bincount(n - lo, minlength=hi - lo + 1).double()
    # Uniform over 39 values. Mean: sd of the sample mean is 11.25 / sqrt(40k) = 0.056, so +-0.3 is
    # > 5 sd. Chi-square with 38 degrees of freedom has mean 38 and sd 8.7; < 80 fails with p < 1e-4.
    assert abs(n.double().mean().item() - (lo + hi) / 2) < 0.3
    expected = B / (hi - lo + 1)
    assert ((counts - expected) ** 2 / expected).sum().item() < 80


def test_prefix_labels_only_after_the_prefix():
    batch = prefix_lm(ROWS, DOCS, torch.Generator().manual_seed(1), TOK, PrefixConfig())
    ref = reference_next_token(ROWS, DOCS, batch.prefix_len.tolist())
    assert torch.equal(batch.labels, ref)
    lo, hi = prefix_bounds(torch.full((ROWS.shape[0],), ROWS.shape[1]), PrefixConfig())
    assert ((batch.prefix_len >= lo) & (batch.prefix_len <= hi)).all()


def test_prefix_length_follows_the_unpadded_length():
    rows, docs = pack([list(range(10, 40))], T=40, pad_tail=8)  # 32 real tokens
    cfg = PrefixConfig(min_frac=0.5, max_frac=0.5)
    batch = prefix_lm(rows, docs, torch.Generator(), TOK, cfg)
    assert batch.prefix_len.tolist() == [16]
    assert (batch.labels[0, :15] == IGNORE_INDEX).all() and batch.labels[0, 15] == rows[0, 16]
    assert (batch.labels[0, 30:] == IGNORE_INDEX).all()  # [SEP] and the pads are never targets
    assert PAD not in batch.labels.tolist()[0]


@pytest.mark.parametrize("kwargs", [{"min_frac": -0.1}, {"max_frac": 1.2}, {"min_frac": 0.7, "max_frac": 0.3}])
def test_prefix_config_validation(kwargs):
    with pytest.raises(ValueError, match="frac"):
        PrefixConfig(**kwargs)


@pytest.mark.parametrize("name", ["mlm", "span", "causal", "prefix"])
def test_mode_token_prepended_and_shift_consistent(name):
    plain = build_objective(name)(ROWS, DOCS, torch.Generator().manual_seed(7), TOK)
    moded = build_objective(name, mode_tokens=True)(ROWS, DOCS, torch.Generator().manual_seed(7), TOK)
    mode_id = dict(MODE_IDS)[name]
    assert moded.input_ids.shape == ROWS.shape
    assert (moded.input_ids[:, 0] == mode_id).all()
    assert (moded.labels[:, 0] == IGNORE_INDEX).all()
    assert torch.equal(moded.input_ids[:, 1:], plain.input_ids[:, :-1])
    assert torch.equal(moded.labels[:, 1:], plain.labels[:, :-1])
    assert torch.equal(moded.doc_ids[:, 1:], plain.doc_ids[:, :-1])
    assert torch.equal(moded.doc_ids[:, 0], plain.doc_ids[:, 0])
    assert moded.attention == plain.attention
    if name == "prefix":
        assert torch.equal(moded.prefix_len, plain.prefix_len + 1)
    if moded.attention != "bidirectional":  # next-token labels stay next-token labels after the shift
        lab = moded.labels[:, :-1] != IGNORE_INDEX
        assert torch.equal(moded.labels[:, :-1][lab], moded.input_ids[:, 1:][lab])


def test_mode_tokens_need_mode_ids():
    tok = dataclasses.replace(TOK, mode_ids=(("mlm", 5),))
    with pytest.raises(ValueError, match="causal"):
        build_objective("causal", mode_tokens=True)(ROWS, DOCS, torch.Generator(), tok)


def test_mode_ids_must_be_special():
    with pytest.raises(ValueError, match="special_ids"):
        dataclasses.replace(TOK, mode_ids=(("mlm", 500),))
