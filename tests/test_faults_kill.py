"""Kills: a rank SIGKILLed mid-run, and rank 0 SIGKILLed at several points inside a checkpoint save.

Each time every process of the job must go away on its own (no hang), `latest` must still name a complete
checkpoint, and a plain restart must finish with final weights equal to an uninterrupted run's. The tolerance is 0:
CPU fp32 with the same world size and reduction order is deterministic, and the loader resumes at its exact position.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from launch.train.checkpoint import partial_tags, read_latest
from launch.train.faults import FAULT_POINTS
from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.distributed

MAX_STEPS, EVERY = 40, 10
JOB_EXIT_S = 60  # the bound for every process of a failed job to be gone


def common(data: Path, out: Path) -> list[str]:
    return ["launch.train", "--config", "launch/configs/tiny.yaml", "--nproc", "2", f"data.path={data}",
            f"out_dir={out}", f"train.max_steps={MAX_STEPS}", f"train.checkpoint_every={EVERY}", "train.log_every=5"]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    from launch.train.checkpoint import consolidate

    ckpts = out / "checkpoints"
    tag = read_latest(ckpts)
    assert tag == f"step_{MAX_STEPS:08d}", tag
    return consolidate(ckpts, tag, zero_stage=2)


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs by {(a[k] - b[k]).abs().max().item()}"


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("uninterrupted")
    run_cli(common(tiny_data, out), check=True)
    return final_weights(out)


def last_logged_step(out: Path) -> int:
    f = out / "metrics.jsonl"
    if not f.is_file():
        return 0
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in f.read_text().splitlines()
             if line.startswith('{"step": ')]
    return max(steps, default=0)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; only its parent has not collected it yet.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def sigkill_rank1_mid_run(data: Path, out: Path, pids: Path) -> tuple[subprocess.Popen, str, float, list[int]]:
    """Start the job, SIGKILL rank 1 a few steps after the first checkpoint (inside a training step: steps run
    back to back), and wait for the job to end. Returns (job, stderr, seconds from the kill to the end, pids)."""
    pids.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1",
           "CLOZE_FAULT_PID_DIR": str(pids)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    job = subprocess.Popen([sys.executable, "-m", *common(data, out)], cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while last_logged_step(out) < EVERY + 3:
            assert job.poll() is None and time.monotonic() < deadline, "the run ended or stalled before the kill"
            time.sleep(0.005)
        ranks = [int((pids / f"rank{r}.pid").read_text()) for r in (0, 1)]
        os.kill(ranks[1], signal.SIGKILL)
        killed_at = time.monotonic()
        _, stderr = job.communicate(timeout=JOB_EXIT_S)
        return job, stderr, time.monotonic() - killed_at, ranks
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()


def test_sigkill_mid_step_then_kills_inside_saves_lose_nothing(tiny_data, tmp_path, reference):
    """One run, interrupted four times: rank 1 SIGKILLed mid-step, then rank 0 SIGKILLed inside a checkpoint save at
    each point in turn (the last inside the final save). Each restart resumes from `latest`; the end is exact."""
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    job, stderr, took, ranks = sigkill_rank1_mid_run(tiny_data, out, tmp_path / "pids")
    assert job.returncode != 0
    assert took < JOB_EXIT_S and not any(alive(p) for p in ranks), "a process of the job outlived it"
    assert "rank 1 stopped (signal SIGKILL)" in stderr, stderr[-3000:]  # the launcher names the rank killed
    assert "Traceback" not in stderr, stderr[-3000:]  # one line per rank, not the launcher's traceback
    assert EVERY < last_logged_step(out) < 2 * EVERY, "the kill came too late to test anything"
    assert read_latest(ckpts) == f"step_{EVERY:08d}"

    assert len(FAULT_POINTS) == 3 and MAX_STEPS == 4 * EVERY  # the save kills land at steps 20, 30 and 40
    for i, point in enumerate(FAULT_POINTS):
        good, broken = f"step_{(i + 1) * EVERY:08d}", f"step_{(i + 2) * EVERY:08d}"
        proc = run_cli(common(tiny_data, out), env={"CLOZE_FAULT_CKPT_KILL": f"{point}:{(i + 2) * EVERY}"},
                       timeout=2 * JOB_EXIT_S)
        assert proc.returncode != 0
        assert f"resumed from {ckpts / f'step_{max(i, 1) * EVERY:08d}'}" in proc.stderr, proc.stderr[-3000:]
        assert f"fault injection: SIGKILL rank 0 at {point}" in proc.stderr, proc.stderr[-3000:]
        if i:
            assert f"ignoring incomplete checkpoint(s) step_{(i + 1) * EVERY:08d}" in proc.stderr
        assert read_latest(ckpts) == good, f"{point}: latest moved to a checkpoint that was never finished"
        assert partial_tags(ckpts, good) == [broken], (point, sorted(p.name for p in ckpts.iterdir()))

    proc = run_cli(common(tiny_data, out), check=True)
    assert f"ignoring incomplete checkpoint(s) step_{MAX_STEPS:08d}" in proc.stderr
    assert f"resumed from {ckpts / f'step_{MAX_STEPS - EVERY:08d}'}" in proc.stderr
    assert partial_tags(ckpts, read_latest(ckpts)) == []
    assert_same_weights(final_weights(out), reference)


def test_prune_removes_incomplete_leftovers_but_keeps_a_rolled_back_checkpoint(tmp_path, capsys):
    """`latest` moved back by hand must not cost the newer complete checkpoint; a half-written one goes."""
    import json

    from launch.train.checkpoint import prune

    for step, complete in ((10, True), (20, False), (30, True)):
        d = tmp_path / f"step_{step:08d}"
        d.mkdir()
        (d / "mp_rank_00_model_states.pt").write_bytes(b"x")
        if complete:
            (d / "run.json").write_text(json.dumps({"world_size": 1}))
            (d / "trainer_state_rank0.json").write_text("{}")
    (tmp_path / "latest").write_text("step_00000010")
    assert read_latest(tmp_path) == "step_00000010"
    assert "ignoring incomplete checkpoint(s) step_00000020, step_00000030" in capsys.readouterr().err
    prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["step_00000010", "step_00000030"]
