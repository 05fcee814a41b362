"""PackedStream (one source, in process): packing invariants, the per-epoch order, ranks dealt contiguous slices
of one global sequence, exact resume, and the checks on saved states."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from data.loader import Loader, LoaderConfig
from data.stream import PackedStream
from tests.data_helpers import dataset_dir, framed, random_docs, reading_order, shard_documents

SEQ, BATCH = 48, 3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """7 shards of 6 documents (the last has 2): random ids, lengths 1..199."""
    root = tmp_path_factory.mktemp("stream")
    docs = random_docs(38, seed=5, max_len=200)
    manifest = dataset_dir(root, docs, max_documents=6)
    return root, docs, manifest


def take(stream, n: int) -> tuple[np.ndarray, np.ndarray]:
    ids, docs = zip(*(next(stream) for _ in range(n)), strict=True)
    return torch.cat(ids).numpy(), torch.cat(docs).numpy()


def test_rows_are_the_framed_documents_cut_into_seq_len(data):
    root, docs, manifest = data
    stream = PackedStream(root, seq_len=SEQ, batch_size=BATCH, seed=3)
    order = stream.orders[0]
    epoch_tokens = manifest.tokens + 2 * manifest.documents
    n_batches = 2 * epoch_tokens // (SEQ * BATCH) + 2  # runs into the third epoch
    ids, _ = take(stream, n_batches)
    assert ids.shape == (n_batches * BATCH, SEQ) and ids.dtype == np.int64
    want = framed(reading_order(order, shard_documents(docs, manifest), range(3)))
    # nothing dropped, nothing padded, documents split across rows and epochs in order
    assert np.array_equal(ids.reshape(-1), want[: ids.size])
    assert stream.epoch == 2


def test_doc_ids_restart_per_row_and_count_documents(data):
    root, _, _ = data
    ids, doc_ids = take(PackedStream(root, seq_len=SEQ, batch_size=BATCH), 30)
    for row, docs in zip(ids, doc_ids, strict=True):
        assert docs[0] == 0
        # a new document starts exactly where [CLS] (2) appears, except at position 0
        assert np.array_equal(docs[1:], np.cumsum(row[1:] == 2))
        cls_at = np.flatnonzero(row == 2)
        assert all(row[i - 1] == 3 for i in cls_at if i > 0)
    assert (doc_ids.max(axis=1) > 0).any()  # some rows hold several documents
    assert (ids != 0).all()  # no [PAD] anywhere


def test_epoch_order_is_seeded_and_consumed_shards_recorded(data):
    root, _, manifest = data
    a = PackedStream(root, seq_len=SEQ, batch_size=BATCH, seed=11).orders[0]
    b = PackedStream(root, seq_len=SEQ, batch_size=BATCH, seed=11).orders[0]
    assert list(a.order(0)) == list(b.order(0))
    assert sorted(a.order(0)) == list(range(len(manifest.shards)))
    assert len({tuple(a.order(e)) for e in range(4)}) > 1
    assert list(a.order(0)) != list(PackedStream(root, seq_len=SEQ, batch_size=BATCH, seed=12).orders[0].order(0))
    stream = PackedStream(root, seq_len=SEQ, batch_size=BATCH, seed=11)
    take(stream, (manifest.tokens + 2 * manifest.documents) // (SEQ * BATCH) + 1)
    names = [manifest.shards[i].file for i in a.order(0)]
    assert stream.consumed_shards[: len(names)] == names  # opened a window at a time, in the epoch's order


def test_ranks_get_contiguous_slices_of_one_global_sequence(data):
    root, _, manifest = data
    one = take(PackedStream(root, seq_len=SEQ, batch_size=2 * BATCH, seed=4), 12)
    ranks = [PackedStream(root, seq_len=SEQ, batch_size=BATCH, rank=r, world_size=2, seed=4) for r in range(2)]
    got = [take(s, 12) for s in ranks]
    for k in range(12):  # global step k: rank 0's rows, then rank 1's
        for r in range(2):
            mine = slice(k * BATCH, (k + 1) * BATCH)
            whole = slice(k * 2 * BATCH + r * BATCH, k * 2 * BATCH + (r + 1) * BATCH)
            assert np.array_equal(got[r][0][mine], one[0][whole]) and np.array_equal(got[r][1][mine], one[1][whole])
    # fewer shards than ranks is fine: every rank reads the whole sequence
    n = len(manifest.shards)
    many = PackedStream(root, seq_len=SEQ, batch_size=1, rank=n, world_size=n + 1, seed=4)
    assert next(many)[0].shape == (1, SEQ)
    assert ranks[0].state_dict()["rows"] == ranks[1].state_dict()["rows"] == 12 * 2 * BATCH


@pytest.mark.parametrize("rank", [0, 1])
def test_exact_resume_including_epoch_boundaries(data, rank):
    root, _, manifest = data

    def make():
        return PackedStream(root, seq_len=SEQ, batch_size=BATCH, rank=rank, world_size=2, seed=7)

    reference = make()
    per_epoch = (manifest.tokens + 2 * manifest.documents) // (2 * BATCH * SEQ)  # global steps in one epoch
    total = 3 * per_epoch + 4
    ids, docs = take(reference, total)
    rows = BATCH
    # resume points: start, mid-epoch, just before and after each epoch boundary
    states = []
    for n in sorted({0, 1, per_epoch // 2, per_epoch - 1, per_epoch, per_epoch + 1, 2 * per_epoch + 1}):
        first = make()
        if n:
            take(first, n)
        state = json.loads(json.dumps(first.state_dict()))  # must survive JSON
        states.append(state)
        resumed = make()
        resumed.load_state_dict(state)
        k = min(per_epoch + 3, total - n)
        got_ids, got_docs = take(resumed, k)
        assert np.array_equal(got_ids, ids[n * rows : (n + k) * rows]), n
        assert np.array_equal(got_docs, docs[n * rows : (n + k) * rows]), n
        assert resumed.stats() == make_stats_after(make, n + k)
    positions = [s["positions"][0] for s in states]
    # the points really include a cut inside a document and positions in later epochs
    assert any(p["offset"] > 0 for p in positions) and {p["epoch"] for p in positions} >= {0, 1}


def make_stats_after(make, n: int) -> dict:
    stream = make()
    take(stream, n)
    return stream.stats()


def test_state_from_another_setup_is_refused(data):
    root, _, _ = data
    state = PackedStream(root, seq_len=SEQ, batch_size=BATCH, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        PackedStream(root, seq_len=SEQ, batch_size=BATCH, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="seq_len"):
        PackedStream(root, seq_len=SEQ + 1, batch_size=BATCH, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="version 7 is not 3"):
        PackedStream(root, seq_len=SEQ, batch_size=BATCH, seed=1).load_state_dict({"version": 7})
    # a state of the older, world-size-dependent order: one clear refusal
    with pytest.raises(ValueError, match="version 2 was saved by an older cloze.*new out_dir"):
        PackedStream(root, seq_len=SEQ, batch_size=BATCH, seed=1).load_state_dict({"version": 2})
    for key, value in (("window", 10_000), ("rows", -1), ("epoch", "x")):
        bad = json.loads(json.dumps(state))
        bad["positions"][0][key] = value
        with pytest.raises(ValueError, match="outside"):
            PackedStream(root, seq_len=SEQ, batch_size=BATCH, seed=1).load_state_dict(bad)
    bad = json.loads(json.dumps(state))
    bad["rows"] = 5  # the sources' rows no longer add up to it
    with pytest.raises(ValueError, match="add up"):
        PackedStream(root, seq_len=SEQ, batch_size=BATCH, seed=1).load_state_dict(bad)
    # rank, world size and batch size are free: any rank's state continues the global sequence
    PackedStream(root, seq_len=SEQ, batch_size=BATCH + 1, rank=1, world_size=2, seed=1).load_state_dict(state)


def test_argument_checks(data):
    root, _, _ = data
    with pytest.raises(ValueError, match="seq_len"):
        PackedStream(root, seq_len=0, batch_size=1)
    with pytest.raises(ValueError, match="rank"):
        PackedStream(root, seq_len=8, batch_size=1, rank=2, world_size=2)
    with pytest.raises(ValueError, match="launch.prepare"):
        PackedStream(root / "absent", seq_len=8, batch_size=1)
    with pytest.raises(ValueError, match="on_bad_data"):
        PackedStream(root, seq_len=8, batch_size=1, on_bad_data="ignore")
    with pytest.raises(ValueError, match="weight"):
        Loader(LoaderConfig([(str(root), 0.0)], 8, 1))
    with pytest.raises(ValueError, match="twice"):
        Loader(LoaderConfig([(str(root), 1.0), (str(root) + "/", 1.0)], 8, 1))


@pytest.mark.parametrize("window", [1, 3])
def test_documents_are_read_in_a_seeded_order_across_each_window(data, window):
    root, docs, manifest = data

    def stream(**kw):
        return Loader(LoaderConfig([(str(root), 1.0)], SEQ, BATCH, seed=3, shuffle_window_shards=window, **kw))

    order = stream().orders[0]
    by_shard = shard_documents(docs, manifest)
    n = (manifest.tokens + 2 * manifest.documents) // (SEQ * BATCH)
    shuffled, _ = take(stream(), n)
    want = reading_order(order, by_shard, [0])
    assert np.array_equal(shuffled.reshape(-1), framed(want)[: shuffled.size])
    # a window's documents come from all of its shards, interleaved
    shard_of = {id(d): i for i, members in enumerate(by_shard) for d in members}
    first = [shard_of[id(d)] for d in want[: sum(len(by_shard[i]) for i in order.window(0, 0))]]
    assert set(first) == set(order.window(0, 0))
    if window > 1:
        assert sum(a != b for a, b in zip(first, first[1:])) > len(first) // 3
    in_file_order = stream(shuffle_documents=False)
    ids, _ = take(in_file_order, n)
    files = framed([d for i in order.order(0) for d in by_shard[i]])
    assert np.array_equal(ids.reshape(-1), files[: ids.size]) and not np.array_equal(ids, shuffled)
    with pytest.raises(ValueError, match="shuffle_documents"):  # part of the data order: a state does not carry over
        in_file_order.load_state_dict(stream().state_dict())
    with pytest.raises(ValueError, match="shuffle_window_shards"):
        Loader(LoaderConfig([(str(root), 1.0)], SEQ, BATCH, seed=3, shuffle_window_shards=window + 1)
               ).load_state_dict(stream().state_dict())
