"""launch.slurm.client against the real local cluster: the five operations, and Slurm's errors as clear messages.

Skips with the reason printed where there is no cluster and no root (see tests/slurm_conftest.py).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from launch.slurm import client
from launch.slurm.client import SlurmError
from tests.conftest import run_cli
from tests.slurm_conftest import diagnostics, slurm_cluster  # noqa: F401  (slurm_cluster: a fixture)

SLEEPER = """#!/bin/bash
#SBATCH --job-name=cloze-test-sleeper
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output={log}
echo "start restart=${{SLURM_RESTART_COUNT:-0}}"
srun bash -c 'trap "echo got-USR1 on \\$SLURMD_NODENAME" USR1; for i in $(seq 600); do sleep 0.1; done'
"""


def wait_until(predicate, timeout: float, what: str, job_id: str, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n" + diagnostics(job_id, log))


def test_submit_status_signal_requeue_cancel(slurm_cluster, tmp_path):  # noqa: F811
    log = tmp_path / "sleeper.out"
    script = tmp_path / "sleeper.sbatch"
    script.write_text(SLEEPER.format(log=log))
    job = client.submit(script)
    assert job.isdigit()
    try:
        info = wait_until(lambda: (i := client.job_info(job)) and i.state == "RUNNING" and i, 60, "RUNNING", job, log)
        assert info.nodes == ["n1", "n2"] and info.node_count == 2 and info.tasks == 2
        assert info.name == "cloze-test-sleeper" and info.stdout == str(log) and info.restart_count == 0
        # The step's tasks install their trap once bash starts; signal until both nodes have answered.
        def both_answered():
            if log.exists() and {"got-USR1 on n1", "got-USR1 on n2"} <= set(log.read_text().splitlines()):
                return True
            client.signal(job, "USR1")
            time.sleep(0.5)
            return False

        wait_until(both_answered, 30, "USR1 on both nodes", job, log)
        client.requeue(job)
        info = wait_until(lambda: (i := client.job_info(job)) and i.restart_count == 1 and i, 30, "the requeue",
                          job, log)
        assert info.state != "COMPLETED"
        client.cancel(job)
        info = wait_until(lambda: (i := client.job_info(job)) and i.finished and i, 60, "CANCELLED", job, log)
        assert info.state == "CANCELLED"
        client.cancel(job)  # cancelling an ended job is not an error
    finally:
        client.cancel(job)


def test_unknown_job(slurm_cluster):  # noqa: F811
    assert client.job_info("987654") is None
    with pytest.raises(SlurmError, match="does not know this job"):
        client.requeue("987654")
    with pytest.raises(SlurmError, match="does not know this job"):
        client.signal("987654", "USR1")


@pytest.mark.parametrize("args, hint", [(["--partition=no-such-partition"], "unknown partition"),
                                        (["--time=soon"], "invalid time")])
def test_sbatch_errors_carry_slurms_message_and_a_hint(slurm_cluster, tmp_path, args, hint):  # noqa: F811
    script = tmp_path / "x.sbatch"
    script.write_text("#!/bin/bash\ntrue\n")
    with pytest.raises(SlurmError) as e:
        client.submit(script, args)
    text = str(e.value)
    assert hint in text and "sbatch --parsable" in text and "\n" not in text, text
    assert re.search(r"[Pp]artition|--time", e.value.message), e.value.message  # Slurm's own words are kept


def test_no_controller(slurm_cluster, tmp_path, monkeypatch):  # noqa: F811
    # A real client pointed at a port where no controller listens (MessageTimeout 1 s keeps it quick).
    conf = Path("/etc/slurm/slurm.conf")
    if not conf.is_file() or "written by cloze" not in conf.read_text():
        pytest.skip("the running cluster is not the local one of scripts/slurm_cluster.sh")
    text = re.sub(r"(?m)^SlurmctldPort=.*$", "SlurmctldPort=6999", conf.read_text())
    text = re.sub(r"(?m)^MessageTimeout=.*$", "MessageTimeout=1", text)
    (tmp_path / "slurm.conf").write_text(text)
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "slurm.conf"))
    script = tmp_path / "x.sbatch"
    script.write_text("#!/bin/bash\ntrue\n")
    assert not client.ping()
    for call in (lambda: client.submit(script), lambda: client.requeue("1"), lambda: client.job_info("1")):
        with pytest.raises(SlurmError, match=r"is slurmctld running\? check with `scontrol ping`"):
            call()


def test_submit_cli_reports_slurm_errors_in_one_line(slurm_cluster, tiny_data, tmp_path):  # noqa: F811
    proc = run_cli(["launch.submit", "--config", "launch/configs/tiny.yaml", "--partition", "no-such-partition",
                    f"out_dir={tmp_path / 'run'}", f"data.path={tiny_data}"], timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("error: ") and "unknown partition" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_cli(["launch.status", "987654"], timeout=60)
    assert proc.returncode == 1 and "not known to the Slurm controller" in proc.stderr
