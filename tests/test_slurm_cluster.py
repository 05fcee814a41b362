"""End to end on a real two-node Slurm cluster (n1, n2): a 4-rank DeepSpeed job, and preemption by USR1 and by
SIGTERM alone, each checkpointing, requeued by the trainer, resumed and finished; an export job that waits for
the first; launch.status on each.

The jobs run at the same time (the cluster advertises enough CPUs) so the ~12 s requeue delays and the
DeepSpeed start-ups overlap; a driver signals each preempted job once it has logged a few steps. Skips with the
reason printed where there is no cluster and no root (see tests/slurm_conftest.py).
"""

from __future__ import annotations

import json
import math

import pytest

from launch.slurm import client
from tests.conftest import run_cli
from tests.slurm_conftest import Run, drive, metrics, slurm_cluster  # noqa: F401  (slurm_cluster: a fixture)

STEPS = 60
"""Long enough that a signal sent after step 3 lands before the end even on a busy machine (a step takes ~0.1-0.3 s
here; the tests run beside another pytest worker)."""
TIMEOUT_S = 420
"""All three jobs, two of them started twice; ~1 min when DeepSpeed's CPU op is warm, more when 12 ranks have
to build it first."""


# 2-node x 2-task jobs on the local cluster, preempted and requeued: minutes, several processes per job.
pytestmark = [pytest.mark.distributed, pytest.mark.slow]

def submit(run: Run, tiny_data) -> None:
    proc = run_cli(["launch.submit", "--config", "launch/configs/tiny.yaml", "--nodes", "2", "--tasks-per-node", "2",
                    "--job-name", f"cloze-test-{run.name}", f"out_dir={run.out_dir}", f"data.path={tiny_data}",
                    f"train.max_steps={STEPS}"], timeout=120)
    assert proc.returncode == 0, f"launch.submit failed: {proc.stderr}"
    run.job_id = proc.stdout.strip()
    assert run.job_id.isdigit(), f"launch.submit printed {proc.stdout!r}, expected a job id"


@pytest.fixture(scope="module")
def runs(slurm_cluster, tiny_data, tmp_path_factory):  # noqa: F811
    base = tmp_path_factory.mktemp("slurm_runs")
    by_name = {name: Run(name, base / name, sig) for name, sig in (("full", None), ("USR1", "USR1"),
                                                                  ("TERM", "TERM"))}
    try:
        # All three at once: every submission starts an interpreter (seconds on a busy machine), and the watcher,
        # which starts after them, must still see each job running.
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda run: submit(run, tiny_data), list(by_name.values())))
        # The export job waits for the uninterrupted run (afterok) and then reads its checkpoint.
        full = by_name["full"]
        # The export goes beside the run (an --out inside the run it exports is refused); its log beside it too.
        export = by_name["export"] = Run("export", base, None, log_pattern="slurm/export-full-hf-{job}.out")
        proc = run_cli(["launch.submit", "export", "--checkpoint", str(full.out_dir), "--out",
                        str(base / "full-hf"), "--after", full.job_id, "--job-name", "cloze-test-export"],
                       timeout=120)
        assert proc.returncode == 0, f"launch.submit export failed: {proc.stderr}"
        export.job_id = proc.stdout.strip()
        drive(list(by_name.values()), timeout=TIMEOUT_S)
        yield by_name
    finally:
        for run in by_name.values():
            if run.job_id:
                info = client.job_info(run.job_id)
                if info is not None and not info.finished:
                    client.cancel(run.job_id)


def steps_of(run: Run) -> list[int]:
    return [m["step"] for m in metrics(run.out_dir)]


def test_four_rank_job_spans_two_nodes(runs):
    run = runs["full"]
    assert not run.problem, run.why()
    final = run.snapshots["final"]
    assert (final["state"], final["exit_code"], final["restart_count"]) == ("COMPLETED", 0, 0), run.why()
    assert final["nodes"] == ["n1", "n2"] and final["tasks"] == 4
    log = run.log_text()
    # The template's placement line comes from each srun task itself; rank = SLURM_PROCID (launch.train.dist).
    for rank in range(4):
        assert f"[cloze] rank {rank}/4 local {rank % 2} on n{1 + rank // 2}" in log, run.why()
    assert "[cloze] world 4 (slurm)" in log, run.why()
    ckpts = run.out_dir / "checkpoints"
    tag = (ckpts / "latest").read_text().strip()
    assert tag == f"step_{STEPS:08d}"
    assert json.loads((ckpts / tag / "run.json").read_text())["world_size"] == 4
    for rank in range(4):
        state = json.loads((ckpts / tag / f"trainer_state_rank{rank}.json").read_text())
        assert (state["rank"], state["world_size"], state["step"]) == (rank, 4, STEPS)
    assert steps_of(run) == list(range(1, STEPS + 1))


@pytest.mark.parametrize("sig", ["USR1", "TERM"])
def test_preempted_job_checkpoints_requeues_and_resumes(runs, sig):
    run, full = runs[sig], runs["full"]
    assert not run.problem, run.why()
    final = run.snapshots["final"]
    assert (final["state"], final["exit_code"], final["restart_count"]) == ("COMPLETED", 0, 1), run.why()
    log = run.log_text()
    for rank in range(4):  # scancel --signal reaches every rank; each says so
        assert f"rank {rank}: SIG{sig} received" in log, run.why()
    stopped = [line for line in log.splitlines() if line.startswith("[cloze] stopped at step")]
    assert len(stopped) == 1 and f"on SIG{sig}" in stopped[0], run.why()
    k = int(stopped[0].split()[4])
    assert run.signalled_after_step <= k < STEPS
    # Nobody but the trainer asks for a requeue here. Its own "requeued" line may be lost: Slurm stops srun, which
    # carries the ranks' output, as soon as the requeue is accepted; slurmstepd's line is written directly.
    assert f"[cloze] requeueing Slurm job {run.job_id}" in log or "DUE TO JOB REQUEUE" in log, run.why()
    assert f"[cloze] job {run.job_id} start 2 on n[1-2]" in log
    assert f"resumed from {run.out_dir / 'checkpoints' / f'step_{k:08d}'} at step {k}" in log, run.why()
    # The loss curve: every step exactly once, none lost between the checkpoint and the requeue.
    assert steps_of(run) == list(range(1, STEPS + 1)), run.why()
    assert (run.out_dir / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"
    # And the resumed run is the uninterrupted one: same world, seed and data order, so the same losses. Tolerance
    # 1e-5 relative: a save/load round trip reproduces the weights and optimizer state bit for bit (DESIGN.md), and
    # a fixed 4-rank gloo world sums in a fixed order; only a lost or repeated batch could move a loss more.
    assert not full.problem, full.why()
    ours, ref = metrics(run.out_dir), metrics(full.out_dir)
    for a, b in zip(ours, ref):
        assert a["loss"].keys() == b["loss"].keys(), (a, b)
        for name in a["loss"]:
            assert math.isclose(a["loss"][name], b["loss"][name], rel_tol=1e-5), (a["step"], name, a, b)


def test_export_job_runs_after_pretraining(runs):
    run, full = runs["export"], runs["full"]
    assert not run.problem, run.why()
    final = run.snapshots["final"]
    assert (final["state"], final["exit_code"], final["kind"]) == ("COMPLETED", 0, "export"), run.why()
    assert final["start_time"] >= full.snapshots["final"]["end_time"]  # --after: only once training ended
    assert final["tasks"] == 1 and final["node_count"] == 1
    hf = full.out_dir.with_name("full-hf")
    assert (hf / "config.json").is_file() and (hf / "model.safetensors").is_file()
    assert final["out_dir"] == str(hf.resolve())
    assert "[cloze] verified: transformers" in run.log_text(), run.why()
    assert f"export to: {hf.resolve()}" in run.final_text


def test_status_reports_each_training_job(runs):
    for name, run in runs.items():
        if name == "export":
            continue
        assert not run.problem, run.why()
        assert {"running", "final"} <= set(run.snapshots), (name, sorted(run.snapshots), run.why())
        running, final = run.snapshots["running"], run.snapshots["final"]
        assert running["state"] == "RUNNING" and running["nodes"] == ["n1", "n2"], running
        assert running["last_step"] is not None and 1 <= running["last_step"] <= STEPS, running
        assert running["kind"] == "pretrain" and running["out_dir"] == str(run.out_dir.resolve())
        assert final["state"] == "COMPLETED" and final["last_step"] == STEPS and final["max_steps"] == STEPS
        assert final["elapsed_s"] >= 1 and final["stdout"] == str(run.log.resolve())
        assert final["name"] == f"cloze-test-{name}"
        text = run.final_text
        assert f"job {run.job_id} (cloze-test-{name}): COMPLETED" in text, text
        assert "n[1-2] (n1, n2), 4 task(s)" in text and f"last step: {STEPS}/{STEPS}" in text, text
        if run.signal:
            requeued = run.snapshots["requeued"]
            assert requeued["restart_count"] == 1 and requeued["state"] not in ("RUNNING", "COMPLETED"), requeued
            assert "restarts 1" in text, text
        else:
            assert "requeued" not in run.snapshots and "restarts 0" in text, text
