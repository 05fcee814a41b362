"""Resuming from `latest`, on the same or on a different world size.

Same world size: every rank reloads its own DeepSpeed partition and its own loader position: the run continues
exactly (bit for bit on CPU fp32).

Different world size (ZeRO 1-3): DeepSpeed cannot re-partition a ZeRO checkpoint by itself, so rank 0 converts it
once to DeepSpeed's *universal* format (`python -m deepspeed.checkpoint.ds_to_universal`, kept in
checkpoints/universal/<tag>) and every rank loads that with `checkpoint.load_universal`. Weights, optimizer moments
and the step count carry over. Stage 0 checkpoints hold whole tensors and load on any world size directly.

The data position of a reshaped world: the old ranks' positions belong to a shard split that no longer exists,
so each source restarts the earliest epoch any old rank or worker had not finished, from its beginning, with the
new split (`data.loader.Loader.load_reshaped`). Nothing is skipped; what the old ranks had already read of that
epoch is read again (at most one epoch).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from launch import checkpoint


@dataclass
class ResumePlan:
    tag: str
    """The checkpoint being resumed (named by `latest`)."""
    load_dir: Path
    """Where DeepSpeed loads it from: the checkpoints dir, or checkpoints/universal for a reshaped world."""
    old_world: int
    """World size that wrote the checkpoint."""
    states: list[dict]
    """Every old rank's trainer state (a reshaped world needs all of them to map the data position)."""

    world: int
    """World size of this run."""

    @property
    def reshaped(self) -> bool:
        return self.old_world != self.world


def to_universal(src: Path, dst: Path) -> None:
    """Convert one ZeRO tag directory to DeepSpeed's universal format (written aside, then renamed)."""
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(src),
           "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1",
           "--inject_missing_state"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"converting {src} to a universal checkpoint failed:\n{tail}")
    os.replace(tmp, dst)


def plan_resume(ckpt_dir: Path, world: int, rank: int, ds_config: dict) -> ResumePlan | None:
    """Collective when the world size changed (rank 0 converts, all wait). May set ds_config['checkpoint']."""
    tag = checkpoint.read_latest(ckpt_dir) if ckpt_dir.is_dir() else None
    if tag is None:
        return None
    info = checkpoint.load_run_info(ckpt_dir, tag)
    old_world = int(info["world_size"])
    if old_world == world:
        return ResumePlan(tag, ckpt_dir, old_world, [checkpoint.load_rank_state(ckpt_dir, tag, rank)], world)
    states = [checkpoint.load_rank_state(ckpt_dir, tag, r) for r in range(old_world)]
    if int(info.get("zero_stage", 0)) == 0:
        return ResumePlan(tag, ckpt_dir, old_world, states, world)
    universal = ckpt_dir / "universal"
    error = ""
    if rank == 0 and not (universal / tag).is_dir():
        print(f"[cloze] world size changed ({old_world} -> {world}): converting {ckpt_dir / tag} to a universal "
              f"checkpoint", file=sys.stderr, flush=True)
        try:
            to_universal(ckpt_dir / tag, universal / tag)
        except RuntimeError as e:
            error = str(e)
    if dist.is_initialized():
        dist.barrier()
    if not (universal / tag).is_dir():
        raise RuntimeError(error or f"{universal / tag} missing after conversion")
    ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    return ResumePlan(tag, universal, old_world, states, world)

