"""Loader.load_reshaped: resuming every old rank's loader state on another world size / number of workers.

The new loaders must restart, per source, the earliest epoch an old partition was still reading (computed here
from the rows the old loaders handed out, not from their states), read from its beginning with the new split,
keep the mixture balanced, and carry the counters over; bad state lists are refused with a clear error."""

from __future__ import annotations

import bisect
import json

import numpy as np
import pytest
import torch

from data.loader import Loader, LoaderConfig
from tests.data_helpers import framed, reading_order, shard_documents

SEQ, BATCH, SEED = 40, 2, 5


def make(sources, rank: int, world: int, workers: int, processes: bool = False, **kw) -> Loader:
    return Loader(LoaderConfig([(str(p), w) for p, w in sources], SEQ, BATCH, rank=rank, world_size=world,
                               seed=SEED, num_workers=workers, worker_processes=processes, **kw))


def run_old_world(sources, world: int, workers: int, n: int) -> tuple[list[dict], list[list[np.ndarray]]]:
    """Every old rank after n batches: JSON round-tripped states, and the rows each partition handed out."""
    states, rows = [], []
    for rank in range(world):
        loader = make(sources, rank, world, workers)
        got = [next(loader)[0].numpy() for _ in range(n)]
        parts = loader.partitions
        rows.append([np.concatenate(got[p::parts]) if got[p::parts] else np.zeros((0, SEQ)) for p in range(parts)])
        states.append(json.loads(json.dumps(loader.state_dict())))
    return states, rows


def next_epoch(plan, rank: int, part: int, tokens_read: int) -> int:
    """The epoch holding the partition's next framed token, after it handed out tokens_read of them."""
    ends = np.cumsum([plan.epoch_tokens(e, rank, part) for e in range(20)])
    return bisect.bisect_right(ends, tokens_read)


def reshaped_world(sources, old_states, world: int, workers: int) -> tuple[list[Loader], list[dict[str, int]]]:
    loaders = [make(sources, r, world, workers) for r in range(world)]
    return loaders, [loader.load_reshaped(old_states) for loader in loaders]


# 3 batches: early in epoch 0. 26: the old ranks already report epoch 1 (equal-rows rule) while one partition's
# reader still has its surplus of epoch 0 to hand out: restarting epoch 1 would skip it. 37: all in epoch 1.
@pytest.mark.parametrize(("batches", "want_epoch", "reported"), [(3, 0, 0), (26, 0, 1), (37, 1, 1)])
def test_one_source_restarts_the_earliest_epoch_on_one_and_on_three_ranks(web, batches, want_epoch, reported):
    root, docs, manifest = web
    sources = [(root, 1.0)]
    states, old_rows = run_old_world(sources, world=2, workers=2, n=batches)
    old = make(sources, 0, 2, 2)
    # the epoch of the earliest token an old partition has not handed out yet, from the rows themselves
    assert want_epoch == min(next_epoch(old.plans[0], r, p, old_rows[r][p].size) for r in range(2) for p in range(2))
    old.load_state_dict(states[0])
    assert old.epoch == reported
    by_shard = shard_documents(docs, manifest)
    for world, workers in ((1, 1), (3, 2)):
        loaders, chosen = reshaped_world(sources, states, world, workers)
        assert chosen == [{"web": want_epoch}] * world
        plan, parts = loaders[0].plans[0], loaders[0].partitions
        n = 6 * parts
        for rank, loader in enumerate(loaders):
            epochs, rows = [], []
            for _ in range(n):
                epochs.append(loader.epoch)
                rows.append(next(loader)[0].numpy())
            assert epochs[0] == want_epoch and epochs == sorted(epochs)
            fresh_loader = make(sources, rank, world, workers)
            skips = [sum(plan.epoch_tokens(e, rank, p) for e in range(want_epoch)) for p in range(parts)]
            per_part = -(-(max(skips) + n * BATCH * SEQ) // (BATCH * SEQ))
            fresh = [next(fresh_loader)[0].numpy() for _ in range(per_part * parts)]
            if want_epoch == 0:  # nothing to re-read before: exactly a fresh loader's batches
                assert all(np.array_equal(a, b) for a, b in zip(rows, fresh))
            for p in range(parts):
                got = np.concatenate(rows[p::parts]).reshape(-1)
                # the partition's documents of the new split, from the first of that epoch, in reading order
                want = framed(reading_order(plan, by_shard, rank, p, range(want_epoch, want_epoch + 4)))
                assert np.array_equal(got, want[: got.size]), (world, rank, p)
                # the same tokens a fresh loader of this world reads from the start of that epoch
                stream = np.concatenate(fresh[p::parts]).reshape(-1)
                assert np.array_equal(got, stream[skips[p] : skips[p] + got.size]), (world, rank, p)
        # every new rank crosses each epoch boundary at the same batch
        crossings = []
        for loader in loaders:
            seen = []
            for _ in range(4 * parts):
                next(loader)
                seen.append(loader.epoch)
            crossings.append(seen)
        assert all(c == crossings[0] for c in crossings)


def test_reshaped_worker_processes_give_the_in_process_batches(web):
    sources = [(web[0], 1.0)]
    states, _ = run_old_world(sources, world=2, workers=2, n=37)
    in_process = make(sources, 1, 3, 2)
    epochs = in_process.load_reshaped(states)
    with make(sources, 1, 3, 2, processes=True) as workers:
        assert workers.load_reshaped(states) == epochs
        for _ in range(8):
            a, b = next(in_process), next(workers)
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def source_of(rows: np.ndarray) -> np.ndarray:
    """0 for a web row (ordinary ids < 200), 1 for a code row; specials (< 9) say nothing."""
    ordinary = rows >= 9
    code = ((rows >= 200) | ~ordinary).all(axis=1)
    assert (code | ((rows < 200) | ~ordinary).all(axis=1)).all(), "a row mixes sources"
    return code.astype(int)


def test_mixture_restarts_each_source_keeps_its_balance_and_counters(web, code):
    sources = [(web[0], 0.7), (code[0], 0.3)]
    states, old_rows = run_old_world(sources, world=2, workers=2, n=50)
    old = make(sources, 0, 2, 2)
    want = {}
    for s, label in enumerate(("web", "code")):
        want[label] = min(next_epoch(old.plans[s], r, p, int((source_of(old_rows[r][p]) == s).sum()) * SEQ)
                          for r in range(2) for p in range(2))
    assert want["web"] != want["code"]  # the sources wrap at different rates: each restarts its own epoch
    old_tokens = {label: sum(old.plans[0].seq_len * pos["rows"] for st in states for ps in st["partition_states"]
                             for pos in ps["sources"][s:s + 1]) for s, label in enumerate(("web", "code"))}
    states[1]["partition_states"][0]["counters"]["skipped_samples/vocab"] = 3  # as if rank 1 had met bad samples

    world, workers = 3, 1
    loaders, chosen = reshaped_world(sources, states, world, workers)
    assert chosen == [want] * world
    assert all(loader.epochs() == want for loader in loaders)
    # counters continue in the sum over ranks: the old ranks' totals go to the new rank 0
    assert loaders[0].stats()["skipped_samples/vocab"] == 3
    assert all("skipped_samples/vocab" not in loader.stats() for loader in loaders[1:])
    # tokens per source, summed over ranks, continue: each of the 3 new partitions starts with the old world's rows
    # shared out evenly (floor: < 1 row lost each) and split by weight (< 1 row off each): within 2 rows each
    for label in ("web", "code"):
        now = sum(loader.stats()[f"tokens/{label}"] for loader in loaders)
        assert abs(now - old_tokens[label]) <= 2 * world * workers * SEQ, label

    by_shard = [shard_documents(d, m) for _, d, m in (web, code)]
    n = 60
    for rank, loader in enumerate(loaders):
        first = [next(loader)[0].numpy() for _ in range(n // 2)]
        resumed = make(sources, rank, world, workers)  # the reshaped position resumes exactly like any other
        resumed.load_state_dict(json.loads(json.dumps(loader.state_dict())))
        rest = [next(loader)[0].numpy() for _ in range(n - n // 2)]
        assert all(np.array_equal(a, next(resumed)[0].numpy()) for a in rest)
        rows = np.concatenate(first + rest)
        picks = source_of(rows)
        # balance right after the restart: the schedule keeps each source within ~2 rows of its share over the
        # 120 rows here (a burst of one source, as from unbalanced counts, would be share 0 or 1)
        assert abs((picks == 0).mean() - 0.7) <= 2.5 / picks.size
        for s, label in enumerate(("web", "code")):
            plan = loader.plans[s]
            got = rows[picks == s].reshape(-1)
            expect = framed(reading_order(plan, by_shard[s], rank, 0, range(want[label], want[label] + 6)))
            assert np.array_equal(got, expect[: got.size]), (rank, label)


def test_state_lists_that_do_not_fit_are_refused(web, code):
    sources = [(web[0], 1.0)]
    states, _ = run_old_world(sources, world=2, workers=1, n=4)
    loader = make(sources, 0, 3, 1)

    def refused(bad, match: str) -> None:
        with pytest.raises(ValueError, match=match):
            loader.load_reshaped(bad)

    refused([], "non-empty list")
    refused(states[0], "non-empty list")
    refused(states[:1], r"ranks \[0\]")
    refused([states[0], states[0]], r"ranks \[0, 0\]")
    refused([{**states[0], "version": 1}, states[1]], "version 1")
    refused([{**s, "seed": SEED + 1} for s in states], "seed=6")
    refused([{**s, "batch_size": BATCH + 1} for s in states], "batch_size")
    refused([{**s, "shuffle_documents": False} for s in states], "shuffle_documents")
    other, _ = run_old_world([(code[0], 1.0)], world=2, workers=1, n=1)
    refused(other, "same data sources")
    damaged = json.loads(json.dumps(states))
    damaged[1]["partition_states"][0]["sources"][0]["shard"] = 99
    refused(damaged, "rank 1, partition 0.*past its shards")
    # the plain loader says where to go when only the layout differs
    with pytest.raises(ValueError, match="load_reshaped"):
        loader.load_state_dict(states[0])
    assert loader.load_reshaped(states) == {"web": 0}  # the originals still load


def test_a_position_past_an_epochs_last_document_counts_as_the_next_epoch(web):
    root, _, manifest = web
    sources = [(root, 1.0)]
    states, _ = run_old_world(sources, world=2, workers=2, n=37)
    assert make(sources, 0, 3, 1).load_reshaped(states) == {"web": 1}
    order = make(sources, 0, 2, 2).plans[0].shards(0, 1, 0)
    last = manifest.shards[order[-1]].samples
    pos = states[1]["partition_states"][0]["sources"][0]
    # rank 1, partition 0 handed out epoch 0's last document whole (a row ended with it): epoch 0 is done
    pos.update(epoch=0, shard=len(order) - 1, member=last, offset=0)
    assert make(sources, 0, 3, 1).load_reshaped(states) == {"web": 1}
    # ... but with that document still to come, or only partly handed out, epoch 0 must be read again
    for member, offset in ((last - 1, 0), (last - 1, 1)):
        pos.update(member=member, offset=offset)
        assert make(sources, 0, 3, 1).load_reshaped(states) == {"web": 0}
