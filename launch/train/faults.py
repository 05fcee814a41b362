"""Fault injection: the failures the tests make happen on purpose, read from the environment once at start.

A `Faults` is built by `Faults.from_env` when the trainer starts and handed to the trainer and the checkpoint
writer; nothing reads the environment again. With none of the variables set it is inert (`Faults()`), and each
hook below is then a set lookup or a comparison with None.

    CLOZE_FAULT_NAN_STEPS=3,5        rank 0's loss of the first micro-batch of steps 3 and 5 becomes NaN
    CLOZE_FAULT_NAN_GRAD_STEPS=5     rank 0's gradient becomes NaN under a finite loss on step 5 (first micro-batch)
    CLOZE_FAULT_PID_DIR=DIR          each rank writes DIR/rank{r}.pid at start, so a test can SIGKILL one rank
    CLOZE_FAULT_CKPT_KILL=POINT:STEP SIGKILL rank 0 inside the save of step STEP at POINT (one of FAULT_POINTS)
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

FAULT_POINTS = ("after_deepspeed", "after_state", "before_latest")
"""Where CLOZE_FAULT_CKPT_KILL=<point>:<step> SIGKILLs rank 0 inside checkpoint.save (tests of an interrupted save):
after DeepSpeed's files, after cloze's JSON state, and just before `latest` moves."""


def _steps(text: str) -> frozenset[int]:
    return frozenset(int(s) for s in text.split(",") if s.strip())


@dataclass(frozen=True)
class Faults:
    rank: int = 0
    nan_loss_steps: frozenset[int] = frozenset()
    """Steps (1-based) whose first micro-batch's loss rank 0 turns into NaN."""
    nan_grad_steps: frozenset[int] = frozenset()
    """Steps (1-based) whose first micro-batch's gradient rank 0 turns into NaN, the loss staying finite."""
    pid_dir: Path | None = None
    """Where each rank writes rank{r}.pid."""
    ckpt_kill: str | None = None
    """'<point>:<step>': where rank 0 dies inside a checkpoint save."""

    @classmethod
    def from_env(cls, rank: int, environ: Mapping[str, str] = os.environ) -> Faults:
        pid_dir = environ.get("CLOZE_FAULT_PID_DIR")
        return cls(rank=rank, nan_loss_steps=_steps(environ.get("CLOZE_FAULT_NAN_STEPS", "")),
                   nan_grad_steps=_steps(environ.get("CLOZE_FAULT_NAN_GRAD_STEPS", "")),
                   pid_dir=Path(pid_dir) if pid_dir else None,
                   ckpt_kill=environ.get("CLOZE_FAULT_CKPT_KILL") or None)

    def _hit(self, steps: frozenset[int], step: int, micro: int) -> bool:
        return step in steps and micro == 0 and self.rank == 0

    def write_pid(self) -> None:
        if self.pid_dir is not None:
            (self.pid_dir / f"rank{self.rank}.pid").write_text(str(os.getpid()))

    def loss(self, loss: torch.Tensor, step: int, micro: int) -> torch.Tensor:
        """The loss of micro-batch `micro` of step `step` (1-based), NaN where CLOZE_FAULT_NAN_STEPS says so."""
        return loss * float("nan") if self._hit(self.nan_loss_steps, step, micro) else loss

    @contextlib.contextmanager
    def gradient(self, weight: torch.Tensor, step: int, micro: int) -> Iterator[None]:
        """Around a backward: where CLOZE_FAULT_NAN_GRAD_STEPS says so, `weight`'s gradient becomes NaN."""
        if not self._hit(self.nan_grad_steps, step, micro):
            yield
            return
        hook = weight.register_hook(lambda g: g * float("nan"))
        try:
            yield
        finally:
            hook.remove()

    def checkpoint_point(self, point: str, step: int) -> None:
        """Inside checkpoint.save: rank 0 dies here when CLOZE_FAULT_CKPT_KILL names this point and step."""
        if self.ckpt_kill is not None and self.rank == 0 and self.ckpt_kill == f"{point}:{step}":
            print(f"[cloze] fault injection: SIGKILL rank 0 at {point} of the step-{step} checkpoint",
                  file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


NO_FAULTS = Faults()
