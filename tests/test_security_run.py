"""The run directory and its checkpoints are not trusted on resume, and two runs never share one out_dir:

- a pickle planted in a checkpoint does not run when the world size changes (the universal conversion reads every
  file under the restricted unpickler, as the same-world resume does);
- a second run on an out_dir a live run holds is refused, naming the holder; once the holder is gone (SIGKILLed,
  as when Slurm requeues a job) the same Slurm job starts again and resumes;
- a checkpoint is not resumed on other data (another corpus, another tokenizer); settings that may change on
  resume (train.max_steps here) are printed, one line per key, and the run goes on.
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
import torch

from tests.conftest import ROOT, run_cli
from tests.data_helpers import dataset_dir, random_docs
from tests.test_security import Payload

pytestmark = pytest.mark.distributed

CONFIG = ["--config", "launch/configs/tiny.yaml"]


def error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error")]


@pytest.fixture(scope="module")
def two_rank_checkpoint(tiny_data, tmp_path_factory):
    """A ZeRO-2 run on 2 ranks stopped at step 2 of 4: its checkpoint has one optimizer-states file per rank."""
    out = tmp_path_factory.mktemp("two_ranks") / "run"
    run_cli(["launch.train", *CONFIG, "--nproc", "2", f"data.path={tiny_data}", f"out_dir={out}",
             "train.zero_stage=2", "train.max_steps=4", "train.stop_at=2"], check=True)
    return out


@pytest.mark.parametrize("plant", ["torch_save", "plain_pickle"])
def test_pickle_payload_does_not_run_on_a_world_size_change(two_rank_checkpoint, tiny_data, tmp_path, plant):
    out, marker = tmp_path / "run", tmp_path / "PWNED"
    shutil.copytree(two_rank_checkpoint, out)
    tag_dir = out / "checkpoints" / "step_00000002"
    optim = sorted(tag_dir.glob("*optim_states.pt"))
    assert len(optim) == 2, sorted(p.name for p in tag_dir.iterdir())
    target = optim[1]  # rank 1's: a resume on one rank would never open it itself; the conversion reads it
    if plant == "torch_save":  # a well-formed torch file whose pickle calls open()
        torch.save({"optimizer_state_dict": Payload(marker)}, target)
    else:
        target.write_bytes(pickle.dumps({"optimizer_state_dict": Payload(marker)}))
    proc = run_cli(["launch.train", *CONFIG, "--nproc", "1", f"data.path={tiny_data}", f"out_dir={out}",
                    "train.zero_stage=2", "train.max_steps=4"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert not marker.exists(), "the payload ran"
    errors = error_lines(proc.stderr)
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "refusing to load checkpoint" in errors[0] and "tampered" in errors[0], errors[0]
    assert str(target) in errors[0], errors[0]
    assert not (out / "checkpoints" / "universal" / "step_00000002").exists()


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_the_conversion_itself_reads_under_the_restricted_unpickler(two_rank_checkpoint, tmp_path):
    """The converter run by a world-size change, given a tampered file directly (as if it changed after the check
    that precedes the conversion): the restricted unpickler refuses it, exit 3 and one line."""
    out, marker = tmp_path / "run", tmp_path / "PWNED"
    shutil.copytree(two_rank_checkpoint, out)
    tag_dir = out / "checkpoints" / "step_00000002"
    torch.save({"optimizer_state_dict": Payload(marker)}, sorted(tag_dir.glob("*optim_states.pt"))[1])
    proc = run_cli(["launch.train.resume", "--input_folder", str(tag_dir),
                    "--output_folder", str(tmp_path / "universal")])
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert not marker.exists(), "the payload ran"
    assert "Traceback" not in proc.stderr and "tampered" in proc.stderr.strip().splitlines()[-1], proc.stderr[-3000:]


def _wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"the first run ended before {what}:\n{proc.stdout.read()[-3000:]}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.slow
def test_a_live_run_dir_is_refused_and_freed_when_its_holder_dies(tiny_data, tmp_path):
    out, pids = tmp_path / "run", tmp_path / "pids"
    pids.mkdir()
    args = ["launch.train", *CONFIG, f"data.path={tiny_data}", f"out_dir={out}", "train.log_every=1000",
            "train.checkpoint_every=2"]
    job = {"SLURM_JOB_ID": "4242"}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1",
           "CLOZE_FAULT_PID_DIR": str(pids), **job}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    first = subprocess.Popen([sys.executable, "-m", *args, "--nproc", "2", "train.max_steps=100000"], cwd=ROOT,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    try:
        _wait_for(lambda: (out / "checkpoints" / "latest").is_file(), first, "its first checkpoint")
        holder = (pids / "rank0.pid").read_text()
        # Through the launcher (refused before any rank starts), then as a one-rank run (rank 0's own lock).
        for how in (["--nproc", "2"], []):
            second = run_cli([*args, *how, "train.max_steps=100000"])
            assert second.returncode == 2, second.stderr[-3000:]
            errors = error_lines(second.stderr)
            assert len(errors) == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
            assert "in use by another cloze run" in errors[0] and str(out) in errors[0], errors[0]
            assert f"host {socket.gethostname()}, pid {holder}, Slurm job 4242" in errors[0], errors[0]
            assert first.poll() is None, "the refused run disturbed the live one"
        # The node dies: every process of the first run is SIGKILLed (torchrun starts each rank in a session of
        # its own), nothing is released by hand.
        ranks = [int((pids / f"rank{r}.pid").read_text()) for r in (0, 1)]
        for pid in ranks:
            os.kill(pid, signal.SIGKILL)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
        deadline = time.time() + 60
        while any(map(running, ranks)):
            assert time.time() < deadline, "a SIGKILLed rank is still running"
            time.sleep(0.2)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    tag = (out / "checkpoints" / "latest").read_text().strip()
    stopped = int(tag.removeprefix("step_"))
    # Slurm requeues the job under the same id: it takes the lock and resumes.
    third = run_cli([*args, "--nproc", "2", f"train.max_steps={stopped + 2}"], env=job, check=True)
    assert f"resumed from {out / 'checkpoints' / tag} at step {stopped}" in third.stderr, third.stderr[-3000:]
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{stopped + 2:08d}"


def test_resume_on_other_data_is_refused_and_safe_changes_are_printed(tiny_data, tmp_path):
    out = tmp_path / "run"
    other = tmp_path / "other"  # another corpus, prepared with another tokenizer
    dataset_dir(other, random_docs(80, seed=5, max_len=300), max_documents=10)
    common = ["launch.train", *CONFIG, f"out_dir={out}", "train.max_steps=4"]
    run_cli([*common, "--nproc", "2", f"data.path={tiny_data}", "train.stop_at=2"], check=True)
    # Through the launcher (one error before any rank starts), then as a one-rank run (the trainer's own check,
    # made before the world-size change would convert anything).
    for how in (["--nproc", "2"], []):
        proc = run_cli([*common, *how, f"data.path={other}"])
        assert proc.returncode == 2, proc.stderr[-3000:]
        errors = error_lines(proc.stderr)
        assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert "refusing to resume" in errors[0] and "other data" in errors[0], errors[0]
        assert "tokenizer sha256" in errors[0] and f"source 1 ({tiny_data} -> {other})" in errors[0], errors[0]
        assert not (out / "checkpoints" / "universal").exists()
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    resumed = run_cli([*common, "--nproc", "2", f"data.path={tiny_data}", "train.max_steps=5"], check=True)
    assert "changed since step_00000002: train.max_steps: 4 -> 5" in resumed.stderr, resumed.stderr[-3000:]
    changes = [ln for ln in resumed.stderr.splitlines() if "changed since" in ln]
    assert len(changes) == 2, changes  # max_steps and stop_at (2 -> 0), nothing else
    assert "resumed from" in resumed.stderr
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000005"
