"""On a GPU, training follows the CPU fp32 loss curve of the same run: in fp32 within FP32_TOL at every step, and in
bf16, with the shipped defaults and with the speed options on (FlexAttention, compiled layers, the fused head
loss), within BF16_TOL. The reference is the CPU fp32 run of the same config on the same data, trained by this
module first: data order, init, objective per step and masks are all functions of the seed and the step, so the
two runs see the same batches.

Tolerances, absolute, in nats of each step's per-objective loss over STEPS steps:
- fp32: both sides compute in fp32 and only the kernels' summation order differs (~1e-6 relative per op);
  training amplifies that step by step, so the first steps agree to a few 1e-4 and the bound leaves an order of
  magnitude for the growth.
- bf16: 8 bits of mantissa in the matmuls put the ~7-nat loss of a fresh model ~0.01-0.02 off, and the two
  trajectories drift apart slowly. 0.15 nats still flags a real fault (a wrong mask, a missing scale, a kernel
  that lets documents see each other moves the loss by far more) without failing on rounding.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli

STEPS = 40
FP32_TOL = 5e-3
BF16_TOL = 0.15
OVERRIDES = [
    f"train.max_steps={STEPS}", "train.log_every=20", "train.warmup_steps=10", "train.lr=1e-3",
    "train.micro_batch_size=16", "train.grad_accum=1", "train.seed=11", "data.seq_len=128", "data.num_workers=1",
    "model.hidden_size=256", "model.num_layers=4", "model.num_heads=4", "model.intermediate_size=384",
    "model.max_position_embeddings=512",
]
"""A small run on top of launch/configs/tiny.yaml: 4 layers of width 256, 16 x 128 tokens per step."""
SPEED_OPTIONS = ["train.attention_backend=flex", "train.compile=true", "train.head_loss=fused"]

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="compares a CUDA run with the CPU run; no GPU here")


def train_curve(data: Path, out: Path, env: dict[str, str], extra: list[str]) -> dict[int, dict[str, float]]:
    """One single-rank run; {step: {objective: loss}} from its metrics.jsonl."""
    proc = run_cli(["launch.train", "--config", "launch/configs/tiny.yaml", f"data.path={data}", f"out_dir={out}",
                    *OVERRIDES, *extra], timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if isinstance(r.get("loss"), dict)}


@pytest.fixture(scope="module")
def cpu_reference(tiny_data, tmp_path_factory) -> dict[int, dict[str, float]]:
    env = {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(min(8, os.cpu_count() or 1))}
    return train_curve(tiny_data, tmp_path_factory.mktemp("curve") / "cpu", env, ["train.precision=fp32"])


@CUDA
@pytest.mark.slow
@pytest.mark.parametrize("precision, options, tol", [("fp32", [], FP32_TOL), ("bf16", [], BF16_TOL),
                                                     ("bf16", SPEED_OPTIONS, BF16_TOL)],
                         ids=["fp32", "bf16", "bf16-flex-compile-fused"])
def test_a_gpu_run_follows_the_cpu_fp32_curve(cpu_reference, tiny_data, tmp_path, precision, options, tol):
    run = train_curve(tiny_data, tmp_path / "gpu", {"DS_ACCELERATOR": "cuda"}, [f"train.precision={precision}",
                                                                                  *options])
    assert sorted(run) == sorted(cpu_reference) == list(range(1, STEPS + 1))
    diffs = {}
    for step, losses in run.items():
        assert set(losses) == set(cpu_reference[step]), f"step {step}: another objective than the CPU run's"
        diffs.update({(step, k): abs(v - cpu_reference[step][k]) for k, v in losses.items()})
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= tol, f"step {worst[0]} {worst[1]}: {diffs[worst]:.2e} nats from the CPU fp32 run"
