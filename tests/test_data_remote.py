"""Remote sources: shards served over HTTP on 127.0.0.1 and read through pipe: commands give the same batches
as the local folder; a missing URL is a clear error (fail) or a counted skip, never a hang."""

from __future__ import annotations

import functools
import http.server
import shutil
import threading
import time

import pytest
import torch

from data.loader import BadDataError, Loader, LoaderConfig
from tests.data_helpers import dataset_dir, random_docs

SEQ, BATCH = 32, 2


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep the test output clean
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A prepared dataset in <tmp>/www/web, served by a local HTTP server; yields (folder, base URL)."""
    www = tmp_path_factory.mktemp("www")
    root = www / "web"
    dataset_dir(root, random_docs(30, seed=8, max_len=120), max_documents=5)
    handler = functools.partial(_QuietHandler, directory=str(www))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/web"
    server.shutdown()
    server.server_close()


def _batches(spec: str, n: int, **kw) -> list[tuple[torch.Tensor, torch.Tensor]]:
    kw = {"rank": 1, "world_size": 2, **kw}
    loader = Loader(LoaderConfig([(spec, 1.0)], seq_len=SEQ, batch_size=BATCH, **kw))
    try:
        return [next(loader) for _ in range(n)]
    finally:
        loader.close()


def _same(a, b) -> bool:
    return all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b, strict=True))


@pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset opens http(s) URLs with curl")
def test_http_and_pipe_sources_equal_the_local_folder(served):
    root, url = served
    local = _batches(str(root), 40)
    assert _same(_batches(url, 40), local)
    assert _same(_batches(url + "/", 40, num_workers=2), _batches(str(root), 40, num_workers=2))
    assert _same(_batches(f"pipe:cat {root}/{{}}", 40), local)


@pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset opens http(s) URLs with curl")
def test_missing_url_fails_clearly_or_is_skipped(served, tmp_path):
    root, url = served
    # a copy of the served dataset whose shard 3 the server does not have
    copy = root.parent / "holey"
    if not copy.exists():
        shutil.copytree(root, copy)
        (copy / "shard-000003.tar").unlink()
    holey = url.rsplit("/", 1)[0] + "/holey"
    start = time.monotonic()
    with pytest.raises(BadDataError, match="shard-000003.tar.*cannot be read") as e:
        _batches(holey, 200, world_size=1, rank=0)
    assert holey + "/shard-000003.tar" in str(e.value)
    loader = Loader(LoaderConfig([(holey, 1.0)], seq_len=SEQ, batch_size=BATCH, on_bad_data="skip"))
    for _ in range(60):
        next(loader)
    assert loader.stats()["skipped_shards/missing"] == loader.consumed_shards.count("shard-000003.tar") >= 1
    assert time.monotonic() - start < 60


def test_unreachable_manifest_and_bad_specs(served):
    _, url = served
    with pytest.raises(ValueError, match="cannot read the manifest.*nowhere"):
        Loader(LoaderConfig([(url.rsplit("/", 1)[0] + "/nowhere", 1.0)], seq_len=SEQ, batch_size=BATCH))
    with pytest.raises(ValueError, match="needs \\{\\}"):
        LoaderConfig([("pipe:cat /data/shards", 1.0)], seq_len=SEQ, batch_size=BATCH)
    with pytest.raises(ValueError, match="cannot read the manifest"):
        Loader(LoaderConfig([("pipe:cat /nonexistent/{}", 1.0)], seq_len=SEQ, batch_size=BATCH))
