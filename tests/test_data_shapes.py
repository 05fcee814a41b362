"""Sequence-length phases in the loader (LoaderConfig.shapes): at a knot the rows get the new length and the
batches the new size, each source's packing goes on from where it stands (no document lost or repeated), and
the state resumes across the switch on any layout."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data.loader import Loader, LoaderConfig
from tests.data_helpers import per_rank_batches

SEQ, BATCH = 40, 4
KNOT = 8 * BATCH  # global row of the switch: after 8 steps of a world of 1 (4 of a world of 2, batch 4)
LONG, LONG_BATCH = 100, 2


def config(sources, **kw) -> LoaderConfig:
    kw = {"seq_len": SEQ, "batch_size": BATCH, "seed": 5, **kw}
    return LoaderConfig([(str(p), w) for p, w in sources], **kw)


def rank_batches(sources, world: int, steps: int, batch: int = BATCH, long_batch: int = LONG_BATCH, state=None,
                 **kw) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """Per global step, every rank's batch in rank order."""
    shapes = [(KNOT, LONG, long_batch)]
    got = per_rank_batches([config(sources, rank=r, world_size=world, batch_size=batch, shapes=shapes, **kw)
                            for r in range(world)], steps, state)
    return [[got[r][k] for r in range(world)] for k in range(steps)]


def flat(steps) -> np.ndarray:
    return np.concatenate([ids.reshape(-1) for step in steps for ids, _ in step])


def test_rows_switch_length_without_losing_or_repeating_a_token(web):
    root = web[0]
    phased = rank_batches([(root, 1.0)], world=2, steps=12, batch=BATCH // 2, long_batch=1)
    shapes = [{ids.shape for ids, _ in step} for step in phased]
    assert shapes == [{(2, SEQ)}] * 8 + [{(1, LONG)}] * 4  # global row 32 = 8 steps of 2 ranks x 2 rows
    # One source: the concatenated rows are one cut of the framed documents' stream, whatever the lengths.
    with Loader(config([(root, 1.0)], world_size=1, batch_size=1, seq_len=1)) as plain:
        tokens = flat(phased)
        want = np.concatenate([next(plain)[0].numpy().reshape(-1) for _ in range(tokens.size)])
    assert np.array_equal(tokens, want)


def test_each_source_stream_is_cut_the_same_with_two_sources(web, code):
    sources = [(web[0], 0.7), (code[0], 0.3)]
    phased = rank_batches(sources, world=1, steps=12)
    with Loader(config(sources, world_size=1)) as plain:
        before = [next(plain)[0].numpy() for _ in range(8)]
    # Before the knot, the phased run is the plain one; every source's concatenated rows then continue its
    # stream at the new length (checked on the first long rows: they must not repeat any row before the knot).
    assert all(np.array_equal(step[0][0], want) for step, want in zip(phased[:8], before, strict=True))
    long_rows = [row for step in phased[8:] for row in step[0][0]]
    assert all(row.shape == (LONG,) for row in long_rows)
    short = {tuple(row) for b in before for row in b}
    assert not any(tuple(row[:SEQ]) in short for row in long_rows)


@pytest.mark.parametrize(("workers", "processes"), [(0, False), (2, True)])
def test_layouts_and_workers_give_the_same_global_rows(web, code, workers, processes):
    sources = [(web[0], 0.7), (code[0], 0.3)]
    want = rank_batches(sources, world=1, steps=12)
    got = rank_batches(sources, world=2, steps=12, batch=BATCH // 2, long_batch=LONG_BATCH // 2,
                       num_workers=workers, worker_processes=processes)
    assert np.array_equal(flat(got), flat(want))


def test_state_resumes_across_the_switch_on_another_layout_and_counts_tokens(web, code):
    sources = [(web[0], 0.7), (code[0], 0.3)]
    want = rank_batches(sources, world=1, steps=14)
    for steps in (6, 8, 10):  # before, at and after the knot
        with Loader(config(sources, world_size=1, shapes=[(KNOT, LONG, LONG_BATCH)])) as first:
            for _ in range(steps):
                next(first)
            state = json.loads(json.dumps(first.state_dict()))
            tokens = sum(v for k, v in first.stats().items() if k.startswith("tokens/"))
        rows_before = min(steps, 8) * BATCH
        assert tokens == rows_before * SEQ + (steps - min(steps, 8)) * LONG_BATCH * LONG
        got = rank_batches(sources, world=2, steps=4, batch=BATCH // 2, long_batch=LONG_BATCH // 2, state=state)
        assert np.array_equal(flat(got), flat(want[steps:steps + 4])), steps


def test_a_changed_knot_is_refused_on_resume_and_a_misplaced_one_at_once(web):
    root = web[0]
    with Loader(config([(root, 1.0)], shapes=[(KNOT, LONG, LONG_BATCH)])) as first:
        next(first)
        state = first.state_dict()
    with Loader(config([(root, 1.0)], shapes=[(KNOT, 2 * LONG, LONG_BATCH)])) as other, \
            pytest.raises(ValueError, match=r"sequence-length phases starting at global rows \[\[32, 100\]\]"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="whole number of global steps of 8 rows"):
        config([(root, 1.0)], world_size=2, shapes=[(KNOT + 4, LONG, 1)])
    with pytest.raises(ValueError, match="must be >= 1"):
        config([(root, 1.0)], shapes=[(KNOT, 0, 1)])
