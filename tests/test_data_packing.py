"""data/packing.py and data/order.py as pure functions: packing is a lossless cut of the framed documents, the
packer resumes from its position and skips rows exactly, the mixture schedule holds every share within one row,
and the data order (shard windows, document permutations) is a seeded function of the data only."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from data.order import MixSchedule, SourceOrder
from data.packing import Packer

CLS, SEP = 2, 3


def _docs_source(docs):
    """next_doc over a fixed list, positions (0, 0, i), cycling."""
    state = {"i": 0}

    def next_doc():
        i = state["i"]
        state["i"] += 1
        return docs[i % len(docs)], (0, 0, i)

    return next_doc, state


def _framed(docs, times: int = 3) -> np.ndarray:
    return np.concatenate([np.concatenate([[CLS], d, [SEP]]) for _ in range(times) for d in docs])


doc_lists = st.lists(st.integers(0, 70), min_size=1, max_size=12).map(
    lambda lengths: [np.arange(9, 9 + n, dtype=np.uint16) for n in lengths])


@settings(max_examples=60, deadline=None)
@given(docs=doc_lists, seq=st.integers(1, 50), calls=st.lists(st.integers(1, 5), min_size=1, max_size=8))
def test_rows_are_a_lossless_cut_with_document_ids(docs, seq, calls):
    next_doc, _ = _docs_source(docs)
    packer = Packer(next_doc, seq, CLS, SEP)
    ids, doc_ids = zip(*(packer.rows(n) for n in calls), strict=True)
    ids, doc_ids = np.concatenate(ids), np.concatenate(doc_ids)
    assert ids.shape == (sum(calls), seq) and ids.dtype == doc_ids.dtype == np.int64
    stream = _framed(docs, times=sum(calls) * seq // 2 + 2)
    assert np.array_equal(ids.reshape(-1), stream[: ids.size])  # no padding, nothing dropped or reordered
    # document ids: 0 at each row start, +1 exactly where a [CLS] opens a document after position 0
    assert (doc_ids[:, 0] == 0).all()
    assert np.array_equal(doc_ids[:, 1:], np.cumsum(ids[:, 1:] == CLS, axis=1))


@settings(max_examples=40, deadline=None)
@given(docs=doc_lists, seq=st.integers(1, 40), before=st.integers(1, 6), after=st.integers(1, 6))
def test_packer_resumes_from_its_position(docs, seq, before, after):
    next_doc, _ = _docs_source(docs)
    packer = Packer(next_doc, seq, CLS, SEP)
    packer.rows(before)
    want = packer.rows(after)
    # rebuild from the position the first packer had after `before` rows
    replay_next, replay_state = _docs_source(docs)
    probe = Packer(replay_next, seq, CLS, SEP)
    probe.rows(before)
    if probe.head is not None:
        start, offset = probe.head_position[2], probe.offset
    else:
        start, offset = replay_state["i"], 0
    fresh_next, fresh_state = _docs_source(docs)
    fresh_state["i"] = start
    resumed = Packer(fresh_next, seq, CLS, SEP)
    resumed.resume(offset)
    got = resumed.rows(after)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


@settings(max_examples=60, deadline=None)
@given(weights=st.lists(st.floats(0.01, 10), min_size=1, max_size=5), n=st.integers(1, 400))
def test_mixture_schedule_keeps_every_share_within_one_row(weights, n):
    schedule = MixSchedule(weights)
    counts = [0] * len(weights)
    total = 0
    for chunk in (n // 3, n - n // 3):
        picks = schedule.assign(counts, chunk)
        total += chunk
        assert len(picks) == chunk
        # the largest-deficit rule never lets a source drift a full row from weight * rows
        for s, w in enumerate(schedule.weights):
            assert abs(counts[s] - w * total) < 1.0 + 1e-9, (s, counts, total)
    assert sum(counts) == n


def test_source_order_windows_cover_each_epoch_and_are_seeded():
    order = SourceOrder(23, seed=1, source_index=0, window_shards=4)
    assert order.windows_per_epoch == 6
    for epoch in range(3):
        windows = [order.window(epoch, w) for w in range(order.windows_per_epoch)]
        assert [len(w) for w in windows] == [4, 4, 4, 4, 4, 3]  # the last window holds the rest
        assert sorted(i for w in windows for i in w) == list(range(23))  # every shard once per epoch
        assert [i for w in windows for i in w] == list(order.order(epoch))
    assert len({tuple(order.order(e)) for e in range(4)}) == 4  # a new shard order every epoch
    again, other = SourceOrder(23, 1, 0, 4), SourceOrder(23, 2, 0, 4)
    assert list(again.documents(1, 2, 50)) == list(order.documents(1, 2, 50))
    assert list(other.documents(1, 2, 50)) != list(order.documents(1, 2, 50))
    assert sorted(order.documents(0, 5, 50)) == list(range(50))
    assert list(SourceOrder(23, 1, 0, 4, shuffle_documents=False).documents(0, 0, 9)) == list(range(9))
    assert SourceOrder(3, 1, 0, window_shards=8).windows_per_epoch == 1  # a window never exceeds the epoch


@settings(max_examples=40, deadline=None)
@given(docs=doc_lists, seq=st.integers(1, 40), before=st.integers(0, 6), after=st.integers(1, 6))
def test_skip_leaves_the_packer_where_rows_would(docs, seq, before, after):
    built = Packer(_docs_source(docs)[0], seq, CLS, SEP)
    if before:
        built.rows(before)
    skipped = Packer(_docs_source(docs)[0], seq, CLS, SEP)
    skipped.skip(before)
    assert (skipped.offset, skipped.head_position) == (built.offset, built.head_position)
    a, b = built.rows(after), skipped.rows(after)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
