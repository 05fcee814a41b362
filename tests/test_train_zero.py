"""ZeRO stages 1 and 3 (stage 2 is tests/test_train.py's): each trains (loss falls) and resumes bit-exactly.
Both runs ask for train.head_loss=fused: stage 1 trains with it; stage 3 must say it ignores it."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.distributed


def steps_of(out):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.parametrize("stage", [1, 3])
def test_zero_stage_trains_and_resumes_exactly(stage, tiny_data, tmp_path):
    common = ["launch.train", "--config", "launch/configs/tiny.yaml", "--nproc", "2", f"data.path={tiny_data}",
              f"train.zero_stage={stage}", "train.max_steps=16", "train.log_every=4",
              "objectives.mix={mlm: 1.0}", "train.head_loss=fused"]
    full = run_cli([*common, f"out_dir={tmp_path / 'full'}"], check=True)
    assert f"ZeRO stage {stage}" in full.stderr
    ignored = "warning: train.head_loss=fused is ignored under ZeRO-3"
    assert (ignored in full.stderr) == (stage == 3)
    assert f"head loss {'plain' if stage == 3 else 'fused'}" in full.stderr
    run_cli([*common, f"out_dir={tmp_path / 'cut'}", "train.stop_at=8"], check=True)
    resumed = run_cli([*common, f"out_dir={tmp_path / 'cut'}"], check=True)
    assert "resumed from" in resumed.stderr

    a, b = steps_of(tmp_path / "full"), steps_of(tmp_path / "cut")
    losses = [r["loss"]["mlm"] for r in a]
    assert all(math.isfinite(x) for x in losses)
    # From ~ln(1000) = 6.9: the mean of the last 4 steps is clearly below the first 4 (margin >> batch noise).
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.3, losses
    assert [r["step"] for r in b] == list(range(1, 17))
    assert [r["loss"] for r in b] == [r["loss"] for r in a], "resume is not exact"
    run = json.loads((tmp_path / "cut" / "checkpoints" / "step_00000016" / "run.json").read_text())
    assert run["zero_stage"] == stage
