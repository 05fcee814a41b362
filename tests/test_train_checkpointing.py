"""Activation checkpointing in a real 2-rank DeepSpeed run: ZeRO-3 (which gathers each block's parameters again
for the recomputation) trains to the same per-step losses with train.activation_checkpointing=full as without."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def test_zero3_full_checkpointing_gives_the_same_losses(tiny_data, tmp_path):
    common = ["launch.train", "--config", "launch/configs/tiny.yaml", "--nproc", "2", f"data.path={tiny_data}",
              "train.zero_stage=3", "train.precision=fp32", "train.max_steps=4", "train.log_every=1",
              "objectives.mix={mlm: 0.5, causal: 0.5}"]
    run_cli([*common, f"out_dir={tmp_path / 'plain'}"], check=True)
    ckpt = run_cli([*common, f"out_dir={tmp_path / 'ckpt'}", "train.activation_checkpointing=full"], check=True)
    assert "activation checkpointing: blocks i with i % 1 == 0 are recomputed" in ckpt.stderr

    plain, recomputed = losses(tmp_path / "plain"), losses(tmp_path / "ckpt")
    assert [s for s, _ in plain] == [1, 2, 3, 4]
    # fp32 on CPU, the same kernels in the same order: recomputation reproduces every activation bit for bit.
    assert recomputed == plain
