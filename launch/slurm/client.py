"""The one module that speaks to Slurm: submit, status, signal, requeue, cancel.

Only the commands every Slurm installation has are used (`sbatch --parsable`, `squeue --json`, `scontrol`,
`scancel`): pyslurm must match the cluster's exact release, and no release of it matches the Slurm these machines
run (see DESIGN.md). A failing command raises `SlurmError` carrying Slurm's own message and a hint that names the
fix, because "Batch job submission failed: Unspecified error" alone sends people to the wrong place.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from launch.train.dist import expand_hostlist

DEFAULT_TIMEOUT_S = 60.0
"""Per command. Without a controller, Slurm's clients retry for about 9 s before failing; 60 s leaves room."""

# (pattern in Slurm's message, hint). First match wins; the patterns are Slurm's own wording across releases.
_HINTS: tuple[tuple[str, str], ...] = (
    (r"Unable to contact slurm controller|Connection refused|connect failure|Zero Bytes were transmitted",
     "no Slurm controller answers: is slurmctld running? check with `scontrol ping` "
     "(for the local test cluster: `bash scripts/slurm_cluster.sh start`)"),
    (r"s_p_parse_file|slurm\.conf|Could not establish a configuration source",
     "no readable Slurm configuration on this machine: set SLURM_CONF or run on a cluster's login node"),
    (r"[Ii]nvalid partition",
     "unknown partition: list the partitions with `sinfo -s` and pass one of them with --partition"),
    (r"[Ii]nvalid --time|[Ii]nvalid time|time limit",
     "invalid time: use MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS (e.g. --time 1-00:00:00), "
     "within the partition's MaxTime (`sinfo -s`)"),
    (r"[Ii]nvalid qos|QOS",
     "the job breaks a QOS or association limit: see `sacctmgr show qos` and lower --nodes/--time"),
    (r"[Ii]nvalid account|[Aa]ccount",
     "unknown or unusable account: list yours with `sacctmgr show assoc user=$USER format=account` and pass "
     "--account"),
    (r"Requested node configuration is not available|More processors requested than permitted|"
     r"Node count specification invalid",
     "the job asks for more nodes, CPUs or GPUs than the partition has: compare with `sinfo -N -l`"),
    (r"[Ii]nvalid generic resource|gres",
     "the partition has no such GPUs: check its GRES with `sinfo -o '%P %G'` or use --gpus-per-node 0"),
    (r"[Ii]nvalid job id|Job has already finished|does not exist",
     "the controller does not know this job (a wrong id, or it ended more than MinJobAge ago)"),
    (r"[Aa]ccess/permission denied|not authorized|Permission denied",
     "Slurm refused the request for this user (a job of another user, or an operation reserved to admins)"),
)


class SlurmError(RuntimeError):
    """A Slurm command failed; `str()` is one line: what ran, Slurm's message, and a hint."""

    def __init__(self, command: list[str], message: str, hint: str = ""):
        self.command, self.message, self.hint = list(command), message.strip(), hint
        text = f"`{' '.join(command)}` failed: {self.message or '(no message)'}"
        super().__init__(text + (f"; hint: {hint}" if hint else ""))


def hint_for(message: str) -> str:
    for pattern, hint in _HINTS:
        if re.search(pattern, message):
            return hint
    return ""


def run(args: list[str], timeout: float = DEFAULT_TIMEOUT_S, input_text: str | None = None,
        cwd: str | Path | None = None) -> str:
    """Run one Slurm command and return its stdout; any failure becomes a SlurmError."""
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, input=input_text, cwd=cwd)
    except FileNotFoundError:
        raise SlurmError(args, f"{args[0]}: command not found",
                         "this machine has no Slurm client tools: run on a cluster's login node or install "
                         "slurm-client") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(args, f"no answer within {timeout:.0f} s",
                         "the controller is overloaded or unreachable: check `scontrol ping`") from None
    if proc.returncode != 0:
        message = _clean(proc.stderr) or _clean(proc.stdout) or f"exit status {proc.returncode}"
        hint = hint_for(message)
        # Some clients word a missing controller oddly (scontrol requeue: "Unexpected message received"); ask.
        if not hint and args[:2] != ["scontrol", "ping"] and not ping():
            hint = hint_for("Unable to contact slurm controller")
        raise SlurmError(args, message, hint)
    return proc.stdout


def _clean(text: str) -> str:
    # sbatch repeats itself ("error: invalid partition...", "error: Batch job submission failed: ...");
    # keep every distinct line, joined, without the program prefixes.
    lines = []
    for line in text.strip().splitlines():
        line = re.sub(r"^\w+: error: ", "", line.strip())
        if line and line not in lines and not line.startswith("*"):
            lines.append(line)
    return "; ".join(lines)


def _check_job_id(job_id: str | int) -> str:
    text = str(job_id).strip()
    if not re.fullmatch(r"\d+(_\d+)?", text):
        raise ValueError(f"job id {job_id!r} is not a Slurm job id (digits, e.g. 4711)")
    return text


# -- the five operations ---------------------------------------------------------------------------------------


def submit(script: str | Path, sbatch_args: list[str] = (), cwd: str | Path | None = None) -> str:
    """`sbatch --parsable [args] SCRIPT`; returns the job id (the cluster name after ';' is dropped)."""
    out = run(["sbatch", "--parsable", *sbatch_args, str(script)], cwd=cwd).strip()
    job_id = out.splitlines()[-1].split(";")[0].strip() if out else ""
    if not job_id.isdigit():
        raise SlurmError(["sbatch", "--parsable", str(script)], f"unexpected output {out!r} (expected a job id)")
    return job_id


def signal(job_id: str | int, sig: str = "USR1", full: bool = False) -> None:
    """`scancel --signal=SIG JOB`: the job's steps (its ranks); `full` also the batch shell and srun."""
    sig = sig.upper().removeprefix("SIG")
    if not re.fullmatch(r"[A-Z0-9]+", sig):
        raise ValueError(f"signal {sig!r} is not a signal name (e.g. USR1, TERM)")
    run(["scancel", f"--signal={sig}", *(["--full"] if full else []), _check_job_id(job_id)])


def requeue(job_id: str | int) -> None:
    """`scontrol requeue JOB`: Slurm stops the job and queues it again under the same id (SLURM_RESTART_COUNT+1)."""
    run(["scontrol", "requeue", _check_job_id(job_id)])


def cancel(job_id: str | int) -> None:
    """`scancel JOB`. Cancelling a job that already ended is not an error."""
    job_id = _check_job_id(job_id)
    try:
        run(["scancel", job_id])
    except SlurmError as e:
        if "Invalid job id" not in e.message and "already" not in e.message:
            raise


def ping(timeout: float = 10.0) -> bool:
    """True when the controller answers `scontrol ping` (it answers at once either way, unlike other commands)."""
    try:
        return "is UP" in run(["scontrol", "ping"], timeout=timeout)
    except SlurmError:
        return False


# -- status ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobInfo:
    """What the controller knows about one job (from `squeue --json`)."""

    job_id: str
    name: str
    state: str
    """RUNNING, PENDING, COMPLETED, FAILED, CANCELLED, TIMEOUT, REQUEUED, COMPLETING, ..."""
    reason: str
    """Why it waits or why it ended ('None' while running)."""
    nodelist: str
    """Slurm's compact form, e.g. 'n[1-2]'; empty while pending."""
    node_count: int
    tasks: int
    partition: str
    restart_count: int
    exit_code: int
    submit_time: int
    start_time: int
    end_time: int
    elapsed_s: int
    """Seconds run in the current (latest) start; 0 while pending."""
    comment: str
    stdout: str
    """The output file with %j/%x/%u/%% expanded, absolute."""
    workdir: str

    @property
    def nodes(self) -> list[str]:
        return expand_hostlist(self.nodelist) if self.nodelist else []

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES


FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                          "BOOT_FAIL", "DEADLINE"})


def _num(value) -> int:
    # 22.05 writes plain numbers; 23.02+ writes {"set": bool, "infinite": bool, "number": n}.
    if isinstance(value, dict):
        return int(value.get("number") or 0) if value.get("set", True) else 0
    return int(value or 0)


def _state(value) -> str:
    # 22.05: "RUNNING"; 23.02+: ["RUNNING"] or ["PENDING", "REQUEUED"].
    if isinstance(value, list):
        return value[0] if value else "UNKNOWN"
    return str(value or "UNKNOWN")


def _exit_code(value) -> int:
    """The batch script's exit status; 128+N when signal N killed it (the shell's convention)."""
    if isinstance(value, dict):  # 23.02+: {"status": [...], "return_code": {...}, "signal": {...}}
        signal_id = _num((value.get("signal") or {}).get("id", 0)) if isinstance(value.get("signal"), dict) else 0
        return 128 + signal_id if signal_id else _num(value.get("return_code", 0))
    raw = int(value or 0)  # 22.05: the raw wait status
    return 128 + (raw & 0x7F) if raw & 0x7F else (raw >> 8) & 0xFF


def expand_output_path(pattern: str, job: dict, workdir: str) -> str:
    """The filename patterns sbatch expands that a cloze template uses: %j %J %x %u %A %a %%."""
    if not pattern:
        pattern = "slurm-%j.out"
    subs = {"j": str(job.get("job_id", "")), "J": str(job.get("job_id", "")), "x": str(job.get("name", "")),
            "u": str(job.get("user_name", "")), "A": str(_num(job.get("array_job_id")) or job.get("job_id", "")),
            "a": str(job.get("array_task_id") or ""), "%": "%"}
    text = re.sub(r"%(\d*)([jJxuAa%])", lambda m: subs[m.group(2)].zfill(int(m.group(1) or 0)), pattern)
    return text if os.path.isabs(text) else os.path.join(workdir, text)


def parse_job(job: dict, now: float | None = None) -> JobInfo:
    """One entry of `squeue --json`'s "jobs" list -> JobInfo."""
    now = time.time() if now is None else now
    state = _state(job.get("job_state"))
    start, end = _num(job.get("start_time")), _num(job.get("end_time"))
    if state in ("RUNNING", "COMPLETING", "SUSPENDED") and start:
        elapsed = int(now) - start
    elif state in FINAL_STATES and start and end >= start:
        elapsed = end - start
    else:
        elapsed = 0
    workdir = str(job.get("current_working_directory") or "")
    return JobInfo(
        job_id=str(job.get("job_id")), name=str(job.get("name", "")), state=state,
        reason=str(job.get("state_reason", "")), nodelist=str(job.get("nodes") or ""),
        node_count=_num(job.get("node_count")), tasks=_num(job.get("tasks")), partition=str(job.get("partition", "")),
        restart_count=_num(job.get("restart_cnt")), exit_code=_exit_code(job.get("exit_code")),
        submit_time=_num(job.get("submit_time")), start_time=start, end_time=end, elapsed_s=max(0, elapsed),
        comment=str(job.get("comment") or ""),
        stdout=expand_output_path(str(job.get("standard_output") or ""), job, workdir), workdir=workdir,
    )


def job_info(job_id: str | int) -> JobInfo | None:
    """The job as the controller sees it, or None when the controller no longer (or never) knew it."""
    job_id = _check_job_id(job_id)
    try:
        # 22.05 ignores --jobs under --json and lists every job; later releases filter. Filter here either way.
        out = run(["squeue", "--json", "--all", f"--jobs={job_id}"])
    except SlurmError as e:
        if "Invalid job id" in e.message:
            return None
        raise
    try:
        data = json.loads(out)
    except json.JSONDecodeError as e:
        raise SlurmError(["squeue", "--json"], f"output is not JSON ({e})",
                         "this Slurm may be older than 21.08 (no --json)") from None
    errors = [err for err in data.get("errors") or [] if err]
    if errors:
        message = "; ".join(str(err.get("description") or err.get("error") or err) for err in errors)
        hint = hint_for(message)
        if not hint and not ping():
            hint = hint_for("Unable to contact slurm controller")
        raise SlurmError(["squeue", "--json"], message, hint)
    for job in data.get("jobs") or []:
        if str(job.get("job_id")) == job_id:
            return parse_job(job)
    return None

