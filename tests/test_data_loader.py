"""data/loader.py with worker processes: same batches as in process, exact resume with workers (also across
epoch boundaries), equal batches per epoch on every rank, the mixture of sources, and failure handling."""

from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import psutil
import pytest
import torch

from data.loader import BadDataError, Loader, LoaderConfig, build_loader
from tests.data_helpers import dataset_dir, framed, random_docs, reading_order, shard_documents

SEQ, BATCH = 40, 2


def batches(loader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [next(loader) for _ in range(n)]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def config(sources, **kw) -> LoaderConfig:
    kw = {"seq_len": SEQ, "batch_size": BATCH, "seed": 5, **kw}
    return LoaderConfig([(str(p), w) for p, w in sources], **kw)


def test_worker_processes_give_the_in_process_batches_and_resume_exactly(web):
    root = web[0]
    cfg = dict(rank=1, world_size=2, num_workers=2)
    reference = Loader(config([(root, 1.0)], worker_processes=False, **cfg))
    plan = reference.plans[0]
    per_epoch = min(plan.end_rows(p, 0) for p in range(2)) // BATCH  # batches of a partition in epoch 0
    total = 2 * (2 * per_epoch + 3)  # both partitions, past their second epoch boundary
    want = batches(reference, total)
    with Loader(config([(root, 1.0)], **cfg)) as workers:
        assert same(batches(workers, total), want)
    epochs_seen = set()
    for n in (3, 2 * per_epoch - 1, 2 * per_epoch + 2, total - 6):  # includes both sides of an epoch boundary
        with Loader(config([(root, 1.0)], **cfg)) as first:
            batches(first, n)  # workers have prefetched past n: the state must not include that
            state = json.loads(json.dumps(first.state_dict()))
        epochs_seen |= {p["sources"][0]["epoch"] for p in state["partition_states"]}
        with Loader(config([(root, 1.0)], **cfg)) as resumed:
            resumed.load_state_dict(state)
            assert same(batches(resumed, 6), want[n : n + 6]), n
    assert epochs_seen >= {0, 1}


def test_every_rank_crosses_each_epoch_at_the_same_batch(web):
    root, docs, manifest = web
    world, parts = 3, 2
    loaders = [Loader(config([(root, 1.0)], rank=r, world_size=world, num_workers=parts, worker_processes=False))
               for r in range(world)]
    plan = loaders[0].plans[0]
    # the rule only matters because ranks hold different amounts of data
    assert len({plan.epoch_tokens(0, r, p) for r in range(world) for p in range(parts)}) > 1
    n = 4 * max(plan.end_rows(p, 1) for p in range(parts)) // BATCH
    epochs = [[] for _ in range(world)]
    rows = [[] for _ in range(world)]
    for r, loader in enumerate(loaders):
        for _ in range(n):
            ids, _ = next(loader)
            rows[r].append(ids.numpy())
            epochs[r].append(loader.epoch)
    assert epochs[0] == epochs[1] == epochs[2] and epochs[0][-1] >= 2
    # and nothing is dropped: each partition's rows are its framed documents in reading order, across epochs
    by_shard = shard_documents(docs, manifest)
    for r in range(world):
        for p in range(parts):
            got = np.concatenate(rows[r][p::parts]).reshape(-1)
            want = framed(reading_order(plan, by_shard, r, p, range(6)))
            assert np.array_equal(got, want[: got.size])
            # the rows of epoch e never need data beyond the rank's own epoch e
            for e in range(2):
                own = sum(plan.epoch_tokens(i, r, p) for i in range(e + 1)) // SEQ
                assert plan.end_rows(p, e) <= own


def test_mixture_proportions_determinism_and_resume(web, code):
    sources = [(web[0], 0.7), (code[0], 0.3)]
    loader = Loader(config(sources, batch_size=4, num_workers=2, worker_processes=False))
    got = batches(loader, 150)
    stats = loader.stats()
    tokens = {k.split("/")[1]: v for k, v in stats.items() if k.startswith("tokens/")}
    assert set(tokens) == {"web", "code"}
    share = tokens["web"] / sum(tokens.values())
    # the schedule keeps each source within one row of its share per partition: 600 rows -> |error| <= 2/600
    assert abs(share - 0.7) < 0.02 and abs(share - 0.7) <= 2 / 600
    ids = torch.cat([b[0] for b in got]).numpy()
    ordinary = ids >= 9
    from_web = (ids < 200) | ~ordinary
    from_code = (ids >= 200) | ~ordinary
    assert (from_web.all(axis=1) | from_code.all(axis=1)).all()  # every row comes from one source
    realised = from_web.all(axis=1).mean()
    assert abs(realised - 0.7) < 0.02
    assert {"epoch/web", "epoch/code"} <= stats.keys() and stats["epoch/code"] >= 1  # code is smaller: wrapped
    again = Loader(config(sources, batch_size=4, num_workers=2, worker_processes=False))
    assert same(batches(again, 150), got)
    half = Loader(config(sources, batch_size=4, num_workers=2, worker_processes=False))
    batches(half, 71)
    resumed = Loader(config(sources, batch_size=4, num_workers=2, worker_processes=False))
    resumed.load_state_dict(json.loads(json.dumps(half.state_dict())))
    assert same(batches(resumed, 79), got[71:])
    assert resumed.stats() == stats


def test_bad_data_in_a_worker_is_one_clear_error_and_workers_stop(tmp_path):
    manifest = dataset_dir(tmp_path, random_docs(20, seed=3), max_documents=5)
    victim = tmp_path / manifest.shards[2].file
    data = bytearray(victim.read_bytes())
    data[700] ^= 0xFF
    victim.write_bytes(bytes(data))
    loader = build_loader([(str(tmp_path), 1.0)], SEQ, BATCH, rank=0, world_size=1, seed=0, num_workers=2)
    start = time.monotonic()
    with pytest.raises(BadDataError, match="sha256") as e:
        batches(loader, 200)
    assert time.monotonic() - start < 30
    message = str(e.value)
    assert manifest.shards[2].file in message and "worker" in message and "Traceback" not in message
    assert not _workers()  # the loader shut its workers down on the error


def test_a_killed_worker_is_reported_not_waited_for(web):
    loader = Loader(config([(web[0], 1.0)], num_workers=2))
    batches(loader, 2)
    workers = _workers()
    assert len(workers) == 2
    os.kill(workers[0].pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="worker"):
        batches(loader, 500)  # drains what was prefetched, then must notice the dead worker
    assert time.monotonic() - start < 30
    loader.close()
    assert not _workers()


def test_close_stops_workers(web):
    loader = Loader(config([(web[0], 1.0)], num_workers=2))
    next(loader)
    assert len(_workers()) == 2
    loader.close()
    assert not _workers()
    next(loader)  # a closed loader starts its workers again, from where it stopped
    loader.close()


def _workers() -> list[psutil.Process]:
    """Live worker processes of this test process (children that are not zombies)."""
    deadline = time.monotonic() + 10
    while True:
        alive = [p for p in psutil.Process().children() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive or time.monotonic() > deadline:
            return alive
        if len(alive) >= 2:
            return alive
        time.sleep(0.05)
