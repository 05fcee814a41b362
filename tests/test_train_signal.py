"""SIGUSR1 to one rank of a running job: every rank checkpoints at the same step boundary and exits 0; launching
again resumes from that checkpoint and the loss curve has no gap and no repeated step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.distributed


def rank_pids(parent: int) -> dict[int, int]:
    ranks = {}
    for child in psutil.Process(parent).children(recursive=True):
        try:
            env = child.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if "RANK" in env and "launch.train" in " ".join(child.cmdline()):
            ranks[int(env["RANK"])] = child.pid
    return ranks


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_to_one_rank_checkpoints_every_rank_and_resumes(sig, tiny_data, tmp_path):
    out = tmp_path / "run"
    args = ["-m", "launch.train", "--config", "launch/configs/tiny.yaml", "--nproc", "2", f"data.path={tiny_data}",
            f"out_dir={out}", "train.max_steps=400", "train.log_every=50"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            metrics = out / "metrics.jsonl"
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
                break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
        ranks = rank_pids(proc.pid)
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[1], sig)  # one rank only: the all-reduce at the step boundary must stop both
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-3000:]
    assert f"{sig.name} received" in output and "stopped at step" in output, output[-3000:]
    tag = (out / "checkpoints" / "latest").read_text().strip()
    stopped = int(tag.removeprefix("step_"))
    assert 5 <= stopped < 400
    states = [json.loads((out / "checkpoints" / tag / f"trainer_state_rank{r}.json").read_text()) for r in (0, 1)]
    assert [s["step"] for s in states] == [stopped, stopped]

    # Resumed for a few steps (stop_at leaves the schedule alone): the curve goes on from the signal's step.
    resumed = run_cli(["launch.train", *args[2:], f"train.stop_at={stopped + 5}"], check=True)
    assert f"resumed from {out / 'checkpoints' / tag} at step {stopped}" in resumed.stderr
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == list(range(1, stopped + 6)), "a gap or a repeated step around the signal"
