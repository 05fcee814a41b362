"""Hostile input: damaged, foreign or missing shards and samples, under on_bad_data='fail' (a clear error naming
the shard and key) and 'skip' (left out, counted in stats()). Never a silent drop, never a hang, never a decode."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil

import numpy as np
import pytest
import torch
import webdataset

from data.loader import BadDataError, Loader, LoaderConfig
from data.order import SourceOrder
from tests.data_helpers import dataset_dir, framed, random_docs, reading_order

SEQ = 16


def _ids(values) -> bytes:
    return np.asarray(values, dtype="<u2").tobytes()


def rewrite_shard(root, index: int, members: list[tuple[str, bytes]], raw_bytes: bytes | None = None) -> str:
    """Replace shard `index` by a tar of `members` (or by raw_bytes) and make the manifest agree with it, so that
    only the loader's own checks of the content can find the problem."""
    if raw_bytes is None:
        buffer = io.BytesIO()
        with webdataset.TarWriter(buffer, encoder=False, mtime=0) as tar:
            for name, payload in members:
                key, suffix = name.split(".", 1)
                tar.write({"__key__": key, suffix: payload})
        raw_bytes = buffer.getvalue()
    manifest = json.loads((root / "manifest.json").read_text())
    entry = manifest["shards"][index]
    (root / entry["file"]).write_bytes(raw_bytes)
    samples = len(members)
    manifest["totals"]["documents"] += samples - entry["samples"]
    entry.update(bytes=len(raw_bytes), sha256=hashlib.sha256(raw_bytes).hexdigest(), samples=samples)
    (root / "manifest.json").write_text(json.dumps(manifest))
    return entry["file"]


def loader(root, policy: str, **kw) -> Loader:
    return Loader(LoaderConfig([(str(root), 1.0)], seq_len=SEQ, batch_size=1, on_bad_data=policy, **kw))


def rows_for(loader_: Loader, n_tokens: int) -> np.ndarray:
    n = -(-n_tokens // SEQ)
    return torch.cat([next(loader_)[0] for _ in range(n)]).numpy().reshape(-1)[:n_tokens]


def met_when_reading(sequence: list, n_tokens: int) -> dict[str, int]:
    """Skip counters after a reader went through `sequence` (documents, and bad members as their reason strings)
    far enough to fill n_tokens framed tokens: a bad member is met only once the reader looks past it."""
    counts: dict[str, int] = {}
    filled = 0
    for entry in sequence:
        if filled >= n_tokens:
            break
        if isinstance(entry, str):
            counts[f"skipped_samples/{entry}"] = counts.get(f"skipped_samples/{entry}", 0) + 1
        else:
            filled += len(entry) + 2
    assert filled >= n_tokens, "the sequence given is too short for n_tokens"
    return counts


@pytest.fixture
def three_shards(tmp_path):
    docs = random_docs(12, seed=4, max_len=30)
    dataset_dir(tmp_path, docs, max_documents=4)
    return tmp_path, docs


def test_foreign_members_are_never_decoded(three_shards, tmp_path_factory):
    root, docs = three_shards
    canary = tmp_path_factory.mktemp("canary") / "unpickled"
    evil = f"cos\nsystem\n(S'touch {canary}'\ntR.".encode()  # runs a command if anything ever unpickles it
    good = [_ids([9, 10, 11]), _ids([12, 13]), _ids([14])]
    vocab = loader(root, "skip").manifest.vocab_size
    members = [("0000000000.ids", good[0]), ("0000000001.pickle", evil), ("0000000002.ids", _ids([9, vocab])),
               ("0000000003.pyd", b"MZ\x90\x00"), ("0000000004.ids", good[1]), ("0000000005.ids", b"\x01\x02\x03"),
               ("0000000006.ids", good[2])]
    name = rewrite_shard(root, 0, members)
    bad = {1: ("member", "unexpected member '0000000001.pickle'"), 2: ("vocab", f"token id {vocab} >= vocab_size"),
           3: ("member", "unexpected member '0000000003.pyd'"), 5: ("length", "3 bytes is not a whole number")}
    # Shard 0's members are read in a seeded order, so the first bad one met depends on the seed: for each bad
    # member, a seed that reads it first among the bad ones must stop the loader with an error naming it.
    def first_bad(seed: int) -> int:  # with windows of one shard, shard 0's members are read in this order
        order = SourceOrder(3, seed, 0, window_shards=1)
        return next(i for i in order.documents(0, list(order.order(0)).index(0), 7) if i in bad)

    for index, (_, message) in bad.items():
        seed = next(s for s in range(1000) if first_bad(s) == index)
        with pytest.raises(BadDataError, match=re.escape(message)) as e:
            rows_for(loader(root, "fail", seed=seed, shuffle_window_shards=1), 10_000)
        assert name in str(e.value) and f"'{members[index][0].split('.')[0]}'" in str(e.value)

    skipping = loader(root, "skip")
    order = skipping.orders[0]
    by_shard = [[np.array([9, 10, 11]), "member", "vocab", "member", np.array([12, 13]), "length", np.array([14])],
                docs[4:8], docs[8:12]]
    epoch0 = reading_order(order, by_shard, [0])
    want = framed(epoch0)
    got = rows_for(skipping, want.size)
    assert np.array_equal(got, want)  # exactly the good documents, in the reading order
    counts = {k: v for k, v in skipping.stats().items() if k.startswith("skipped")}
    # every bad member of epoch 0 once, plus those of epoch 1 the last row's tail reached past
    expected = met_when_reading(epoch0 + reading_order(order, by_shard, [1]), -(-want.size // SEQ) * SEQ)
    assert counts == expected
    assert expected["skipped_samples/member"] >= 2 and expected.keys() >= {"skipped_samples/vocab",
                                                                            "skipped_samples/length"}
    assert not canary.exists()


def test_token_id_beyond_vocab_fails_naming_shard_and_key(three_shards):
    root, _ = three_shards
    vocab = loader(root, "fail").manifest.vocab_size
    name = rewrite_shard(root, 1, [("0000000004.ids", _ids([9])), ("0000000005.ids", _ids([9, vocab + 3]))])
    with pytest.raises(BadDataError, match=f"token id {vocab + 3} >= vocab_size") as e:
        rows_for(loader(root, "fail"), 10_000)
    assert name in str(e.value) and "'0000000005'" in str(e.value)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("flip_byte", "sha256"),  # same size, different content: only the hash sees it
        ("truncate_file", "size"),
        ("grow_file", "size"),  # read only up to the manifest's size + 1: an endless stream cannot exhaust memory
        ("missing", "missing"),
        ("not_tar_but_listed", "not_tar"),  # manifest agrees with the bytes: the tar parser must refuse them
        ("tar_cut_in_member_data_but_listed", "not_tar"),
        ("tar_cut_in_member_header_but_listed", "count"),  # tarfile sees a clean end: the count check must not
        ("manifest_lists_one_more", "count"),
    ],
)
def test_damaged_shard_fail_or_skip(three_shards, damage, reason):
    root, docs = three_shards
    target = root / "shard-000001.tar"
    data = target.read_bytes()
    if damage == "flip_byte":
        target.write_bytes(data[:600] + bytes([data[600] ^ 0xFF]) + data[601:])
    elif damage == "truncate_file":
        target.write_bytes(data[:1000])
    elif damage == "grow_file":
        target.write_bytes(data + bytes(1 << 20))
    elif damage == "missing":
        target.unlink()
    elif damage == "not_tar_but_listed":
        rewrite_shard(root, 1, [("x.ids", b"")] * 4, raw_bytes=b"this is not a tar file at all\n" * 400)
    elif damage == "tar_cut_in_member_data_but_listed":  # member 2: header at 1024, data from 1536
        rewrite_shard(root, 1, [("x.ids", b"")] * 4, raw_bytes=data[:1600])
    elif damage == "tar_cut_in_member_header_but_listed":
        rewrite_shard(root, 1, [("x.ids", b"")] * 4, raw_bytes=data[:1100])
    elif damage == "manifest_lists_one_more":
        manifest = json.loads((root / "manifest.json").read_text())
        manifest["shards"][1]["samples"] += 1
        manifest["totals"]["documents"] += 1
        (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BadDataError) as e:
        rows_for(loader(root, "fail"), 10_000)
    assert "shard-000001.tar" in str(e.value) and "on_bad_data='skip'" in str(e.value)

    skipping = loader(root, "skip")
    by_shard = [docs[0:4], [], docs[8:12]]  # shard 1 is left out whole
    want = framed(reading_order(skipping.orders[0], by_shard, [0]))
    assert np.array_equal(rows_for(skipping, want.size), want)
    skipped = {k: v for k, v in skipping.stats().items() if k.startswith("skipped")}
    # counted each time the shard comes up (the last row may reach into epoch 1 and meet it again)
    met = skipping.consumed_shards.count("shard-000001.tar")
    assert met >= 1 and skipped == {f"skipped_shards/{reason}": met}


def test_everything_bad_is_an_error_not_a_hang(three_shards):
    root, _ = three_shards
    for i in range(3):
        (root / f"shard-00000{i}.tar").write_bytes(b"\0" * 10240)  # tar-sized zeros: only the hash refuses them
    with pytest.raises(ValueError, match="no usable document in all of epoch 0.*skipped_shards/sha256 3"):
        rows_for(loader(root, "skip"), 100)


def test_tokenizer_that_disagrees_with_the_manifest(three_shards, tmp_path_factory):
    root, _ = three_shards
    other = tmp_path_factory.mktemp("other")
    dataset_dir(other, random_docs(8, seed=9), max_documents=4)
    with open(other / "tokenizer" / "spm.model", "ab") as f:
        f.write(b"\0")  # the shards' tokenizer is not the one in the folder any more
    for policy in ("fail", "skip"):  # a tokenizer mismatch concerns every sample: no policy skips it
        with pytest.raises(ValueError, match="does not match the tokenizer hash"):
            loader(other, policy)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["tokenizer"]["sha256"] = hashlib.sha256((other / "tokenizer" / "spm.model").read_bytes()).hexdigest()
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="different tokenizers"):
        Loader(LoaderConfig([(str(root), 1.0), (str(other), 1.0)], seq_len=SEQ, batch_size=1))


def test_manifest_cannot_point_outside_the_dataset(three_shards):
    root, _ = three_shards
    manifest = json.loads((root / "manifest.json").read_text())
    shutil.copy(root / "shard-000000.tar", root.parent / "outside.tar")
    manifest["shards"][0]["file"] = "../outside.tar"
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="plain relative path"):
        loader(root, "skip")
