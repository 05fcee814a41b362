"""Fixtures for the real-Slurm tests: a reachable cluster (or a printed skip reason) and a job driver.

The cluster is the one `scripts/slurm_cluster.sh start` brings up (CI starts it before pytest). When it is not
running but Slurm is installed and we are root, the fixture starts it and stops it again at the end of the session.
CLOZE_REQUIRE_SLURM=1 turns every skip into a failure, so CI cannot pass by silently skipping.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from launch.slurm import client

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_SCRIPT = ROOT / "scripts" / "slurm_cluster.sh"


def _unavailable_reason() -> str | None:
    if shutil.which("sinfo") is None:
        return "Slurm is not installed (no `sinfo`); run `bash scripts/slurm_cluster.sh start` as root"
    if client.ping():
        return None
    if os.geteuid() != 0:
        return "no Slurm controller answers `scontrol ping`, and starting the local cluster needs root"
    return "no Slurm controller answers `scontrol ping`"


def _skip(reason: str) -> None:
    if os.environ.get("CLOZE_REQUIRE_SLURM") == "1":
        pytest.fail(f"CLOZE_REQUIRE_SLURM=1 but {reason}", pytrace=False)
    print(f"[slurm tests] skipped: {reason}", file=sys.stderr)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A controller that answers, with nodes n1 and n2 idle; skips (reason printed) when there is none."""
    reason = _unavailable_reason()
    started = False
    if reason == "no Slurm controller answers `scontrol ping`":
        proc = subprocess.run(["bash", str(CLUSTER_SCRIPT), "start"], capture_output=True, text=True, timeout=180)
        if proc.returncode != 0:
            _skip(f"could not start the local cluster: {proc.stderr.strip() or proc.stdout.strip()}")
        started, reason = True, None
    if reason:
        _skip(reason)
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True, timeout=30).stdout
    if not {"n1", "n2"} <= set(nodes.split()):
        _skip(f"the running cluster has no nodes n1 and n2 (sinfo: {nodes.split()}); these tests need the local "
              f"cluster of scripts/slurm_cluster.sh")
    yield
    if started:
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "stop"], capture_output=True, text=True, timeout=120)


def diagnostics(job_id: str | None, log: Path | str | None, lines: int = 60) -> str:
    """What a failing test prints: the queue, the controller's view of the job and the job's log."""
    parts = []
    for cmd in (["squeue", "-a", "-o", "%i %j %T %r %N %M"], ["scontrol", "show", "job", str(job_id or "")]):
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            parts.append(f"$ {' '.join(cmd)}\n{p.stdout}{p.stderr}")
        except (OSError, subprocess.TimeoutExpired) as e:
            parts.append(f"$ {' '.join(cmd)}: {e}")
    if log:
        text = Path(log).read_text(errors="replace").splitlines()[-lines:] if Path(log).exists() else ["(no log)"]
        parts.append(f"--- last {lines} lines of {log}\n" + "\n".join(text))
    return "\n".join(parts)


def metrics(out_dir: Path) -> list[dict]:
    f = out_dir / "metrics.jsonl"
    if not f.exists():
        return []
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()]


def status_now(job_id: str) -> dict:
    """What `launch.status JOB --json` prints, computed in this process: a snapshot of a running job must not wait
    for an interpreter to start (seconds on a busy machine, in which a short job may end)."""
    from launch.status import collect

    s = collect(job_id)
    assert s is not None, f"launch.status does not know job {job_id}"
    return json.loads(json.dumps(s))


def status_json(job_id: str) -> dict:
    """`python -m launch.status JOB --json`, the real CLI."""
    p = subprocess.run([sys.executable, "-m", "launch.status", job_id, "--json"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, f"launch.status {job_id} exited {p.returncode}: {p.stderr}"
    return json.loads(p.stdout)


@dataclass
class Run:
    """One training job driven to its end; what the tests assert on."""

    name: str
    out_dir: Path
    signal: str | None
    """Signal to send through `scancel --signal` once a few steps are logged; None: run uninterrupted."""
    job_id: str = ""
    signalled_after_step: int | None = None
    snapshots: dict[str, dict] = field(default_factory=dict)
    """launch.status --json at 'running', 'requeued' (pending again after the requeue) and 'final'."""
    final_text: str = ""
    problem: str = ""
    """Set when the driver gave up on the job (timeout); holds the diagnostics."""

    log_pattern: str = "slurm/slurm-{job}.out"
    """The job's log, relative to out_dir."""

    @property
    def log(self) -> Path:
        return self.out_dir / self.log_pattern.format(job=self.job_id)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def why(self) -> str:
        return self.problem or diagnostics(self.job_id, self.log)


def _snapshot_running(r: Run) -> None:
    """launch.status of a job that runs, once: kept only if the job still ran when it was taken."""
    if "running" not in r.snapshots:
        snap = status_now(r.job_id)
        if snap["state"] == "RUNNING":
            r.snapshots["running"] = snap


def _send_due_signals(runs: list[Run], after_steps: int) -> None:
    """Signal every running job that wants a signal and has logged `after_steps` steps."""
    for r in runs:
        if r.signal and r.signalled_after_step is None:
            steps = metrics(r.out_dir)
            if len(steps) >= after_steps:
                info = client.job_info(r.job_id)
                if info is not None and info.state == "RUNNING":
                    _snapshot_running(r)  # before the signal ends this start
                    client.signal(r.job_id, r.signal)
                    r.signalled_after_step = steps[-1]["step"]


def drive(runs: list[Run], timeout: float, signal_after_steps: int = 3, poll_s: float = 0.3) -> None:
    """Watch every job until it ends: signal the ones that want it once they logged a few steps, and record
    launch.status snapshots on the way. Never hangs: past `timeout` the rest are cancelled with diagnostics.
    Inside the loop everything is quick (scontrol, file reads, launch.status in this process), so a short job is
    seen running on a busy machine; the real CLI's final reports are taken once every job has ended (Slurm keeps a
    finished job for MinJobAge, minutes)."""
    deadline = time.monotonic() + timeout
    pending = [r for r in runs if r.job_id]
    finished = []
    try:
        _watch(pending, finished, deadline, timeout, signal_after_steps, poll_s)
    finally:
        for r in finished:
            r.snapshots["final"] = status_json(r.job_id)
            r.final_text = subprocess.run([sys.executable, "-m", "launch.status", r.job_id], cwd=ROOT,
                                          capture_output=True, text=True, timeout=60).stdout


def _watch(pending: list[Run], finished: list[Run], deadline: float, timeout: float, signal_after_steps: int,
           poll_s: float) -> None:
    while pending:
        _send_due_signals(pending, signal_after_steps)
        for r in list(pending):
            info = client.job_info(r.job_id)
            if info is None:
                r.problem = f"job {r.job_id} vanished from the controller\n" + diagnostics(r.job_id, r.log)
                pending.remove(r)
                continue
            if info.state == "RUNNING" and metrics(r.out_dir):
                _snapshot_running(r)
            if info.restart_count >= 1 and info.state != "RUNNING" and "requeued" not in r.snapshots:
                r.snapshots["requeued"] = status_now(r.job_id)
            if info.finished:
                finished.append(r)
                pending.remove(r)
        if pending and time.monotonic() > deadline:
            for r in pending:
                r.problem = f"job {r.job_id} not finished after {timeout:.0f} s\n" + diagnostics(r.job_id, r.log)
                client.cancel(r.job_id)
            return
        time.sleep(poll_s)
