"""A source-mix schedule in a real 2-rank DeepSpeed run: stopped at its knot and resumed, the run trains to the
uninterrupted run's losses bit for bit, and the rows taken from each source are the ones the schedule gives."""

from __future__ import annotations

import json
import shutil

import pytest

from data.order import MixSchedule
from tests.conftest import run_cli

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def steps_of(out) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


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
    run_cli([*common, f"out_dir={tmp_path / 'whole'}"], check=True)
    first = run_cli([*common, f"out_dir={tmp_path / 'cut'}", "train.stop_at=4"], check=True)
    assert "stopped at step 4" in first.stderr
    second = run_cli([*common, f"out_dir={tmp_path / 'cut'}"], check=True)
    assert "resumed from" in second.stderr

    whole, cut = steps_of(tmp_path / "whole"), steps_of(tmp_path / "cut")
    assert [r["step"] for r in cut] == list(range(1, 9)), "a gap or a repeated step in the resumed curve"
    assert [r["loss"] for r in cut] == [r["loss"] for r in whole]  # fp32 CPU, same world: exactly equal
    assert [r["schedule"][f"data/{books}"] for r in whole] == [0.25] * 4 + [0.75] * 4

    # The rows each source gave: what the mixture rule gives for the schedule (rank 0's counts cover all ranks).
    counts = [0, 0]
    MixSchedule([0.75, 0.25], [(32, [0.25, 0.75])], "hold").assign(counts, 64)
    assert counts == [32, 32]
    for run in ("whole", "cut"):
        data = json.loads((tmp_path / run / "summary.json").read_text())["data"]
        assert (data["tokens/data"], data["tokens/books"]) == (32 * 64, 32 * 64), (run, data)
