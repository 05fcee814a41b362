"""Property tests (hypothesis) over every objective and odd packed rows: rows that start mid-document,
end before [SEP], hold [UNK]s, empty documents, padded tails.

- labels exist exactly where the objective says (checked against slow references),
- no label crosses a document boundary,
- inputs at unlabelled positions are unchanged (and the caller's tensors are never modified),
- the same seed gives the same batch; mode tokens are a pure shift of the plain batch.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from objectives import IGNORE_INDEX, build_objective
from tests.test_objectives_support import (
    FIRST_ORDINARY,
    MASK,
    MODE_IDS,
    PAD,
    UNK,
    make_tok,
    pack,
    reference_next_token,
    runs,
)

TOK = make_tok()
token = st.integers(FIRST_ORDINARY - 1, 999).map(lambda i: UNK if i == FIRST_ORDINARY - 1 else i)


@st.composite
def packed_rows(draw):
    T = draw(st.integers(2, 40))
    docs = draw(st.lists(st.lists(token, max_size=30), min_size=1, max_size=10))
    offset = draw(st.integers(0, 6))
    pad_tail = draw(st.integers(0, T - 1))
    # unframed documents (told apart by doc_ids alone) make document boundaries matter on their own
    framed = draw(st.booleans())
    rows, doc_ids = pack(docs, T, offset, pad_tail, framed=framed)
    if pad_tail and draw(st.booleans()):  # pads may also carry the last document's id
        doc_ids[-1, T - pad_tail :] = doc_ids[-1, T - pad_tail - 1]
    return rows, doc_ids


objective_params = st.one_of(
    st.tuples(
        st.just("mlm"),
        st.fixed_dictionaries(
            {"rate": st.sampled_from([0.15, 0.5, 1.0]), "whole_word": st.booleans(), "random_frac": st.just(0.1)}
        ),
    ),
    st.tuples(
        st.just("mlm"),
        st.fixed_dictionaries(
            {
                "rate": st.sampled_from([0.3, 1.0]),
                "order": st.just("left_to_right"),
                "mask_frac": st.just(1.0),
                "random_frac": st.just(0.0),
            }
        ),
    ),
    st.tuples(
        st.just("span"),
        st.fixed_dictionaries(
            {
                "rate": st.sampled_from([0.15, 0.4]),
                "unit": st.sampled_from(["token", "word"]),
                "p": st.sampled_from([0.2, 0.5, 1.0]),
                "max_span": st.sampled_from([1, 3, 10]),
            }
        ),
    ),
    st.tuples(st.just("causal"), st.just({})),
    st.tuples(
        st.just("prefix"),
        st.sampled_from([{}, {"min_frac": 0.0, "max_frac": 1.0}, {"min_frac": 0.5, "max_frac": 0.5}]),
    ),
)


def _word_ids(rows, docs, eligible):
    starts = TOK.word_start[rows] | ~eligible
    starts[:, 1:] |= ~eligible[:, :-1] | (docs[:, 1:] != docs[:, :-1])
    starts[:, 0] = True
    return starts.reshape(-1).long().cumsum(0).view_as(rows), starts


def check_bidirectional(name, params, rows, docs, batch):
    eligible = rows >= FIRST_ORDINARY
    lab = batch.labels != IGNORE_INDEX
    assert batch.attention == "bidirectional"
    assert not lab[~eligible].any()  # specials, [UNK] and pads are never targets
    assert torch.equal(batch.labels[lab], rows[lab])  # each label is the token at its own position
    assert torch.equal(batch.input_ids[~lab], rows[~lab])
    changed = lab & (batch.input_ids != rows)
    assert ((batch.input_ids[changed] == MASK) | (batch.input_ids[changed] >= FIRST_ORDINARY)).all()
    words, starts = _word_ids(rows, docs, eligible)
    if name == "mlm" and params["rate"] == 1.0:
        assert torch.equal(lab, eligible)
    if name == "mlm" and params["whole_word"]:
        for w in words[eligible].unique():
            in_word = (words == w) & eligible
            assert lab[in_word].all() or not lab[in_word].any()
    if name == "span":
        flat_docs, flat_in, flat_starts = docs.reshape(-1), batch.input_ids.reshape(-1), starts.reshape(-1)
        # Spans never touch inside a document, so each run of labels cut at document changes is one
        # span: at most max_span units, and masked or not as a whole.
        begin, end = runs(lab)
        for s, e in zip(begin.tolist(), end.tolist()):
            pieces = [s, *[i for i in range(s + 1, e) if flat_docs[i] != flat_docs[i - 1]], e]
            for a, b in zip(pieces[:-1], pieces[1:]):
                n_mask = int((flat_in[a:b] == MASK).sum())
                units = (b - a) if params["unit"] == "token" else int(flat_starts[a:b].sum())
                assert units <= params["max_span"]
                assert n_mask in (0, b - a)


def check_next_token(name, params, rows, docs, batch):
    assert batch.attention in ("causal", "prefix")
    assert torch.equal(batch.input_ids, rows)
    lab = batch.labels != IGNORE_INDEX
    assert not lab[:, -1].any()
    assert torch.equal(batch.labels[:, :-1][lab[:, :-1]], rows[:, 1:][lab[:, :-1]])
    assert (docs[:, :-1][lab[:, :-1]] == docs[:, 1:][lab[:, :-1]]).all()
    if name == "prefix":
        expected = reference_next_token(rows, docs, batch.prefix_len.tolist())
        real = (rows != PAD).sum(1).double()
        lo = torch.ceil(params.get("min_frac", 0.2) * real - 1e-9)
        hi = torch.floor(params.get("max_frac", 0.8) * real + 1e-9)
        assert ((batch.prefix_len >= lo) & (batch.prefix_len <= torch.maximum(hi, lo))).all()
        assert torch.equal(batch.labels, expected)
    elif name == "causal" or params["rate"] == 1.0:  # MLM at rate 1.0 left to right is causal LM
        assert torch.equal(batch.labels, reference_next_token(rows, docs, [0] * rows.shape[0]))
    else:
        assert (batch.labels == reference_next_token(rows, docs, [0] * rows.shape[0]))[lab].all()


@settings(max_examples=300, deadline=None)
@given(data=packed_rows(), objective=objective_params, seed=st.integers(0, 2**32 - 1), mode=st.booleans())
def test_objective_properties(data, objective, seed, mode):
    rows, docs = data
    name, params = objective
    rows_before, docs_before = rows.clone(), docs.clone()
    fn = build_objective(name, params, mode_tokens=mode)
    batch = fn(rows, docs, torch.Generator().manual_seed(seed), TOK)
    again = fn(rows, docs, torch.Generator().manual_seed(seed), TOK)
    assert torch.equal(rows, rows_before) and torch.equal(docs, docs_before)
    for field in ("input_ids", "labels", "doc_ids", "prefix_len"):
        a, b = getattr(batch, field), getattr(again, field)
        assert (a is None and b is None) or torch.equal(a, b), field
    assert batch.input_ids.shape == rows.shape and batch.input_ids.dtype == torch.int64
    assert batch.labels.dtype == torch.int64 and batch.objective == name

    plain = build_objective(name, params)(rows, docs, torch.Generator().manual_seed(seed), TOK)
    if mode:
        assert (batch.input_ids[:, 0] == dict(MODE_IDS)[name]).all()
        assert (batch.labels[:, 0] == IGNORE_INDEX).all()
        assert torch.equal(batch.input_ids[:, 1:], plain.input_ids[:, :-1])
        assert torch.equal(batch.labels[:, 1:], plain.labels[:, :-1])
        assert torch.equal(batch.doc_ids[:, 1:], docs[:, :-1]) and torch.equal(batch.doc_ids[:, 0], docs[:, 0])
    else:
        assert torch.equal(batch.doc_ids, docs)
    if plain.attention == "bidirectional":
        check_bidirectional(name, params, rows, docs, plain)
    else:
        check_next_token(name, params, rows, docs, plain)
