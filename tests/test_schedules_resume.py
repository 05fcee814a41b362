"""A scheduled run in a real 2-rank DeepSpeed run: stopped at a knot of its schedules and resumed, it trains to the
uninterrupted run's losses bit for bit, and every step trains with the objective and rate its schedule names."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli, run_whole_and_cut

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_resume_at_a_knot_is_bit_exact(tiny_data, tmp_path):
    # Causal for steps 1-6, then MLM with its rate falling from 0.4 to 0.1 (knots at 6 and 12); two micro-batches
    # per step, so the mixer and the rate move per micro-batch. The cut falls on the knot.
    common = ["launch.train", "--config", "launch/configs/tiny.yaml", "--nproc", "2", f"data.path={tiny_data}",
              "train.precision=fp32", "train.max_steps=12", "train.log_every=3", "train.grad_accum=2",
              "train.micro_batch_size=4", "objectives.mix={causal: 1}",
              "objectives.schedule={hold: [[50%, {mlm: 1}]]}",
              "objectives.params.mlm.rate=[[50%, 0.4], [100%, 0.1]]"]
    whole, cut = run_whole_and_cut(common, tmp_path, stop_at=6, max_steps=12)
    assert [r["loss"] for r in cut] == [r["loss"] for r in whole]  # fp32 CPU, same world: exactly equal
    assert [r["lr"] for r in cut] == [r["lr"] for r in whole]
    assert [r["schedule"] for r in cut] == [r["schedule"] for r in whole]
    # The realised objectives follow the hold schedule: causal only before the knot, MLM only from it.
    assert all(set(r["loss"]) == {"causal"} for r in whole[:6])
    assert all(set(r["loss"]) == {"mlm"} for r in whole[6:])
    rates = [r["schedule"]["mlm.rate"] for r in whole]
    assert rates[:7] == [0.4] * 7 and rates[-1] == pytest.approx(0.4 - 0.3 * 5 / 6)
    assert [r["schedule"]["mix/mlm"] for r in whole] == [0.0] * 6 + [1.0] * 6

    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert summary["objectives"]["causal"]["batches"] == 12 and summary["objectives"]["mlm"]["batches"] == 12
    final = summary["final"]  # what TensorBoard got at the last log step: the scheduled values and realised shares
    assert final["share/mlm"] == 1.0 and final["share/causal"] == 0.0
    assert final["schedule/mlm.rate"] == pytest.approx(rates[-1])


def _steps(out_dir) -> list[dict]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


def test_batch_warmup_accumulates_and_resumes_exactly(tiny_data, tmp_path):
    """train.batch_warmup: one micro-batch per step for steps 1-3, two from step 4 (the engine is built for two).
    Steps 1-3 train exactly as a run of one micro-batch per step; stopped at the knot and resumed, the run equals
    the uninterrupted one bit for bit."""
    base = ["launch.train", "--config", "launch/configs/tiny.yaml", "--nproc", "2", f"data.path={tiny_data}",
            "train.precision=fp32", "train.max_steps=6", "train.log_every=3", "train.micro_batch_size=4"]
    warm = [*base, "train.grad_accum=2", "train.batch_warmup={hold: [[0, 1], [3, 2]]}"]
    whole, cut = run_whole_and_cut(warm, tmp_path, stop_at=3, max_steps=6)
    run_cli([*base, "train.grad_accum=1", "train.stop_at=3", f"out_dir={tmp_path / 'one'}"], check=True)

    assert [r["loss"] for r in cut] == [r["loss"] for r in whole]
    assert [r["schedule"]["train.grad_accum"] for r in whole] == [1, 1, 1, 2, 2, 2]
    assert [r["loss"] for r in whole[:3]] == [r["loss"] for r in _steps(tmp_path / "one")]
    summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert summary["tokens_seen"] == (3 * 1 + 3 * 2) * 4 * 2 * 64  # micro-batches x rows x ranks x seq_len
