"""The node's shard cache (data/cache.py) through build_loader, against a real HTTP server on 127.0.0.1 that
counts what it serves: later epochs read no shard twice from the server, the size bound holds, a damaged entry
is found and fetched again, a shard that fails its hash is never cached, and processes share one folder."""

from __future__ import annotations

import collections
import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from data.cache import ShardCache
from data.loader import BadDataError, build_loader
from tests.data_helpers import dataset_dir, random_docs

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="http(s) sources are read with curl")
SEQ, BATCH = 32, 2
ROOT = Path(__file__).resolve().parent.parent


class _CountingHandler(http.server.SimpleHTTPRequestHandler):
    counts: collections.Counter = collections.Counter()
    lock = threading.Lock()

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        with self.lock:
            self.counts[self.path] += 1
        super().do_GET()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A 6-shard dataset in <tmp>/www/web served over HTTP; yields (folder, URL, request counter)."""
    www = tmp_path_factory.mktemp("www")
    root = www / "web"
    manifest = dataset_dir(root, random_docs(30, seed=3, max_len=120), max_documents=5)
    assert len(manifest.shards) == 6
    handler = functools.partial(_CountingHandler, directory=str(www))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/web", _CountingHandler.counts
    server.shutdown()
    server.server_close()


def _epochs(spec: str, epochs: int, **kw) -> list[torch.Tensor]:
    """Batches of a one-rank loader until it starts epoch `epochs`."""
    loader = build_loader([(spec, 1.0)], seq_len=SEQ, batch_size=BATCH, rank=0, world_size=1, seed=0, **kw)
    out = []
    try:
        while loader.epoch < epochs:
            out.append(next(loader)[0])
    finally:
        loader.close()
    return out


def _shard_requests(counts, prefix: str = "/web/shard-") -> int:
    return sum(n for path, n in counts.items() if path.startswith(prefix))


def test_later_epochs_read_from_the_cache_not_the_server(served, tmp_path):
    root, url, counts = served
    local = _epochs(str(root), 3)
    counts.clear()
    uncached = _epochs(url, 3)
    assert _shard_requests(counts) >= 3 * 6 - 1  # every epoch fetches every shard again
    counts.clear()
    cached = _epochs(url, 3, cache_dir=str(tmp_path / "cache"))
    assert _shard_requests(counts) == 6, counts  # each shard once, in the first epoch
    assert all(n == 1 for path, n in counts.items() if path.startswith("/web/shard-"))
    assert all(torch.equal(a, b) for a, b in zip(local, uncached, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(local, cached, strict=True))
    names = set(ShardCache(tmp_path / "cache", 1 << 30).entries())
    assert names == {f"{s}.tar" for s in _manifest_hashes(root)}  # named by content hash, nothing else
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith(".fetch-")] == []


def _manifest_hashes(root: Path) -> list[str]:
    from data.manifest import load_manifest

    return [s.sha256 for s in load_manifest(root).shards]


def test_the_size_bound_holds_and_recently_used_shards_stay(served, tmp_path):
    root, url, counts = served
    sizes = sorted(os.path.getsize(p) for p in root.glob("shard-*.tar"))
    bound = sizes[0] + sizes[1] + sizes[2] - 1  # room for two shards, never three
    cache = tmp_path / "cache"
    loader = build_loader([(url, 1.0)], seq_len=SEQ, batch_size=BATCH, rank=0, world_size=1, seed=0,
                          cache_dir=str(cache), cache_max_bytes=bound)
    try:
        for _ in range(40):
            next(loader)
            entries = ShardCache(cache, bound).entries()
            assert sum(entries.values()) <= bound
            assert 1 <= len(entries) <= 2
        last = loader.consumed_shards[-1]
    finally:
        loader.close()
    from data.manifest import load_manifest

    by_name = {s.file: s.sha256 for s in load_manifest(root).shards}
    assert f"{by_name[last]}.tar" in ShardCache(cache, bound).entries()  # the shard in use was not evicted
    # a shard larger than the whole bound is read (verified) without being cached
    tiny = tmp_path / "tiny"
    counts.clear()
    assert len(_epochs(url, 2, cache_dir=str(tiny), cache_max_bytes=sizes[0] - 1)) > 0
    assert _shard_requests(counts) >= 2 * 6 - 1
    assert ShardCache(tiny, 1).entries() == {}


def test_a_damaged_entry_is_found_and_fetched_again(served, tmp_path):
    root, url, counts = served
    cache = tmp_path / "cache"
    local = _epochs(str(root), 2)
    _epochs(url, 1, cache_dir=str(cache))  # fills the cache
    entries = sorted(cache.glob("*.tar"))
    assert len(entries) == 6
    # one entry with a flipped byte, one truncated, one replaced by a symlink to a file outside the cache
    data = bytearray(entries[0].read_bytes())
    data[700] ^= 0xFF
    entries[0].write_bytes(bytes(data))
    with open(entries[1], "r+b") as f:
        f.truncate(1024)
    outside = tmp_path / "outside.tar"
    outside.write_bytes(entries[2].read_bytes())
    entries[2].unlink()
    entries[2].symlink_to(outside)
    counts.clear()
    again = _epochs(url, 2, cache_dir=str(cache))
    assert all(torch.equal(a, b) for a, b in zip(local, again, strict=True))
    assert _shard_requests(counts) == 3  # only the three damaged ones, once each
    assert not entries[2].is_symlink() and outside.exists()  # the link was removed, never followed or written
    for entry in entries:
        assert entry.read_bytes() == (root / _file_of(root, entry.stem)).read_bytes()


def _file_of(root: Path, sha256: str) -> str:
    from data.manifest import load_manifest

    return next(s.file for s in load_manifest(root).shards if s.sha256 == sha256)


def test_a_shard_that_fails_its_hash_is_never_cached(served, tmp_path):
    root, url, _ = served
    bad = root.parent / "badweb"
    if not bad.exists():
        shutil.copytree(root, bad)
        shard = bad / "shard-000002.tar"
        data = bytearray(shard.read_bytes())
        data[600] ^= 0xFF  # same size, other content
        shard.write_bytes(bytes(data))
    bad_url = url.rsplit("/", 1)[0] + "/badweb"
    cache = tmp_path / "cache"
    with pytest.raises(BadDataError, match="shard-000002.tar.*sha256"):
        _epochs(bad_url, 1, cache_dir=str(cache))
    loader = build_loader([(bad_url, 1.0)], seq_len=SEQ, batch_size=BATCH, rank=0, world_size=1, seed=0,
                          on_bad_data="skip", cache_dir=str(cache))
    try:
        while loader.epoch < 2:
            next(loader)
        # refetched in every epoch it is read in (the loader may already be reading the next epoch's first
        # window), skipped each time
        assert loader.stats()["skipped_shards/sha256"] >= 2
    finally:
        loader.close()
    hashes = _manifest_hashes(root)
    assert f"{hashes[2]}.tar" not in ShardCache(cache, 1).entries()
    assert len(ShardCache(cache, 1).entries()) == 5
    assert [p for p in cache.iterdir() if p.name.startswith(".fetch-")] == []


_READER = """
import sys, torch
from data.loader import build_loader
url, cache, bound, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
loader = build_loader([(url, 1.0)], seq_len=32, batch_size=2, rank=0, world_size=1, seed=0, num_workers=2,
                      cache_dir=cache, cache_max_bytes=bound)
batches = []
while loader.epoch < 4:
    batches.append(next(loader)[0])
loader.close()
torch.save(torch.stack(batches), out)
"""


@pytest.mark.distributed
def test_processes_sharing_one_cache_read_the_right_data(served, tmp_path):
    """Two processes, each with two loader workers, share a cache bounded to about three shards, so entries are
    written, hit and evicted under each other's feet for four epochs."""
    root, url, _ = served
    sizes = sorted(os.path.getsize(p) for p in root.glob("shard-*.tar"))
    bound = sum(sizes[:3])
    cache = tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", _READER, url, str(cache), str(bound), str(tmp_path / f"{i}.pt")],
                              cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
    expected = _local_with_workers(root)
    for i in range(2):
        got = torch.load(tmp_path / f"{i}.pt", weights_only=True)
        assert torch.equal(got, expected[: len(got)]) and len(got) == len(expected)
    assert 0 < sum(ShardCache(cache, bound).entries().values()) <= bound
    assert [p for p in cache.iterdir() if p.name.startswith(".fetch-")] == []


def _local_with_workers(root: Path) -> torch.Tensor:
    from data.loader import Loader, LoaderConfig

    loader = Loader(LoaderConfig([(str(root), 1.0)], seq_len=SEQ, batch_size=BATCH, num_workers=2,
                                 worker_processes=False))
    batches = []
    while loader.epoch < 4:
        batches.append(next(loader)[0])
    loader.close()
    return torch.stack(batches)
