"""Preemption: USR1 or SIGTERM -> checkpoint at the next step boundary -> requeue (under Slurm) -> exit.

The handler only sets a flag: saving inside a signal handler would interrupt a collective half-way. At each step
boundary every rank contributes its flag to an all-reduce (max), so a signal that reached one rank stops all of
them at the same step: some clusters signal only the batch step's first task, some send SIGTERM to all.
"""

from __future__ import annotations

import os
import signal
import sys

import torch
import torch.distributed as dist

HANDLED = (signal.SIGUSR1, signal.SIGTERM)


class Preemption:
    def __init__(self, rank: int, device: torch.device):
        self.rank, self.device = rank, device
        self.signal_name: str | None = None
        self._flag = False
        self._previous = {}
        for sig in HANDLED:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if not self._flag:
            self._flag = True
            self.signal_name = signal.Signals(signum).name
            print(f"[cloze] rank {self.rank}: {self.signal_name} received; checkpointing at the next step boundary",
                  file=sys.stderr, flush=True)

    def requested(self) -> bool:
        """Collective (every rank calls it at the same step): True when any rank has been signalled."""
        flag = torch.tensor([1.0 if self._flag else 0.0], device=self.device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def after_checkpoint(self) -> bool:
        """Rank 0 asks Slurm to requeue this job (its processes are then stopped by Slurm). Returns True if asked."""
        job = os.environ.get("SLURM_JOB_ID")
        if self.rank != 0 or not job:
            return False
        from launch.slurm.client import requeue

        # Print first: once Slurm accepts the requeue it stops srun, which carries our output.
        print(f"[cloze] requeueing Slurm job {job}; it resumes from `latest` when it starts again",
              file=sys.stderr, flush=True)
        requeue(job)
        return True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
