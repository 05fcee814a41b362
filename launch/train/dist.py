"""Distributed bootstrap: one function maps the launcher's environment onto torch's variables.

torchrun and the deepspeed launcher already set RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT. Under
`srun` only SLURM_* exist; we derive the torch variables from them. A bare `python -m launch.train` becomes a
one-process world on 127.0.0.1 (otherwise deepspeed falls back to MPI discovery and fails on mpi4py). Everything
after `bootstrap_env()` reads only the torch variables.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NoReturn


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    source: str
    """Which launcher the values came from: 'torchrun', 'slurm' or 'single'."""


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a Slurm hostlist such as 'n[1-2,5],gpu[01-02]-ib,login' into host names (zero padding kept)."""
    hosts: list[str] = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", hostlist):
        part = part.strip()
        if not part:
            continue
        pieces = re.split(r"(\[[^\]]*\])", part)
        names = [""]
        for piece in pieces:
            if piece.startswith("["):
                alts = []
                for rng in piece[1:-1].split(","):
                    lo, _, hi = rng.partition("-")
                    if hi:
                        width = len(lo)
                        alts += [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
                    else:
                        alts.append(lo)
                names = [n + a for n in names for a in alts]
            else:
                names = [n + piece for n in names]
        hosts += names
    return hosts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_port(job_id: str) -> int:
    """Every task of a job must agree on the port without talking; derive it from the job id (range 20000-39999)."""
    return 20000 + int(job_id) % 20000


def bootstrap_env(environ: dict[str, str] | None = None) -> DistEnv:
    """Fill RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT in `environ` (default os.environ) and return them."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        source = "torchrun"
        env.setdefault("LOCAL_RANK", env.get("LOCAL_RANK", "0"))
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", "29500")
    elif "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        # Inside an srun step: one task per GPU. (In the batch shell itself there is no step id; there we must not
        # pretend to be rank 0 of a world, which is how "every node believes it is rank 0" bugs start.)
        source = "slurm"
        env["RANK"] = env["SLURM_PROCID"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env["WORLD_SIZE"] = env.get("SLURM_NTASKS", "1")
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        env.setdefault("MASTER_ADDR", expand_hostlist(nodes)[0])
        env.setdefault("MASTER_PORT", str(slurm_port(env.get("SLURM_JOB_ID", "0"))))
    else:
        source = "single"
        env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"] = "0", "0", "1"
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    return DistEnv(
        rank=int(env["RANK"]),
        local_rank=int(env["LOCAL_RANK"]),
        world_size=int(env["WORLD_SIZE"]),
        master_addr=env["MASTER_ADDR"],
        master_port=int(env["MASTER_PORT"]),
        source=source,
    )


def exit_skipping_teardown(code: int) -> NoReturn:
    """Leave the process now with `code`, without the interpreter's teardown. Call it once everything the process
    writes is closed (and, in a distributed job, after destroy_process_group).

    Destroying library threads in that teardown (gloo's, DeepSpeed's CPU comm op's, even after
    destroy_process_group) now and then aborts a finished rank with "terminate called without an active
    exception": a complete run would be reported as a failed job."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@contextlib.contextmanager
def env_var(key: str, value: str) -> Iterator[None]:
    """Set one environment variable for the body, then restore it (or remove it, if it was unset)."""
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old
