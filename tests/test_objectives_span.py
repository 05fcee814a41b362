"""Span masking: span-length distribution, budget, per-span 80/10/10, words, T5 parameters."""

from __future__ import annotations

import pytest
import torch

from objectives import IGNORE_INDEX, SpanConfig, span_mask
from objectives.span import solve_p, truncated_geometric_mean
from tests.test_objectives_support import FIRST_ORDINARY, MASK, make_rows, make_tok, pack, runs

TOK = make_tok()
# 800 x 512 = 410k tokens, about 16k spans at rate 0.15: enough for per-span shares to +-1.5%.
ROWS, DOCS = make_rows(800, 512, seed=2, doc_min=20, doc_max=600, unk=0.002)
ELIGIBLE = ROWS >= FIRST_ORDINARY


def exact_mean(p: float, max_span: int) -> float:
    """E[L] for P(L = k) proportional to p (1-p)^(k-1), k = 1..max_span, summed term by term."""
    weights = [p * (1 - p) ** (k - 1) for k in range(1, max_span + 1)]
    return sum(k * w for k, w in zip(range(1, max_span + 1), weights)) / sum(weights)


def span_runs(batch):
    masked = batch.labels != IGNORE_INDEX
    start, end = runs(masked)
    return masked, start, end


def test_spanbert_lengths_budget_and_split():
    cfg = SpanConfig(rate=0.15, p=0.2, max_span=10)
    batch = span_mask(ROWS, DOCS, torch.Generator().manual_seed(0), TOK, cfg)
    masked, start, end = span_runs(batch)
    lengths = (end - start).double()
    expected = exact_mean(0.2, 10)
    assert abs(expected - 3.797) < 1e-3  # SpanBERT's reported 3.8
    assert abs(cfg.expected_span() - expected) < 1e-12
    # ~16k spans with sd 2.5 give a sampling sd of 0.02 on the mean; spans cut at segment ends and
    # the shorter residual first spans shift it by about -0.06 here. +-0.2 (required) leaves 7 sd.
    assert abs(lengths.mean().item() - expected) < 0.2
    assert lengths.max().item() <= 10
    assert len(lengths) > 14_000
    # budget: sd of the realised rate over 410k tokens is about 0.15%; +-1% is > 6 sd.
    assert not masked[~ELIGIBLE].any()
    assert abs(int(masked.sum()) / int(ELIGIBLE.sum()) - 0.15) < 0.01

    flat_in, flat_rows, flat_docs = batch.input_ids.reshape(-1), ROWS.reshape(-1), DOCS.reshape(-1)
    kinds = []
    for s, e in zip(start.tolist(), end.tolist()):
        assert flat_docs[s] == flat_docs[e - 1], "a span crosses a document boundary"
        n_mask = int((flat_in[s:e] == MASK).sum())
        assert n_mask in (0, e - s), "80/10/10 is decided per span, not per token"
        kinds.append("mask" if n_mask else ("kept" if torch.equal(flat_in[s:e], flat_rows[s:e]) else "random"))
    shares = {k: kinds.count(k) / len(kinds) for k in ("mask", "random", "kept")}
    # per-span binomial sd <= 0.32% for 16k spans: +-1.5% is > 4.5 sd
    assert abs(shares["mask"] - 0.8) < 0.015
    assert abs(shares["random"] - 0.1) < 0.015
    assert abs(shares["kept"] - 0.1) < 0.015
    changed = (batch.input_ids != ROWS) & (batch.input_ids != MASK)
    assert (batch.input_ids[changed] >= FIRST_ORDINARY).all()
    assert torch.equal(batch.input_ids[~masked], ROWS[~masked])


def test_budget_holds_in_short_documents():
    rows, docs = make_rows(800, 512, seed=3, doc_min=3, doc_max=30)
    eligible = rows >= FIRST_ORDINARY
    batch = span_mask(rows, docs, torch.Generator().manual_seed(1), TOK, SpanConfig())
    masked = batch.labels != IGNORE_INDEX
    # the stationary start keeps the budget exact in expectation for any document length: +-1% (sd ~0.2%)
    assert abs(int(masked.sum()) / int(eligible.sum()) - 0.15) < 0.01
    first = eligible.clone()
    first[:, 1:] &= ~eligible[:, :-1]
    # ~23k segments: the first token of each is masked with probability 0.15, sd 0.23%; +-1.5% > 6 sd
    assert abs(masked[first].double().mean().item() - 0.15) < 0.015


def test_spans_stop_at_document_boundaries_without_specials():
    """Documents told apart by doc_ids alone: the masking on either side of a boundary is independent."""
    gen = torch.Generator().manual_seed(5)
    docs = [
        torch.randint(FIRST_ORDINARY, 1000, (int(n),), generator=gen).tolist() for n in torch.randint(5, 40, (20_000,))
    ]
    rows, doc_ids = pack(docs, T=512, framed=False)
    batch = span_mask(rows, doc_ids, torch.Generator().manual_seed(6), TOK, SpanConfig())
    masked = batch.labels != IGNORE_INDEX
    boundary = doc_ids[:, 1:] != doc_ids[:, :-1]
    both = (masked[:, 1:] & masked[:, :-1])[boundary].double().mean().item()
    # Independent segments, each masked with probability 0.15 at any position: P(both sides) =
    # 0.0225 (sd 0.001 over ~20k boundaries). Spans running across would make it
    # 0.15 * (1 - 1 / 3.8) = 0.11. +-0.01 tells the two apart.
    assert boundary.sum() > 15_000
    assert abs(both - 0.15**2) < 0.01


@pytest.mark.parametrize("rate", [0.3, 0.5])
def test_higher_rates(rate):
    batch = span_mask(ROWS[:300], DOCS[:300], torch.Generator().manual_seed(2), TOK, SpanConfig(rate=rate))
    masked, start, end = span_runs(batch)
    # 150k tokens: rate sd < 0.3%; +-1% > 3 sd. Spans never touch, so runs are spans: mean +-0.2.
    assert abs(int(masked.sum()) / int(ELIGIBLE[:300].sum()) - rate) < 0.01
    assert abs((end - start).double().mean().item() - exact_mean(0.2, 10)) < 0.2


def test_word_units():
    cfg = SpanConfig(unit="word", p=0.2, max_span=10)
    batch = span_mask(ROWS, DOCS, torch.Generator().manual_seed(3), TOK, cfg)
    masked, start, end = span_runs(batch)
    flat_rows, flat_docs = ROWS.reshape(-1), DOCS.reshape(-1)
    elig = ELIGIBLE.reshape(-1)
    word_start = TOK.word_start[flat_rows] & elig
    begins = word_start.clone()
    begins[1:] |= elig[1:] & (~elig[:-1] | (flat_docs[1:] != flat_docs[:-1]))
    begins[0] = True
    begins[torch.arange(0, begins.numel(), ROWS.shape[1])] = True
    T = ROWS.shape[1]
    words_per_span = []
    for s, e in zip(start.tolist(), end.tolist()):
        assert begins[s], "a span starts inside a word"
        assert e % T == 0 or begins[e] or not elig[e], "a span ends inside a word"
        words_per_span.append(int(begins[s:e].sum()))
    lengths = torch.tensor(words_per_span, dtype=torch.float64)
    # ~10k spans (lengths counted in words): sd of the mean 0.03; +-0.2 as required
    assert abs(lengths.mean().item() - exact_mean(0.2, 10)) < 0.2
    assert lengths.max().item() <= 10
    # budget counted in units (words); the token share matches it since masking ignores word length: +-1%
    assert abs(int(masked.sum()) / int(ELIGIBLE.sum()) - 0.15) < 0.01


def test_t5_parameters():
    cfg = SpanConfig(rate=0.15, mean_span=3.0, max_span=None)
    assert cfg.geometric_p == pytest.approx(1 / 3)
    batch = span_mask(ROWS, DOCS, torch.Generator().manual_seed(4), TOK, cfg)
    masked, start, end = span_runs(batch)
    # untruncated geometric (sd 2.4): a cut at a document end now and then; +-0.2 as for SpanBERT
    assert abs((end - start).double().mean().item() - 3.0) < 0.2
    assert abs(int(masked.sum()) / int(ELIGIBLE.sum()) - 0.15) < 0.01


def test_mean_span_solves_p():
    for mean, max_span in [(3.0, 10), (3.8, 10), (1.5, 4), (8.0, 64)]:
        p = solve_p(mean, max_span)
        assert truncated_geometric_mean(p, max_span) == pytest.approx(mean, abs=1e-9)
        assert SpanConfig(mean_span=mean, max_span=max_span).geometric_p == pytest.approx(p)
    assert abs(truncated_geometric_mean(0.2, 10) - exact_mean(0.2, 10)) < 1e-12


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"rate": 0.0}, "rate"),
        ({"rate": 0.9}, "rate"),  # > 3.8 / 4.8: spans could not be separated
        ({"p": 0.0}, "p"),
        ({"p": 0.2, "mean_span": 3.0}, "mean_span"),
        ({"mean_span": 6.0, "max_span": 10}, "mean_span"),  # the truncated mean tops out at 5.5
        ({"max_span": 0}, "max_span"),
        ({"unit": "sentence"}, "unit"),
        ({"mask_frac": 0.95, "random_frac": 0.1}, "random_frac"),
    ],
)
def test_config_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SpanConfig(**kwargs)


def test_no_eligible_tokens():
    rows = torch.tensor([[2, 3, 2, 3]])
    batch = span_mask(rows, torch.tensor([[0, 0, 1, 1]]), torch.Generator(), TOK, SpanConfig())
    assert batch.num_labels == 0 and torch.equal(batch.input_ids, rows)
