"""data/stream.py: packing invariants, per-epoch shard order, rank disjointness, exact resume, bad shards."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
import torch
import webdataset

from data.stream import PackedStream
from tests.test_data_helpers import dataset_dir, random_docs

SEQ, BATCH = 48, 3


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """7 shards of 6 documents (the last has 2): random ids, lengths 1..199."""
    root = tmp_path_factory.mktemp("stream")
    docs = random_docs(38, seed=5, max_len=200)
    manifest = dataset_dir(root, docs, max_documents=6)
    return root, docs, manifest


def _expected_tokens(stream: PackedStream, docs, manifest, epochs: int) -> np.ndarray:
    """The framed token sequence this rank must read: shard order per epoch, documents in shard order."""
    starts = np.cumsum([0] + [s.samples for s in manifest.shards])
    out = []
    for epoch in range(epochs):
        for shard in stream.shard_order(epoch):
            for doc in docs[starts[shard] : starts[shard + 1]]:
                out.append(np.concatenate([[2], doc, [3]]))
    return np.concatenate(out)


def _take(stream: PackedStream, n: int) -> tuple[np.ndarray, np.ndarray]:
    ids, docs = zip(*(next(stream) for _ in range(n)), strict=True)
    return torch.cat(ids).numpy(), torch.cat(docs).numpy()


def test_rows_are_the_framed_documents_cut_into_seq_len(data):
    root, docs, manifest = data
    stream = PackedStream(root, seq_len=SEQ, batch_size=BATCH, seed=3)
    epoch0 = stream.tokens_per_epoch
    assert epoch0 == manifest.tokens + 2 * manifest.documents
    n_batches = (2 * epoch0) // (SEQ * BATCH) + 2  # runs into the third epoch
    ids, doc_ids = _take(stream, n_batches)
    assert ids.shape == (n_batches * BATCH, SEQ) and ids.dtype == np.int64
    want = _expected_tokens(stream, docs, manifest, epochs=3)
    # nothing dropped, nothing padded, documents split across rows and epochs in order
    assert np.array_equal(ids.reshape(-1), want[: ids.size])
    assert stream.epoch == 2


def test_doc_ids_restart_per_row_and_count_documents(data):
    root, _, _ = data
    ids, doc_ids = _take(PackedStream(root, seq_len=SEQ, batch_size=BATCH), 30)
    for row, docs in zip(ids, doc_ids, strict=True):
        assert docs[0] == 0
        # a new document starts exactly where [CLS] (2) appears, except at position 0
        starts = np.cumsum(row[1:] == 2)
        assert np.array_equal(docs[1:], starts)
        # documents inside a row are framed: every [CLS] after position 0 follows a [SEP]
        cls_at = np.flatnonzero(row == 2)
        assert all(row[i - 1] == 3 for i in cls_at if i > 0)
    assert (doc_ids.max(axis=1) > 0).any()  # some rows hold several documents


def test_epoch_order_is_seeded_and_consumed_shards_recorded(data):
    root, _, manifest = data
    a = PackedStream(root, seq_len=SEQ, batch_size=BATCH, seed=11)
    b = PackedStream(root, seq_len=SEQ, batch_size=BATCH, seed=11)
    assert a.shard_order(0) == b.shard_order(0)
    assert sorted(a.shard_order(0)) == list(range(len(manifest.shards)))
    assert a.shard_order(0) != a.shard_order(1) or a.shard_order(1) != a.shard_order(2)
    assert a.shard_order(0) != PackedStream(root, seq_len=SEQ, batch_size=BATCH, seed=12).shard_order(0)
    _take(a, (a.tokens_per_epoch // (SEQ * BATCH)) + 1)
    names = [manifest.shards[i].file for i in a.shard_order(0)]
    assert a.consumed_shards[: len(names)] == names


def test_two_ranks_read_disjoint_shards(data):
    root, _, manifest = data
    ranks = [PackedStream(root, seq_len=SEQ, batch_size=BATCH, rank=r, world_size=2, seed=4) for r in range(2)]
    for epoch in range(3):
        orders = [set(s.shard_order(epoch)) for s in ranks]
        assert not orders[0] & orders[1]
        assert orders[0] | orders[1] == set(range(len(manifest.shards)))
        assert sum(s.epoch_tokens(epoch) for s in ranks) == manifest.tokens + 2 * manifest.documents
    for s in ranks:  # read a little over one epoch each
        _take(s, s.tokens_per_epoch // (SEQ * BATCH) + 1)
    first = [set(s.consumed_shards[: len(s.shard_order(0))]) for s in ranks]
    assert not first[0] & first[1]


def test_fewer_shards_than_ranks(data):
    root, _, manifest = data
    n = len(manifest.shards)
    with pytest.raises(ValueError, match=f"at least {n + 1}.*--shard-bytes"):
        PackedStream(root, seq_len=SEQ, batch_size=BATCH, rank=0, world_size=n + 1)


@pytest.mark.parametrize("rank", [0, 1])
def test_exact_resume_including_epoch_boundaries(data, rank):
    root, _, _ = data

    def make():
        return PackedStream(root, seq_len=SEQ, batch_size=BATCH, rank=rank, world_size=2, seed=7)

    reference = make()
    per_epoch = reference.tokens_per_epoch // (SEQ * BATCH)
    total = 3 * per_epoch + 4
    ids, docs = _take(reference, total)
    rows = [(ids[i * BATCH : (i + 1) * BATCH], docs[i * BATCH : (i + 1) * BATCH]) for i in range(total)]
    # resume points: start, mid-epoch, just before and after each epoch boundary
    states = []
    for n in sorted({0, 1, per_epoch // 2, per_epoch - 1, per_epoch, per_epoch + 1, 2 * per_epoch + 1}):
        first = make()
        _take(first, n) if n else None
        state = json.loads(json.dumps(first.state_dict()))  # must survive JSON
        states.append(state)
        resumed = make()
        resumed.load_state_dict(state)
        k = min(per_epoch + 3, total - n)
        got_ids, got_docs = _take(resumed, k)
        assert np.array_equal(got_ids, np.concatenate([r[0] for r in rows[n : n + k]])), n
        assert np.array_equal(got_docs, np.concatenate([r[1] for r in rows[n : n + k]])), n
    # the points really include a cut inside a document and positions in later epochs
    assert any(s["offset"] > 0 for s in states) and {s["epoch"] for s in states} >= {0, 1}


def test_state_from_another_setup_is_refused(data):
    root, _, _ = data
    state = PackedStream(root, seq_len=SEQ, batch_size=BATCH, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        PackedStream(root, seq_len=SEQ, batch_size=BATCH, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="rank|world_size"):
        PackedStream(root, seq_len=SEQ, batch_size=BATCH, rank=1, world_size=2, seed=1).load_state_dict(state)
    bad = dict(state, sample=10_000)
    with pytest.raises(ValueError, match="outside"):
        PackedStream(root, seq_len=SEQ, batch_size=BATCH, seed=1).load_state_dict(bad)


def _replace_shard(root, index: int, members: list[tuple[str, bytes]]) -> str:
    """Overwrite shard `index` with the given members and fix the manifest's size and hash for it."""
    buffer = io.BytesIO()
    with webdataset.TarWriter(buffer, encoder=False, mtime=0) as tar:
        for name, payload in members:
            key, suffix = name.split(".", 1)
            tar.write({"__key__": key, suffix: payload})
    raw = json.loads((root / "manifest.json").read_text())
    entry = raw["shards"][index]
    (root / entry["file"]).write_bytes(buffer.getvalue())
    entry.update(bytes=len(buffer.getvalue()), sha256=hashlib.sha256(buffer.getvalue()).hexdigest())
    (root / "manifest.json").write_text(json.dumps(raw))
    return entry["file"]


def _read_everything(root):
    stream = PackedStream(root, seq_len=SEQ, batch_size=1)
    _take(stream, stream.tokens_per_epoch // SEQ + 2)


def test_token_id_beyond_vocab_names_shard_and_key(tmp_path):
    manifest = dataset_dir(tmp_path, random_docs(4, seed=1))
    ok = np.array([9, 10], dtype="<u2").tobytes()
    too_big = np.array([9, manifest.vocab_size], dtype="<u2").tobytes()
    members = [("0000000000.ids", ok), ("0000000001.ids", too_big), ("0000000002.ids", ok), ("0000000003.ids", ok)]
    name = _replace_shard(tmp_path, 0, members)
    with pytest.raises(ValueError, match="vocab_size") as e:
        _read_everything(tmp_path)
    assert name in str(e.value) and "0000000001" in str(e.value)


def test_foreign_member_names_shard_and_key(tmp_path):
    dataset_dir(tmp_path, random_docs(2, seed=1))
    ok = np.array([9, 10], dtype="<u2").tobytes()
    name = _replace_shard(tmp_path, 0, [("0000000000.ids", ok), ("0000000001.pickle", b"\x80\x04.")])
    with pytest.raises(ValueError, match="unexpected member") as e:
        _read_everything(tmp_path)
    assert name in str(e.value) and "0000000001" in str(e.value)


def test_sample_count_mismatch(tmp_path):
    dataset_dir(tmp_path, random_docs(3, seed=1))
    ok = np.array([9, 10], dtype="<u2").tobytes()
    _replace_shard(tmp_path, 0, [("0000000000.ids", ok), ("0000000001.ids", ok)])
    with pytest.raises(ValueError, match="ends after 2 samples"):
        _read_everything(tmp_path)
    _replace_shard(tmp_path, 0, [(f"{i:010d}.ids", ok) for i in range(4)])
    with pytest.raises(ValueError, match="more than the 3 samples"):
        _read_everything(tmp_path)


def test_argument_checks(data):
    root, _, _ = data
    with pytest.raises(ValueError, match="seq_len"):
        PackedStream(root, seq_len=0, batch_size=1)
    with pytest.raises(ValueError, match="rank"):
        PackedStream(root, seq_len=8, batch_size=1, rank=2, world_size=2)
    with pytest.raises(ValueError, match="launch.prepare"):
        PackedStream(root / "absent", seq_len=8, batch_size=1)
