"""data/loader.py: one global row order whatever the world size, workers and batch size; worker processes give
the in-process batches; exact resume (also across epoch boundaries, and onto another world size and worker count,
checked by iterate-save-rebuild-load-compare); the mixture of sources; failure handling."""

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
from tests.data_helpers import dataset_dir, per_rank_batches, random_docs

SEQ, BATCH = 40, 2


def batches(loader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [next(loader) for _ in range(n)]


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def config(sources, **kw) -> LoaderConfig:
    kw = {"seq_len": SEQ, "batch_size": BATCH, "seed": 5, **kw}
    return LoaderConfig([(str(p), w) for p, w in sources], **kw)


def global_rows(sources, world: int, workers: int, batch: int, steps: int, state=None, **kw) -> np.ndarray:
    """The rows every rank of a world hands out in `steps` batches, put back in global order (step, then rank)."""
    got = per_rank_batches([config(sources, rank=r, world_size=world, num_workers=workers, batch_size=batch, **kw)
                            for r in range(world)], steps, state)
    return np.concatenate([got[r][k][0] for k in range(steps) for r in range(world)])


def test_global_order_does_not_depend_on_world_size_workers_or_batch_size(web, code):
    sources = [(web[0], 0.7), (code[0], 0.3)]
    want = global_rows(sources, world=1, workers=0, batch=6, steps=40)
    for world, workers, batch, processes in ((2, 0, 3, False), (3, 2, 2, False), (3, 2, 2, True), (6, 1, 1, True)):
        got = global_rows(sources, world, workers, batch, steps=240 // (world * batch), worker_processes=processes)
        assert np.array_equal(got, want), (world, workers, batch, processes)


def test_worker_processes_give_the_in_process_batches_and_resume_exactly(web):
    root, _, manifest = web
    cfg = dict(rank=1, world_size=2, num_workers=2)
    reference = Loader(config([(root, 1.0)], worker_processes=False, **cfg))
    per_epoch = (manifest.tokens + 2 * manifest.documents) // (2 * BATCH * SEQ)  # global steps in one epoch
    total = 2 * per_epoch + 6  # past the second epoch boundary
    want = batches(reference, total)
    with Loader(config([(root, 1.0)], **cfg)) as workers:
        assert same(batches(workers, total), want)
    epochs_seen = set()
    for n in (3, per_epoch - 1, per_epoch + 1, total - 6):  # includes both sides of an epoch boundary
        with Loader(config([(root, 1.0)], **cfg)) as first:
            batches(first, n)  # workers have prefetched past n: the state must not include that
            state = json.loads(json.dumps(first.state_dict()))
        epochs_seen.add(state["positions"][0]["epoch"])
        with Loader(config([(root, 1.0)], **cfg)) as resumed:
            resumed.load_state_dict(state)
            assert same(batches(resumed, 6), want[n : n + 6]), n
    assert epochs_seen >= {0, 1}


@pytest.mark.parametrize(("old", "new"), [((2, 2), (3, 1)), ((3, 0), (1, 3)), ((1, 2), (2, 0))])
def test_save_rebuild_load_compare_across_world_sizes_and_workers(web, code, old, new):
    """Iterate on one layout, save, rebuild on another, load, compare: the new world continues at the exact next
    global row (mid-document and past an epoch boundary included)."""
    sources = [(web[0], 0.7), (code[0], 0.3)]
    want = global_rows(sources, world=1, workers=0, batch=6, steps=70)
    (old_world, old_workers), (new_world, new_workers) = old, new
    for steps in (5, 37):  # global rows 30 (inside epoch 0) and 222 (web is in its epoch 1 by then)
        loaders = [Loader(config(sources, rank=r, world_size=old_world, num_workers=old_workers,
                                 batch_size=6 // old_world)) for r in range(old_world)]
        for loader in loaders:
            batches(loader, steps)
        states = [json.loads(json.dumps(loader.state_dict())) for loader in loaders]
        for loader in loaders:
            loader.close()
        assert all(s["rows"] == steps * 6 for s in states)
        got = global_rows(sources, new_world, new_workers, 6 // new_world, steps=10, state=states[-1])
        assert np.array_equal(got, want[steps * 6 : steps * 6 + 60]), (old, new, steps)
    assert states[0]["positions"][0]["epoch"] == 1 and states[0]["positions"][1]["epoch"] == 0


def test_mixture_proportions_determinism_and_resume(web, code):
    sources = [(web[0], 0.7), (code[0], 0.3)]
    loader = Loader(config(sources, batch_size=4, num_workers=2, worker_processes=False))
    got = batches(loader, 150)
    stats = loader.stats()
    tokens = {k.split("/")[1]: v for k, v in stats.items() if k.startswith("tokens/")}
    assert set(tokens) == {"web", "code"}
    share = tokens["web"] / sum(tokens.values())
    # the schedule keeps each source within one row of its share of the global rows: 600 rows -> |error| <= 1/600
    assert abs(share - 0.7) <= 1 / 600
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


def test_a_window_of_every_shard_mixes_a_topic_sorted_corpus(tmp_path):
    """bench/shuffle_mix.py's measure: 4 topics, one per shard, shards in topic order. With the window holding
    every shard of the epoch, each topic's share of every 20 consecutive global batches stays within 5 points of
    its global share. Tolerance: a 20-batch window holds ~3,000 documents, so a share's sampling noise is about
    0.8 points (sd) and the largest over the ~50 windows about 2; 5 points is far outside that (seeds fixed).
    Shuffling inside each shard only fails the same measure by far (a window then sees a few topics)."""
    from bench.shuffle_mix import measure, topic_sorted_corpus

    corpus = topic_sorted_corpus(tmp_path, topics=4, shards_per_topic=3, docs_per_shard=500, seed=0)
    mixed = measure(corpus, window_shards=corpus.shards, epochs=2, seed=0)
    assert mixed["windows_of_batches"] >= 40
    assert all(abs(t["global"] - 0.25) < 0.01 for t in mixed["topics"])
    assert max(t["max_deviation_points"] for t in mixed["topics"]) <= 5.0, mixed
    in_shard = measure(corpus, window_shards=1, epochs=2, seed=0)
    assert min(t["max_deviation_points"] for t in in_shard["topics"]) > 10.0, in_shard
