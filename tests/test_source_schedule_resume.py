"""A source-mix schedule in a real 2-rank DeepSpeed run: stopped at its knot and resumed, the run trains to the
uninterrupted run's losses bit for bit, and the rows taken from each source are the ones the schedule gives."""

from __future__ import annotations

import json
import shutil

import pytest

from data.order import MixSchedule
from tests.conftest import run_whole_and_cut

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_resume_at_a_source_knot_is_bit_exact(tiny_data, tmp_path):
    # Two sources (a copy of the tiny corpus under another name), 0.75/0.25 for steps 1-4, then 0.25/0.75 (a hold
    # knot at 50% of 8 steps); 4 rows per rank and step, 2 ranks: the knot is global row 32. The cut falls on it.
    books = tmp_path / "books"
    shutil.copytree(tiny_data, books)
    common = ["launch.train", "--config", "launch/configs/tiny.yaml", "--nproc", "2", f"data.path={tiny_data}",
              f"data.sources={{{tiny_data}: 0.75, {books}: 0.25}}",
              f"data.schedule={{hold: [[50%, {{{tiny_data}: 0.25, {books}: 0.75}}]]}}",
              "train.precision=fp32", "train.max_steps=8", "train.log_every=2", "train.micro_batch_size=4",
              "objectives.mix={mlm: 1}"]
    whole, cut = run_whole_and_cut(common, tmp_path, stop_at=4, max_steps=8)
    assert [r["loss"] for r in cut] == [r["loss"] for r in whole]  # fp32 CPU, same world: exactly equal
    assert [r["schedule"][f"data/{books}"] for r in whole] == [0.25] * 4 + [0.75] * 4

    # The rows each source gave: what the mixture rule gives for the schedule (rank 0's counts cover all ranks).
    counts = [0, 0]
    MixSchedule([0.75, 0.25], [(32, [0.25, 0.75])], "hold").assign(counts, 64)
    assert counts == [32, 32]
    for run in ("whole", "cut"):
        data = json.loads((tmp_path / run / "summary.json").read_text())["data"]
        assert (data["tokens/data"], data["tokens/books"]) == (32 * 64, 32 * 64), (run, data)
