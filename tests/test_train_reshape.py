"""Resuming on a different world size: ZeRO-3 from 1 rank to 2 (universal checkpoint); a ZeRO-2 run reshaped
2 -> 3 -> 1 ranks, with the global batch unchanged and another data.num_workers each time, trains on the same rows,
and so has the same loss curve, weights and loader position, as a run that never changed."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from tests.conftest import run_cli

pytestmark = pytest.mark.distributed


def steps_of(out):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize("stage, before, after", [(3, 1, 2)])
def test_resume_on_another_world_size(stage, before, after, tiny_data, tmp_path):
    out = tmp_path / "run"
    common = ["launch.train", "--config", "launch/configs/tiny.yaml", f"data.path={tiny_data}", f"out_dir={out}",
              f"train.zero_stage={stage}", "train.max_steps=16", "train.log_every=4", "objectives.mix={mlm: 1.0}"]
    run_cli([*common, "--nproc", str(before), "train.stop_at=8"], check=True)
    proc = run_cli([*common, "--nproc", str(after)], check=True)
    assert f"on {after} ranks (written by {before})" in proc.stderr, proc.stderr[-3000:]
    steps = steps_of(out)
    assert [r["step"] for r in steps] == list(range(1, 17)), "a gap or a repeated step"
    losses = [r["loss"]["mlm"] for r in steps]
    assert all(math.isfinite(x) for x in losses)
    # The optimizer state carried over: training goes on from where it was instead of restarting from scratch
    # (a fresh init would be back near ln(1000) = 6.9). The global batch halves with the world, so compare means.
    assert sum(losses[8:12]) / 4 < sum(losses[:4]) / 4 - 0.3, losses
    run = json.loads((out / "checkpoints" / "step_00000016" / "run.json").read_text())
    assert run["world_size"] == after
    states = [json.loads((out / "checkpoints" / "step_00000016" / f"trainer_state_rank{r}.json").read_text())
              for r in range(after)]
    assert all(s["step"] == 16 for s in states)


def stream_state(out, step: int, rank: int) -> dict:
    state = json.loads((out / "checkpoints" / f"step_{step:08d}" / f"trainer_state_rank{rank}.json").read_text())
    return {k: v for k, v in state["stream"].items() if k != "layout"}


def printed_losses(*procs) -> dict[int, float]:
    """Step -> the loss of the progress line (reduced over every rank and micro-batch of the step; 3 decimals)."""
    found = {}
    for proc in procs:
        for m in re.finditer(r"step +(\d+)/\d+ \| loss causal ([0-9.]+)", proc.stdout + proc.stderr):
            found[int(m[1])] = float(m[2])
    return found


@pytest.mark.slow
def test_a_run_reshaped_2_3_1_has_the_loss_curve_of_an_unreshaped_run(tiny_data, tmp_path):
    """Global batch 12 rows throughout: 2 ranks x accum 3, then 3 ranks x accum 2, then 1 rank x accum 6 (and
    another data.num_workers each time). The loader deals the same global rows to each optimizer step whatever
    the split, so with an objective that draws no randomness (causal) every step's loss over the global batch,
    and the weights at the end, are the uninterrupted run's up to fp32 reduction order."""
    from launch.export.main import consolidate

    common = ["launch.train", "--config", "launch/configs/tiny.yaml", f"data.path={tiny_data}",
              "train.micro_batch_size=2", "train.max_steps=9", "train.log_every=1", "train.checkpoint_every=3",
              "objectives.mix={causal: 1.0}"]
    plain = tmp_path / "plain"
    want = printed_losses(run_cli([*common, f"out_dir={plain}", "--nproc", "2", "train.grad_accum=3",
                                   "data.num_workers=1"], check=True))
    out = tmp_path / "reshaped"
    run = [*common, f"out_dir={out}"]
    first = run_cli([*run, "--nproc", "2", "train.grad_accum=3", "data.num_workers=1", "train.stop_at=3"],
                    check=True)
    second = run_cli([*run, "--nproc", "3", "train.grad_accum=2", "data.num_workers=0", "train.stop_at=6"],
                     check=True)
    assert "on 3 ranks (written by 2): the data continues at global row 36" in second.stderr, second.stderr[-3000:]
    third = run_cli([*run, "--nproc", "1", "train.grad_accum=6", "data.num_workers=2"], check=True)
    assert "on 1 ranks (written by 3): the data continues at global row 72" in third.stderr, third.stderr[-3000:]
    got = printed_losses(first, second, third)
    assert sorted(got) == sorted(want) == list(range(1, 10))
    for step, loss in want.items():
        assert abs(got[step] - loss) <= 0.0015, (step, want, got)  # printed to 3 decimals: one rounding step
    assert want[9] < want[1] - 0.2  # the curve moves: equal curves are not two flat lines
    # the weights after the last step agree to fp32 reduction order
    stage = json.loads((out / "checkpoints" / "step_00000009" / "run.json").read_text())["zero_stage"]
    a, b = (consolidate(run_dir / "checkpoints", "step_00000009", stage) for run_dir in (plain, out))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-6), key
    # and the loader stands where the uninterrupted run's does: the same global row and source position
    assert stream_state(out, 9, 0) == stream_state(plain, 9, 0) == stream_state(plain, 9, 1)
    assert stream_state(out, 9, 0)["rows"] == 9 * 12
    layout = json.loads((out / "checkpoints" / "step_00000009" / "trainer_state_rank0.json").read_text())
    assert layout["stream"]["layout"]["num_workers"] == 2  # the state records the layout that wrote it

