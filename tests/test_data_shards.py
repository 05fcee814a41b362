"""data/shards.py + data/manifest.py: tar layout, size bounds, reproducible bytes, manifest validation."""

from __future__ import annotations

import hashlib
import json
import tarfile

import numpy as np
import pytest

from data.manifest import load_manifest
from data.shards import ShardWriter, archive_bytes, id_bytes, member_bytes, remove_stale_shards
from tests.data_helpers import dataset_dir, random_docs


def _write(out, docs, dtype="uint16", **kw):
    writer = ShardWriter(out, dtype, **kw)
    for d in docs:
        writer.add(d)
    return writer, writer.close()


def test_tar_layout_and_headers(tmp_path):
    docs = random_docs(5)
    _, shards = _write(tmp_path, docs)
    with tarfile.open(tmp_path / shards[0].file) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == [f"{i:010d}.ids" for i in range(5)]
        for m, doc in zip(members, docs, strict=True):
            assert (m.mtime, m.uid, m.gid, m.uname, m.mode) == (0, 0, 0, "cloze", 0o444)
            data = tar.extractfile(m).read()
            assert np.array_equal(np.frombuffer(data, dtype="<u2"), doc)


def test_size_bound_rollover_and_counts(tmp_path):
    docs = random_docs(300, seed=1)
    limit = 64 * 1024
    writer, shards = _write(tmp_path, docs, max_bytes=limit)
    assert len(shards) > 3
    for s in shards:
        data = (tmp_path / s.file).read_bytes()
        assert len(data) == s.bytes <= limit
        assert hashlib.sha256(data).hexdigest() == s.sha256
    assert sum(s.samples for s in shards) == writer.documents == 300
    assert sum(s.tokens for s in shards) == writer.tokens == sum(d.size for d in docs)
    # a shard only closes when the next document would not fit
    sizes = [member_bytes(2 * d.size) for d in docs]
    start = 0
    for s in shards[:-1]:
        used = sum(sizes[start : start + s.samples])
        assert archive_bytes(used + sizes[start + s.samples]) > limit
        start += s.samples


def test_oversized_document_gets_its_own_shard(tmp_path):
    docs = [np.arange(9, 20), np.full(20000, 30), np.arange(9, 12)]
    _, shards = _write(tmp_path, docs, max_bytes=20480)
    assert [s.samples for s in shards] == [1, 1, 1]
    assert shards[1].bytes > 20480


def test_max_documents(tmp_path):
    _, shards = _write(tmp_path, random_docs(10), max_documents=4)
    assert [s.samples for s in shards] == [4, 4, 2]


def test_byte_identical_rewrite(tmp_path):
    docs = random_docs(50, seed=2)
    _, a = _write(tmp_path / "a", docs, max_bytes=32 * 1024)
    _, b = _write(tmp_path / "b", docs, max_bytes=32 * 1024)
    assert a == b
    for s in a:
        assert (tmp_path / "a" / s.file).read_bytes() == (tmp_path / "b" / s.file).read_bytes()


def test_uint32_and_range_checks(tmp_path):
    big = np.array([9, 70000, 2**32 - 1])
    _, shards = _write(tmp_path, [big], dtype="uint32")
    with tarfile.open(tmp_path / shards[0].file) as tar:
        data = tar.extractfile(tar.getmembers()[0]).read()
    assert np.frombuffer(data, dtype="<u4").tolist() == big.tolist()
    with pytest.raises(ValueError, match="uint16"):
        id_bytes(np.array([70000]), "uint16")
    with pytest.raises(ValueError, match="below the minimum"):
        ShardWriter(tmp_path, "uint16", max_bytes=1000)


def test_remove_stale_shards(tmp_path):
    _, many = _write(tmp_path, random_docs(20), max_documents=5)
    _, few = _write(tmp_path, random_docs(20), max_documents=10)
    (tmp_path / "shard-notes.txt").write_text("mine")
    removed = remove_stale_shards(tmp_path, few)
    assert [p.name for p in removed] == [s.file for s in many[len(few):]]
    assert (tmp_path / "shard-notes.txt").exists()


def test_manifest_round_trip(tmp_path):
    written = dataset_dir(tmp_path, random_docs(40), max_documents=15)
    loaded = load_manifest(tmp_path, verify_hashes=True)
    assert loaded == written
    assert loaded.tokenizer_path == tmp_path / "tokenizer" / "spm.model"
    assert load_manifest(tmp_path / "manifest.json") == written
    raw = json.loads((tmp_path / "manifest.json").read_text())
    assert raw["format_version"] == 1 and raw["totals"]["shards"] == 3
    assert raw["special_ids"]["[MASK]"] == 4 and raw["tokenizer"]["path"] == "tokenizer/spm.model"


def test_missing_manifest_says_run_prepare(tmp_path):
    with pytest.raises(ValueError, match="launch.prepare") as e:
        load_manifest(tmp_path / "nowhere")
    assert "manifest.json" in str(e.value)


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda m: m.pop("vocab_size"), "'vocab_size'"),
        (lambda m: m["totals"].pop("tokens"), "'totals.tokens'"),
        (lambda m: m["shards"][1].pop("sha256"), "'shards[1].sha256'"),
        (lambda m: m["shards"][0].update(samples="7"), "'shards[0].samples' should be int"),
        (lambda m: m["tokenizer"].pop("path"), "'tokenizer.path'"),
        (lambda m: m.update(format_version=99), "format_version 99"),
        (lambda m: m["totals"].update(documents=1), "documents=1"),
        (lambda m: m.update(id_dtype="int8"), "id_dtype"),
    ],
)
def test_bad_manifest_fields_are_named(tmp_path, edit, fragment):
    dataset_dir(tmp_path, random_docs(20), max_documents=10)
    raw = json.loads((tmp_path / "manifest.json").read_text())
    edit(raw)
    (tmp_path / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        load_manifest(tmp_path)


def test_bad_json(tmp_path):
    dataset_dir(tmp_path, random_docs(5))
    (tmp_path / "manifest.json").write_text("{ truncated")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_manifest(tmp_path)


def test_missing_or_resized_shard_names_it(tmp_path):
    m = dataset_dir(tmp_path, random_docs(30), max_documents=10)
    shard = tmp_path / m.shards[1].file
    data = shard.read_bytes()
    shard.write_bytes(data[:-512])
    with pytest.raises(ValueError, match="re-run") as e:
        load_manifest(tmp_path)
    assert m.shards[1].file in str(e.value) and "bytes" in str(e.value)
    shard.unlink()
    with pytest.raises(ValueError, match="missing") as e:
        load_manifest(tmp_path)
    assert m.shards[1].file in str(e.value)


def test_corruption_found_by_hash_and_tokenizer_change(tmp_path):
    m = dataset_dir(tmp_path, random_docs(10))
    shard = tmp_path / m.shards[0].file
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF  # same size, different content
    shard.write_bytes(bytes(data))
    load_manifest(tmp_path)  # size check alone passes
    with pytest.raises(ValueError, match="sha256"):
        load_manifest(tmp_path, verify_hashes=True)
    with open(tmp_path / "tokenizer" / "spm.model", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match="tokenizer .* changed"):
        load_manifest(tmp_path)
