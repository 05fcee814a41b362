"""Loader.load_reshaped: a run continued on another world size / number of workers / batch size picks up at the
exact next global row. Over a run reshaped 2 -> 3 -> 1 ranks every document of the epoch is handed out exactly
once; states that do not record one position are refused with a clear error."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from data.loader import Loader, LoaderConfig
from tests.data_helpers import shard_documents

SEQ, SEED = 40, 5


def make(sources, rank: int, world: int, workers: int, batch: int, **kw) -> Loader:
    return Loader(LoaderConfig([(str(p), w) for p, w in sources], SEQ, batch, rank=rank, world_size=world,
                               seed=SEED, num_workers=workers, **kw))


def run_world(sources, world: int, workers: int, batch: int, steps: int, old_states=None):
    """Every rank of a world for `steps` batches (resumed from every old rank's state, if given): the rows in
    global order, and every rank's JSON round-tripped state."""
    loaders = [make(sources, r, world, workers, batch) for r in range(world)]
    try:
        if old_states is not None:
            for loader in loaders:
                loader.load_reshaped(old_states)
        got = [[next(loader)[0].numpy() for _ in range(steps)] for loader in loaders]
        states = [json.loads(json.dumps(loader.state_dict())) for loader in loaders]
    finally:
        for loader in loaders:
            loader.close()
    return np.concatenate([got[r][k] for k in range(steps) for r in range(world)]), states


def documents_in(tokens: np.ndarray) -> list[tuple[int, ...]]:
    """The framed documents ([CLS]=2 ... [SEP]=3) in a token stream that starts at a document's start; an
    unfinished last one is left out."""
    starts = np.flatnonzero(tokens == 2)
    ends = np.flatnonzero(tokens == 3)
    return [tuple(tokens[a + 1 : b]) for a, b in zip(starts, ends, strict=False)]


def test_a_run_reshaped_2_3_1_reads_every_document_of_the_epoch_once(web):
    root, docs, manifest = web
    sources = [(root, 1.0)]
    keys = {tuple(d): (shard, i) for shard, members in enumerate(shard_documents(docs, manifest))
            for i, d in enumerate(members)}
    assert len(keys) == len(docs)  # every document is told apart by its ids: its key
    epoch_tokens = manifest.tokens + 2 * manifest.documents
    global_batch = 6  # 2 ranks x 3 rows, 3 x 2, 1 x 6
    steps = -(-epoch_tokens // (SEQ * global_batch))  # global steps covering the epoch
    first, mid = steps // 3, steps // 3  # each phase stops mid-epoch (and, here, mid-document)
    rows_a, states_a = run_world(sources, world=2, workers=2, batch=3, steps=first)
    rows_b, states_b = run_world(sources, world=3, workers=0, batch=2, steps=mid, old_states=states_a)
    rows_c, states_c = run_world(sources, world=1, workers=3, batch=6, steps=steps - first - mid,
                                 old_states=states_b)
    assert any(p["offset"] > 0 for s in (states_a[0], states_b[0]) for p in s["positions"])
    assert states_c[0]["rows"] == steps * global_batch
    tokens = np.concatenate([rows_a, rows_b, rows_c]).reshape(-1)[:epoch_tokens]
    seen = Counter(keys[d] for d in documents_in(tokens))
    assert set(seen.values()) == {1} and set(seen) == set(keys.values()), "a document missed or read twice"
    # and the rows are exactly those of a run that never changed its layout
    unchanged, _ = run_world(sources, world=1, workers=0, batch=6, steps=steps)
    assert np.array_equal(np.concatenate([rows_a, rows_b, rows_c]), unchanged)


def test_mixture_and_counters_continue(web, code):
    sources = [(web[0], 0.7), (code[0], 0.3)]
    rows, states = run_world(sources, world=2, workers=1, batch=2, steps=30)
    loaders = [make(sources, r, 3, 0, 2) for r in range(3)]
    epochs = [loader.load_reshaped(states) for loader in loaders]
    assert epochs == [loaders[0].epochs()] * 3 and epochs[0] == {"web": states[0]["positions"][0]["epoch"],
                                                                "code": states[0]["positions"][1]["epoch"]}
    # the run's counts come from rank 0 (every rank reads the same sequence): tokens per source continue
    old = Loader(LoaderConfig([(str(p), w) for p, w in sources], SEQ, 2, rank=0, world_size=2, seed=SEED))
    old.load_state_dict(states[0])
    assert loaders[0].stats() == old.stats() and loaders[0].stats()["tokens/web"] > 0
    assert all("tokens/web" not in loader.stats() for loader in loaders[1:])


def test_state_lists_that_do_not_record_one_position_are_refused(web):
    sources = [(web[0], 1.0)]
    _, states = run_world(sources, world=2, workers=0, batch=2, steps=4)
    loader = make(sources, 0, 3, 0, 2)

    def refused(bad, match: str) -> None:
        with pytest.raises(ValueError, match=match):
            loader.load_reshaped(bad)

    refused([], "non-empty list")
    refused(states[0], "non-empty list")
    refused([states[0], "x"], "state_dict")
    _, later = run_world(sources, world=2, workers=0, batch=2, steps=5)
    refused([states[0], later[1]], "state 1 differs from state 0 in positions, rows")
    refused([{**s, "seed": SEED + 1} for s in states], "seed=6")
    refused([{**s, "version": 2} for s in states], "older cloze")
    assert loader.load_reshaped(states) == {"web": 0}  # the originals still load
    assert loader.rows() == 4 * 2 * 2
