"""Templates, CLI checks and the parsing of Slurm's answers: everything of launch/slurm that needs no cluster."""

from __future__ import annotations

import json
import re
import shlex
import subprocess

import pytest

from launch.slurm import client
from launch.slurm.client import SlurmError, expand_output_path, hint_for, parse_job
from launch.slurm.render import JobSpec, make_comment, parse_comment, render_export, render_pretrain
from launch.status import format_status, last_jsonl_record
from tests.conftest import run_cli


def directives(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ").strip() for line in script.splitlines() if line.startswith("#SBATCH")]


def launch_argv(script: str) -> list[str]:
    line = next(line for line in script.splitlines() if line.startswith("srun "))
    return shlex.split(line.removesuffix(" &"))


def assert_valid_bash_with_directives_first(script: str) -> None:
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    # sbatch stops reading #SBATCH at the first command: every directive must come before it.
    first_command = next(i for i, line in enumerate(script.splitlines())
                         if line.strip() and not line.startswith("#"))
    last_directive = max(i for i, line in enumerate(script.splitlines()) if line.startswith("#SBATCH"))
    assert last_directive < first_command


def test_gpu_pretrain_script(tmp_path):
    spec = JobSpec(nodes=4, gpus_per_node=8, cpus_per_task=6, partition="gpu", time="2-00:00:00", account="proj1",
                   signal_seconds=600, setup=["module load cuda/12.4"], sbatch_args=["--qos=high"])
    text = render_pretrain("launch/configs/demo.yaml", ["train.max_steps=50"], spec, tmp_path / "run", 50,
                           workdir=tmp_path)
    d = directives(text)
    for want in ("--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=6", "--signal=USR1@600",
                 "--requeue", "--open-mode=append", "--partition=gpu", "--time=2-00:00:00", "--account=proj1",
                 "--qos=high", f"--output={tmp_path / 'run' / 'slurm' / 'slurm-%j.out'}"):
        assert want in d, (want, d)
    assert "DS_ACCELERATOR=cpu" not in text and "module load cuda/12.4" in text
    assert "OMP_NUM_THREADS=${OMP_NUM_THREADS:-6}" in text
    argv = launch_argv(text)
    assert argv[:3] == ["srun", "--kill-on-bad-exit=1", "--cpus-per-task=6"]  # srun no longer inherits it (22.05+)
    assert argv[-6:] == [spec.python, "-m", "launch.train", "--config", "launch/configs/demo.yaml",
                         "train.max_steps=50"]
    assert_valid_bash_with_directives_first(text)


def test_cpu_script_and_hostile_values_stay_data(tmp_path):
    spec = JobSpec(nodes=2, tasks_per_node=2)
    evil = "out_dir=/tmp/a b; touch /tmp/pwned"
    text = render_pretrain("my config.yaml", [evil], spec, tmp_path / "r", 20, workdir=tmp_path)
    assert "export DS_ACCELERATOR=cpu" in text and "--gpus-per-node" not in text
    assert "--ntasks-per-node=2" in directives(text)
    argv = launch_argv(text)
    assert argv[argv.index("--config") + 1] == "my config.yaml" and argv[-1] == evil
    assert_valid_bash_with_directives_first(text)


def test_torchrun_launcher_runs_one_task_per_node(tmp_path):
    spec = JobSpec(nodes=2, gpus_per_node=4, cpus_per_task=2, launcher="torchrun")
    text = render_pretrain("c.yaml", [], spec, tmp_path, 10, workdir=tmp_path)
    assert "--ntasks-per-node=1" in directives(text) and "--cpus-per-task=8" in directives(text)
    argv = launch_argv(text)
    assert argv[:4] == ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=1", "--cpus-per-task=8"]
    inner = argv[argv.index("-c") + 1]
    # torchrun must survive the ranks' USR1 (Python's default action for it is to exit).
    assert inner.startswith('trap "" USR1; exec ')
    assert "--nnodes=2 --nproc-per-node=4" in inner and '--node-rank="$SLURM_NODEID"' in inner
    assert 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in text
    assert_valid_bash_with_directives_first(text)


def test_export_script(tmp_path):
    text = render_export("runs/x", "runs/x-hf", JobSpec(dependency="afterok:42"), ["--with-head"], workdir=tmp_path)
    d = directives(text)
    assert "--nodes=1" in d and "--ntasks=1" in d and "--dependency=afterok:42" in d
    assert "--requeue" not in d
    assert "-m launch.export --checkpoint runs/x --out runs/x-hf --with-head" in text
    assert parse_comment(d[[x.startswith("--comment=") for x in d].index(True)].removeprefix("--comment=")) == {
        "kind": "export", "out": str(tmp_path / "runs" / "x-hf")}
    assert_valid_bash_with_directives_first(text)


@pytest.mark.parametrize("kwargs, words", [
    ({"nodes": 0}, "--nodes"),
    ({"gpus_per_node": 4, "tasks_per_node": 2}, "one rank per GPU"),
    ({"time": "tomorrow"}, "not a Slurm time"),
    ({"partition": "gpu; rm -rf /"}, "--partition"),
    ({"signal_seconds": 0}, "--signal-seconds"),
    ({"launcher": "mpirun"}, "--launcher"),
    ({"sbatch_args": ["--qos=a\n#SBATCH --x"]}, "--sbatch-arg"),
])
def test_job_spec_rejects_user_mistakes(kwargs, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        JobSpec(**kwargs)


@pytest.mark.parametrize("value", ["30", "30:00", "12:00:00", "2-00", "2-12:30", "2-12:30:00", "UNLIMITED"])
def test_slurm_time_formats_accepted(value):
    assert JobSpec(time=value).time == value


def test_comment_round_trip_survives_spaces_and_colons():
    comment = make_comment("pretrain", max_steps=7, out_dir="/data/my run:v2/x")
    assert " " not in comment and comment.count(":") == 3
    assert parse_comment(comment) == {"kind": "pretrain", "max_steps": "7", "out_dir": "/data/my run:v2/x"}
    assert parse_comment("some other job") == {}


JOB_2205 = {"job_id": 12, "name": "cloze-tiny", "job_state": "RUNNING", "state_reason": "None", "nodes": "n[1-2]",
            "node_count": 2, "tasks": 4, "partition": "debug", "restart_cnt": 1, "exit_code": 36608,
            "submit_time": 100, "start_time": 150, "end_time": 10_000, "comment": make_comment(
                "pretrain", max_steps=20, out_dir="/r"), "standard_output": "logs/%x-%j.out", "user_name": "root",
            "current_working_directory": "/work"}


def test_parse_squeue_json_2205_and_2302():
    info = parse_job(JOB_2205, now=190)
    assert (info.state, info.nodes, info.elapsed_s, info.restart_count) == ("RUNNING", ["n1", "n2"], 40, 1)
    assert info.stdout == "/work/logs/cloze-tiny-12.out"
    assert info.exit_code == 143  # 22.05 reports the raw wait status: 143 << 8
    newer = {**JOB_2205, "job_state": ["COMPLETED"], "start_time": {"set": True, "number": 150},
             "end_time": {"set": True, "number": 175}, "restart_cnt": {"set": True, "number": 0},
             "exit_code": {"status": ["SUCCESS"], "return_code": {"set": True, "number": 0}}}
    info = parse_job(newer, now=10_000)
    assert (info.state, info.elapsed_s, info.exit_code, info.finished) == ("COMPLETED", 25, 0, True)
    assert parse_job({**JOB_2205, "job_state": "PENDING", "nodes": ""}).nodes == []


def test_output_path_patterns():
    job = {"job_id": 7, "name": "n", "user_name": "u"}
    assert expand_output_path("/l/%x.%j.%u.%%.out", job, "/w") == "/l/n.7.u.%.out"
    assert expand_output_path("", job, "/w") == "/w/slurm-7.out"
    assert expand_output_path("o-%4j", job, "/w") == "/w/o-0007"


@pytest.mark.parametrize("message, words", [
    ("Batch job submission failed: Unable to contact slurm controller (connect failure)", "is slurmctld running?"),
    ("Batch job submission failed: Invalid partition name specified", "unknown partition"),
    ("Invalid --time specification", "invalid time"),
    ("Batch job submission failed: Requested time limit is invalid (missing or exceeds some limit)", "invalid time"),
    ("Batch job submission failed: Invalid account or account/partition combination specified", "unknown or"),
    ("Batch job submission failed: Job violates accounting/QOS policy", "QOS"),
    ("Batch job submission failed: Requested node configuration is not available", "sinfo -N -l"),
    ("Invalid job id specified", "does not know this job"),
])
def test_hints_name_the_fix(message, words):
    assert words in hint_for(message)


def test_missing_slurm_tools_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no sbatch, no scontrol
    with pytest.raises(SlurmError, match="no Slurm client tools"):
        client.submit(tmp_path / "x.sbatch")
    assert client.ping() is False
    with pytest.raises(ValueError, match="not a Slurm job id"):
        client.requeue("12; rm -rf /")


def test_last_metrics_record_skips_a_half_written_line(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text(json.dumps({"step": 1, "loss": {"mlm": 7.0}}) + "\n" + json.dumps({"step": 2, "loss": {"mlm": 6.5}})
                 + '\n{"step": 3, "lo')
    assert last_jsonl_record(f)["step"] == 2
    assert last_jsonl_record(tmp_path / "missing.jsonl") is None


def test_format_status():
    info = parse_job(JOB_2205, now=190)
    s = {**info.__dict__, "nodes": info.nodes, "kind": "pretrain", "out_dir": "/r", "max_steps": 20,
         "last_step": 13, "last_loss": {"mlm": 5.25}, "metrics": "/r/metrics.jsonl"}
    text = format_status(s)
    assert "job 12 (cloze-tiny): RUNNING" in text and "n[1-2] (n1, n2), 4 task(s)" in text
    assert "00:00:40, restarts 1" in text and "last step: 13/20, loss mlm 5.2500" in text


def test_submit_dry_run_renders_from_the_config(tiny_data, tmp_path):
    proc = run_cli(["launch.submit", "--config", "launch/configs/tiny.yaml", "--nodes", "2", "--tasks-per-node", "2",
                    "--time", "10:00", "--dry-run", f"out_dir={tmp_path / 'run'}", f"data.path={tiny_data}",
                    "train.max_steps=9"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    d = directives(proc.stdout)
    assert "--nodes=2" in d and "--ntasks-per-node=2" in d and "--time=10:00" in d and "--job-name=cloze-tiny" in d
    assert parse_comment(next(x for x in d if x.startswith("--comment=")).removeprefix("--comment=")) == {
        "kind": "pretrain", "max_steps": "9", "out_dir": str(tmp_path / "run")}
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


@pytest.mark.parametrize("args, words", [
    (["--gpus-per-node", "4", "--tasks-per-node", "2"], "one rank per GPU"),
    (["--time", "soon"], "not a Slurm time"),
    (["train.max_step=3"], "did you mean 'max_steps'"),
])
def test_submit_user_mistakes_are_one_line(tiny_data, args, words):
    proc = run_cli(["launch.submit", "--config", "launch/configs/tiny.yaml", "--dry-run", f"data.path={tiny_data}",
                    *args], timeout=120)
    assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
