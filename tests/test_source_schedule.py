"""Source-mix schedules (data.schedule): the loader's realised source shares follow the scheduled weights row by
row, before and after a knot; resume is exact across a knot and onto other world sizes; the config names every
problem of a schedule in one error; --dry-run's phase table shows the source shares."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data.loader import Loader
from data.order import MixSchedule
from launch.config import ConfigError, load_config
from launch.train.dry_run import phase_table
from launch.train.schedules import build
from tests.conftest import ROOT
from tests.test_data_loader import config, global_rows

TINY = ROOT / "launch/configs/tiny.yaml"
WINDOW = 100
"""Rows per window of the share check."""
TOLERANCE = 0.03
"""Largest gap between a source's realised share in a window of WINDOW rows and its scheduled weight averaged
over those rows. The rule keeps each source within about one row of its running target (data/order.py), so the
gap is at most about 2 rows / WINDOW = 0.02 in any window, right after a knot included."""


def from_web(ids: np.ndarray) -> np.ndarray:
    """Per row, whether it comes from 'web' (tests/test_data_helpers.web_and_code: web ids < 200, code's >= 200;
    special ids < 9 belong to both)."""
    ordinary = ids >= 9
    web, code = ((ids < 200) | ~ordinary).all(axis=1), ((ids >= 200) | ~ordinary).all(axis=1)
    assert (web | code).all(), "a row mixes sources"
    return web


@pytest.mark.parametrize("between, knots", [
    ("hold", [(400, {"web": 0.2, "code": 0.8})]),
    ("linear", [(300, {"web": 0.7, "code": 0.3}), (700, {"web": 0.1, "code": 0.9})]),
])
def test_realised_shares_follow_the_schedule_in_every_window(web, code, between, knots):
    """A 2-source mix 0.7/0.3 from row 0; a hold knot jumps to 0.2/0.8, a linear pair ramps to 0.1/0.9. In every
    window of WINDOW rows, before, across and after the knots, web's realised share is within TOLERANCE of its
    scheduled weight averaged over the window."""
    paths = {"web": str(web[0]), "code": str(code[0])}
    schedule = [(row, {paths[k]: w for k, w in weights.items()}) for row, weights in knots]
    sources = [(web[0], 0.7), (code[0], 0.3)]
    rows = global_rows(sources, world=1, workers=0, batch=4, steps=250, schedule=schedule,
                       schedule_between=between)
    realised = from_web(rows)
    mix = MixSchedule([0.7, 0.3], [(r, [w["web"], w["code"]]) for r, w in knots], between)
    for start in range(0, len(realised), WINDOW):
        want = np.mean([mix.weights_at(i)[0] for i in range(start, start + WINDOW)])
        got = realised[start : start + WINDOW].mean()
        assert abs(got - want) <= TOLERANCE, (start, got, want)
    last = knots[-1][1]["web"]
    assert realised[knots[-1][0]:].mean() == pytest.approx(last, abs=TOLERANCE)  # the schedule really moved
    assert realised[: knots[0][0]].mean() == pytest.approx(0.7, abs=TOLERANCE)


@pytest.mark.parametrize(("old", "new"), [((2, 0), (3, 1)), ((1, 2), (2, 0))])
def test_resume_across_a_knot_on_another_world_size_is_exact(web, code, old, new):
    """Iterate on one layout up to a knot (and past it, mid-ramp), save, rebuild on another world size and worker
    count, load, compare with the one-rank sequence: the next global rows are exactly the uninterrupted run's."""
    sources = [(web[0], 0.7), (code[0], 0.3)]
    schedule = [(60, {str(web[0]): 0.1, str(code[0]): 0.9}), (180, {str(web[0]): 0.9, str(code[0]): 0.1})]
    kw = {"schedule": schedule, "schedule_between": "linear"}
    want = global_rows(sources, world=1, workers=0, batch=6, steps=45, **kw)
    (old_world, old_workers), (new_world, new_workers) = old, new
    for steps in (10, 17):  # global rows 60 (the first knot) and 102 (on the ramp)
        loaders = [Loader(config(sources, rank=r, world_size=old_world, num_workers=old_workers,
                                 batch_size=6 // old_world, **kw)) for r in range(old_world)]
        for loader in loaders:
            for _ in range(steps):
                next(loader)
        states = [json.loads(json.dumps(loader.state_dict())) for loader in loaders]
        for loader in loaders:
            loader.close()
        got = global_rows(sources, new_world, new_workers, 6 // new_world, steps=20, state=states[-1], **kw)
        assert np.array_equal(got, want[steps * 6 : steps * 6 + 120]), (old, new, steps)


def test_a_changed_schedule_is_refused_on_resume(web, code):
    sources = [(web[0], 0.7), (code[0], 0.3)]
    first = Loader(config(sources, schedule=[(40, {str(code[0]): 1.0})]))
    next(first)
    state = first.state_dict()
    moved = Loader(config(sources, schedule=[(48, {str(code[0]): 1.0})]))
    with pytest.raises(ValueError, match="same data.schedule, train.max_steps and global batch"):
        moved.load_state_dict(state)
    fixed = Loader(config(sources))
    with pytest.raises(ValueError, match="source-mix schedule"):
        fixed.load_state_dict(state)
    older = {k: v for k, v in fixed.state_dict().items() if k != "schedule"}  # saved before schedules existed
    fixed.load_state_dict(older)


def test_bad_knots_are_refused_by_the_loader(web, code):
    sources = [(web[0], 0.7), (code[0], 0.3)]
    with pytest.raises(ValueError, match="not among the sources"):
        Loader(config(sources, schedule=[(10, {"elsewhere": 1.0})]))
    with pytest.raises(ValueError, match="strictly increasing"):
        Loader(config(sources, schedule=[(10, {str(web[0]): 1.0}), (10, {str(code[0]): 1.0})]))
    with pytest.raises(ValueError, match="not all 0"):
        Loader(config(sources, schedule=[(10, {str(web[0]): 0.0})]))


# ----- config ---------------------------------------------------------------------------------------------------
@pytest.fixture
def two_sources(tmp_path):
    for name in ("web", "books"):
        (tmp_path / name).mkdir()
    return str(tmp_path / "web"), str(tmp_path / "books")


def cfg_of(tmp_path, *overrides: str):
    return load_config(TINY, [f"data.path={tmp_path}", *overrides])


def test_every_data_schedule_problem_in_one_error(tmp_path, two_sources):
    web, books = two_sources
    with pytest.raises(ConfigError) as e:
        cfg_of(tmp_path, f"data.sources={{{web}: 0.7, {books}: 0.3}}", "data.shuffle_window_shards=0",
               f"data.schedule=[[0.5, {{{books}: 1}}], [50%, {{{books}s: 1}}], [60%, {{{web}: -1, {books}: 1}}], "
               f"[70%, {{{web}: 0}}], [60%, {{{books}: 1}}]]")
    problems = e.value.problems
    text = "\n".join(problems)
    assert "data.shuffle_window_shards: must be >= 1, got 0" in text
    assert "data.schedule[0]: position 0.5 is ambiguous" in text
    assert f"data.schedule[1]: unknown source '{books}s' (did you mean '{books}'?)" in text
    assert f"data.schedule[2].{web}: weight must be a number >= 0, got -1" in text
    assert "data.schedule[3]: every weight is 0" in text
    assert "data.schedule[4]: position 60% (step 12) does not come after the previous knot's" in text
    assert len(problems) == 5 + 1, text  # schedule problems plus the shuffle window; the knot syntax reported once


def test_a_data_schedule_needs_sources_and_knots_after_step_0(tmp_path, two_sources):
    with pytest.raises(ConfigError) as e:
        cfg_of(tmp_path, "data.schedule={hold: [[50%, {a: 1}]]}")
    assert "data.schedule: moves the weights of data.sources, which is empty" in str(e.value)
    web, books = two_sources
    with pytest.raises(ConfigError) as e:
        cfg_of(tmp_path, f"data.sources={{{web}: 1, {books}: 1}}", f"data.schedule={{ramp: [[5, {{{web}: 1}}]]}}")
    assert "data.schedule: a schedule mapping has one key, linear or hold" in str(e.value)
    with pytest.raises(ConfigError) as e:
        cfg_of(tmp_path, f"data.sources={{{web}: 1, {books}: 1}}", f"data.schedule=[[0, {{{web}: 1}}]]")
    assert "data.schedule[0]: the knot at 0 comes before step 1; data.sources is the mix at step 0" in str(e.value)


def test_the_trainer_gets_knots_in_global_rows_and_the_dry_run_shows_the_phases(tmp_path, two_sources):
    web, books = two_sources
    cfg = cfg_of(tmp_path, f"data.sources={{{web}: 0.7, {books}: 0.3}}",
                 f"data.schedule={{hold: [[90%, {{{web}: 0.3, {books}: 0.7}}]]}}",  # tiny: 20 steps, knot at 18
                 "train.grad_accum=2")
    run = build(cfg)
    # 8 rows per micro-batch x 3 ranks, 2 micro-batches per step: step 18 starts at global row 18 x 48
    assert run.data_knots(world=3) == ([(18 * 48, {web: 0.3, books: 0.7})], "hold")
    assert run.values_at(17) == {f"data/{web}": pytest.approx(0.7), f"data/{books}": pytest.approx(0.3)}
    assert run.values_at(18) == {f"data/{web}": pytest.approx(0.3), f"data/{books}": pytest.approx(0.7)}
    table = phase_table(cfg)
    assert table[0].startswith("== schedules: 2 phase(s) over 20 steps")
    assert table[1].split() == ["steps", "data", web, "data", books]
    assert table[2].split() == ["1-18", "(0%-90%)", "0.700", "0.300"]
    assert table[3].split() == ["19-20", "(90%-100%)", "0.300", "0.700"]
    assert build(cfg_of(tmp_path)).data_knots(8) == ([], "linear")  # no schedule: the loader's fixed mix
