"""sbatch scripts from the templates next to this file: pretraining (N nodes x G ranks) and export (one task).

Two launchers. `srun` (default) starts one task per GPU and each task is one rank (launch.train.dist reads SLURM_*).
`torchrun` starts one srun task per node that runs torchrun with G local ranks; ranks then read torchrun's
variables. Values are checked here and shell-quoted into the script, so nothing a user types ends up as shell code
or as a second #SBATCH option; a value holding a line break or NUL is refused before anything is rendered (quoting
keeps a line break inside one shell word, but not inside a comment or an #SBATCH line).
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote

from launch.config import one_line_problem, shown

TEMPLATES = Path(__file__).resolve().parent
LAUNCHERS = ("srun", "torchrun")
# Characters an #SBATCH value may hold: enough for partitions, accounts, QOS, constraints, times and dependencies.
_SAFE = re.compile(r"[A-Za-z0-9_.,:=+@%/\-\[\]&|!*]+")
# Slurm's time formats: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS, or unlimited.
_TIME = re.compile(r"(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+(:\d{1,2}(:\d{1,2})?)?|UNLIMITED|INFINITE)",
                   re.IGNORECASE)


@dataclass
class JobSpec:
    """Resources and launch options of one sbatch job (what `python -m launch.submit` takes on its command line)."""

    nodes: int = 1
    """Nodes to allocate."""
    gpus_per_node: int = 0
    """GPUs per node; one rank per GPU. 0: a CPU job (DS_ACCELERATOR=cpu, gloo)."""
    tasks_per_node: int = 0
    """Ranks per node; 0 means one per GPU (1 on a CPU job). With GPUs it must equal gpus_per_node."""
    cpus_per_task: int = 0
    """CPU cores per rank (data loader workers, OMP threads); 0 keeps Slurm's default of 1."""
    partition: str = ""
    """Slurm partition; empty: the cluster's default partition."""
    time: str = ""
    """Time limit (MM, HH:MM:SS, D-HH:MM:SS...); empty: the partition's default."""
    account: str = ""
    """Account to charge; empty: the user's default."""
    job_name: str = "cloze"
    """Name shown by squeue."""
    signal_seconds: int = 300
    """USR1 is sent this long before the time limit (Slurm may send it up to 60 s earlier); must cover one
    optimizer step plus one checkpoint save."""
    launcher: str = "srun"
    """'srun': one task per rank. 'torchrun': one task per node running torchrun with tasks_per_node ranks."""
    python: str = sys.executable
    """The interpreter on the compute nodes (a venv on a shared filesystem)."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before launching, e.g. 'module load cuda/12.4' (written verbatim: they are yours)."""
    sbatch_args: list[str] = field(default_factory=list)
    """Extra sbatch options, each written as its own #SBATCH line, e.g. '--qos=high' or '--exclusive'."""
    dependency: str = ""
    """Slurm dependency, e.g. 'afterok:4711' (export after pretraining)."""

    def __post_init__(self) -> None:
        for name in ("partition", "time", "account", "job_name", "dependency", "launcher"):
            check_one_line(f"--{name.replace('_', '-')}", getattr(self, name))
        for name in ("nodes",):
            if getattr(self, name) < 1:
                raise ValueError(f"--nodes must be >= 1, got {self.nodes}")
        for name in ("gpus_per_node", "tasks_per_node", "cpus_per_task"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.tasks_per_node == 0:
            self.tasks_per_node = self.gpus_per_node or 1
        if self.gpus_per_node and self.tasks_per_node != self.gpus_per_node:
            raise ValueError(f"--tasks-per-node {self.tasks_per_node} with --gpus-per-node {self.gpus_per_node}: "
                             f"cloze runs one rank per GPU; drop --tasks-per-node or make them equal")
        if not 1 <= self.signal_seconds <= 65535:
            raise ValueError(f"--signal-seconds must lie in 1..65535 (Slurm's limit), got {self.signal_seconds}")
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {shown(self.launcher)}")
        if self.time and not _TIME.fullmatch(self.time):
            raise ValueError(f"--time {shown(self.time)} is not a Slurm time: use MM, MM:SS, HH:MM:SS, D-HH, "
                             f"D-HH:MM or D-HH:MM:SS, e.g. --time 1-00:00:00")
        for name in ("partition", "account", "job_name", "dependency"):
            value = getattr(self, name)
            if value and not _SAFE.fullmatch(value):
                raise ValueError(f"--{name.replace('_', '-')} {shown(value)} holds characters Slurm does not accept "
                                 f"there (spaces, quotes, newlines)")
        check_one_line("--python", self.python)
        for line in self.setup:
            check_one_line("--setup", line, "pass --setup once per line")
        for arg in self.sbatch_args:
            check_one_line("--sbatch-arg", arg, "pass --sbatch-arg once per option")
            if not arg.startswith("-") or "#" in arg:
                raise ValueError(f"--sbatch-arg {shown(arg)}: expected one sbatch option such as --qos=high")


def check_one_line(name: str, value: str, fix: str = "") -> None:
    """ValueError naming `name` when `value` holds a line break or NUL: in the script it would end a comment or an
    #SBATCH line and start a line of shell (after which sbatch also ignores every later #SBATCH line)."""
    if problem := one_line_problem(name, str(value)):
        raise ValueError(problem + (f"; {fix}" if fix else ""))


MULTILINE = ("sbatch_options", "setup", "rendezvous")
"""Placeholders whose value is several lines (each built from values checked one by one); every other value must
be one line, as it sits inside a comment, an #SBATCH line or one shell command."""


def fill(template: str, values: dict[str, str]) -> str:
    """Replace {{name}}; a placeholder alone on a line whose value is empty leaves no blank line behind."""
    for name, value in values.items():
        if name not in MULTILINE:
            check_one_line(name, value)
    lines = []
    for line in template.splitlines():
        m = re.fullmatch(r"\{\{(\w+)\}\}", line.strip())
        if m and not values[m.group(1)]:
            continue
        lines.append(line)
    text = re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], "\n".join(lines) + "\n")
    assert "{{" not in text, "a template placeholder was left unfilled"
    return text


def make_comment(kind: str, **fields: str | int) -> str:
    """The job's --comment: how `launch.status` finds the run directory (percent-encoded: no spaces, no ':')."""
    return ":".join(["cloze", kind] + [f"{k}={quote(str(v), safe='/')}" for k, v in fields.items()])


def parse_comment(comment: str) -> dict[str, str]:
    """Inverse of make_comment; {} for a job cloze did not render."""
    parts = comment.split(":")
    if len(parts) < 2 or parts[0] != "cloze":
        return {}
    out = {"kind": parts[1]}
    for part in parts[2:]:
        key, _, value = part.partition("=")
        out[key] = unquote(value)
    return out


def _sbatch_lines(spec: JobSpec, gpus: bool) -> str:
    opts = []
    if gpus and spec.gpus_per_node:
        opts.append(f"--gpus-per-node={spec.gpus_per_node}")
    for flag, value in (("partition", spec.partition), ("time", spec.time), ("account", spec.account),
                        ("dependency", spec.dependency)):
        if value:
            opts.append(f"--{flag}={value}")
    opts += spec.sbatch_args
    return "\n".join(f"#SBATCH {o}" for o in opts)


def log_dir(out_dir: str | Path) -> Path:
    """Where a run's rendered scripts and Slurm logs go: <out_dir>/slurm."""
    return Path(out_dir).resolve() / "slurm"


def render_pretrain(config: str, overrides: list[str], spec: JobSpec, out_dir: str | Path, max_steps: int,
                    workdir: str | Path | None = None) -> str:
    """The sbatch script that trains `config` (+ overrides) on spec.nodes x spec.tasks_per_node ranks."""
    workdir = Path(workdir or Path.cwd()).resolve()
    check_one_line("--config", config)
    for item in overrides:
        check_one_line(f"override {shown(item.partition('=')[0])}", item)
    check_one_line("out_dir", str(out_dir))
    check_one_line("the working directory", str(workdir))
    py = shlex.quote(spec.python)
    train = [spec.python, "-m", "launch.train", "--config", config, *overrides]
    cpus = spec.cpus_per_task
    if spec.launcher == "srun":
        srun = ["srun", "--kill-on-bad-exit=1"] + ([f"--cpus-per-task={cpus}"] if cpus else [])
        # Each task names its rank and node before it becomes the trainer (exec: signals reach Python directly).
        where = 'echo "[cloze] rank $SLURM_PROCID/$SLURM_NTASKS local $SLURM_LOCALID on $SLURMD_NODENAME"; exec "$@"'
        launch = shlex.join(srun + ["bash", "-c", where, "cloze-rank"] + train)
        rendezvous = ""
        sbatch_tasks = spec.tasks_per_node
        cpus_line = f"#SBATCH --cpus-per-task={cpus}" if cpus else ""
        note = "srun: one task per rank"
    else:
        # One torchrun per node. It must not die of the ranks' USR1 (Python's default action is to exit): ignored
        # here, the setting is inherited by the ranks, whose trainer installs its own handler.
        node_cpus = cpus * spec.tasks_per_node
        inner = ("trap \"\" USR1; exec " + shlex.join(train[:1]) + " -m torch.distributed.run"
                 f" --nnodes={spec.nodes} --nproc-per-node={spec.tasks_per_node}"
                 ' --node-rank="$SLURM_NODEID" --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" '
                 + shlex.join(train[1:]))
        srun = ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=1"] + (
            [f"--cpus-per-task={node_cpus}"] if node_cpus else [])
        launch = shlex.join(srun + ["bash", "-c", inner])
        rendezvous = (
            'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)\n'
            f"export MASTER_PORT=$({py} -c 'import os; from launch.train.dist import slurm_port; "
            "print(slurm_port(os.environ[\"SLURM_JOB_ID\"]))')\n"
            'echo "[cloze] torchrun rendezvous at $MASTER_ADDR:$MASTER_PORT"')
        sbatch_tasks = 1
        cpus_line = f"#SBATCH --cpus-per-task={node_cpus}" if node_cpus else ""
        note = f"torchrun: one task per node, {spec.tasks_per_node} ranks each"
    values = {
        "config": shlex.join([config, *overrides]),
        "nodes": str(spec.nodes),
        "tasks_per_node": str(spec.tasks_per_node),
        "sbatch_tasks_per_node": str(sbatch_tasks),
        "launcher_note": note,
        "signal_seconds": str(spec.signal_seconds),
        "job_name": spec.job_name,
        "log": shlex.quote(str(log_dir(out_dir) / "slurm-%j.out")),
        "comment": make_comment("pretrain", max_steps=max_steps, out_dir=Path(out_dir).resolve()),
        "sbatch_options": "\n".join(x for x in (cpus_line, _sbatch_lines(spec, gpus=True)) if x),
        "workdir": shlex.quote(str(workdir)),
        "setup": "\n".join(spec.setup),
        "omp_threads": str(max(1, cpus)),
        "accelerator_env": "" if spec.gpus_per_node else "export DS_ACCELERATOR=cpu  # no GPUs: gloo on CPU",
        "rendezvous": rendezvous,
        "launch": launch,
    }
    return fill((TEMPLATES / "pretrain.sbatch").read_text(), values)


def render_export(checkpoint: str, out: str, spec: JobSpec, extra_args: list[str] = (),
                  workdir: str | Path | None = None) -> str:
    """The sbatch script that exports `checkpoint` to a Hugging Face folder `out` on one node."""
    workdir = Path(workdir or Path.cwd()).resolve()
    for name, value in (("--checkpoint", checkpoint), ("--out", out), ("the working directory", str(workdir)),
                        *(("export option", a) for a in extra_args)):
        check_one_line(name, value)
    out_abs = (workdir / out).resolve()
    cpus = spec.cpus_per_task
    values = {
        "checkpoint": shlex.quote(checkpoint),
        "out": shlex.quote(out),
        "export_args": "".join(" " + shlex.quote(a) for a in extra_args),
        "job_name": spec.job_name,
        "log": shlex.quote(str(out_abs.parent / "slurm" / f"export-{out_abs.name}-%j.out")),
        "comment": make_comment("export", out=out_abs),
        "sbatch_options": "\n".join(x for x in (f"#SBATCH --cpus-per-task={cpus}" if cpus else "",
                                                _sbatch_lines(spec, gpus=False)) if x),
        "workdir": shlex.quote(str(workdir)),
        "setup": "\n".join(spec.setup),
        "omp_threads": str(max(1, cpus)),
        "python": shlex.quote(spec.python),
    }
    return fill((TEMPLATES / "export.sbatch").read_text(), values)
