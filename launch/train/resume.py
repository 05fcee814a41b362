"""Resuming from `latest`, on the same or on a different world size.

Same world size: every rank reloads its own DeepSpeed partition and its own loader position: the run continues
exactly (bit for bit on CPU fp32).

Different world size (ZeRO 1-3): DeepSpeed cannot re-partition a ZeRO checkpoint by itself, so rank 0 converts it
once to DeepSpeed's *universal* format (`python -m deepspeed.checkpoint.ds_to_universal`, kept in
checkpoints/universal/<tag>) and every rank loads that, with `load_universal` switched on in the "checkpoint"
section of DeepSpeed's config. Weights, optimizer moments and the step count carry over. Stage 0 checkpoints hold
whole tensors and load on any world size directly.

The data position of a reshaped world: the row order does not depend on the world size or the number of loader
workers (data/rows.py), and every rank's saved position is the same global cursor, so the new ranks continue at
the exact next global row (`data.loader.Loader.load_reshaped` checks that the old ranks agree). Nothing is
skipped and nothing is read twice.

Checkpoints are not trusted (DESIGN.md, "Trust boundaries"): before the conversion every `.pt` file of the tag
directory must load under torch's restricted unpickler (tensors and the few plain DeepSpeed types of
launch/train/checkpoint.py's `restricted_torch_load`), and the conversion itself runs under that same
unpickler, so a planted pickle names its file and never runs. Before anything is loaded, the data the checkpoint
was trained on (the tokenizer's sha256 and each source's shard list) must be the data of this run; other changed
settings (max_steps, lr, cadences, ...) are printed, one line per key.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from launch.train import checkpoint
from launch.train.checkpoint import (
    check_weights_only,
    first_line,
    load_rank_state,
    load_run_info,
    restricted_torch_load,
    tampered_message,
)

CONVERT_TAMPERED_EXIT = 3
"""Exit code of `python -m launch.train.resume` when the restricted unpickler refused a file during the conversion."""


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


# -- the data a checkpoint was trained on ------------------------------------------------------------------------

def data_identity(tokenizer_sha256: str, sources: list[tuple[str, Any]]) -> dict:
    """What resuming must not change: the tokenizer's sha256 and, per source (spec, Manifest) in config order, a
    sha256 over its shard list (file names and their sha256s). Paths are not part of it: a moved dataset is the
    same data."""
    listed = []
    for spec, manifest in sources:
        shards = [[s.file, s.sha256] for s in manifest.shards]
        listed.append({"spec": spec, "shards": len(shards),
                       "sha256": hashlib.sha256(json.dumps(shards).encode()).hexdigest()})
    return {"tokenizer_sha256": tokenizer_sha256, "sources": listed}


def data_differences(saved: dict, current: dict) -> list[str]:
    """One entry per difference between two data_identity() results (empty when the data is the same)."""
    out = []
    if saved.get("tokenizer_sha256") != current["tokenizer_sha256"]:
        out.append(f"tokenizer sha256 {str(saved.get('tokenizer_sha256'))[:12]} -> "
                   f"{current['tokenizer_sha256'][:12]}")
    old, new = saved.get("sources"), current["sources"]
    old = old if isinstance(old, list) else []  # run.json is read from the checkpoint: take no shape on trust
    if len(old) != len(new):
        out.append(f"{len(old)} data source(s) -> {len(new)}")
    for i, (a, b) in enumerate(zip(old, new)):
        if not isinstance(a, dict) or (a.get("shards"), a.get("sha256")) != (b["shards"], b["sha256"]):
            a = a if isinstance(a, dict) else {}
            out.append(f"source {i + 1} ({a.get('spec')!s:.200} -> {b['spec']:.200}): {a.get('shards')} shards, "
                       f"list sha256 {str(a.get('sha256'))[:12]} -> {b['shards']} shards, {b['sha256'][:12]}")
    return out


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(_flat(v, key) if isinstance(v, dict) and v else {key: v})
    return out


def config_changes(saved: dict, current: dict) -> list[str]:
    """'key: old -> new' for every setting that differs between the checkpoint's config and this run's."""
    a, b = _flat(saved), _flat(json.loads(json.dumps(current, default=str)))  # tuples compare as saved (lists)
    return [f"{k}: {a.get(k, '(unset)')} -> {b.get(k, '(unset)')}" for k in sorted(set(a) | set(b))
            if k not in a or k not in b or a[k] != b[k]]


def check_same_data(info: dict, identity: dict, where: Path) -> bool:
    """Refuse (ValueError, every difference listed) to resume checkpoint `where` on other data than it was trained
    on. False when the checkpoint does not record its data (written by an older cloze): nothing to compare."""
    saved = info.get("data_identity")
    if not isinstance(saved, dict):
        return False
    diffs = data_differences(saved, identity)
    if diffs:
        raise ValueError(f"refusing to resume {where} on other data than it was trained on: {'; '.join(diffs)}. "
                         f"Point data.path (and data.sources) at the data of that run, or give this run another "
                         f"out_dir to start over")
    return True


# -- converting for another world size ---------------------------------------------------------------------

def to_universal(src: Path, dst: Path) -> None:
    """Convert one ZeRO tag directory to DeepSpeed's universal format (written aside, then renamed). The files are
    checked first, and DeepSpeed's converter runs (in a subprocess: it allocates a lot) under the same restricted
    unpickler, so no file can run code even if it changes between the check and the conversion."""
    check_weights_only(src)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "launch.train.resume", "--input_folder", str(src), "--output_folder", str(tmp)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        lines = proc.stderr.strip().splitlines()
        if proc.returncode == CONVERT_TAMPERED_EXIT and lines:
            raise ValueError(lines[-1])
        raise RuntimeError(f"converting {src} to a universal checkpoint failed:\n" + "\n".join(lines[-5:]))
    os.replace(tmp, dst)


def _convert_main(argv: list[str]) -> int:
    """`python -m launch.train.resume --input_folder TAG_DIR --output_folder DIR`: DeepSpeed's ds_to_universal (one
    worker, no process pool) with every torch.load it makes going through the restricted unpickler."""
    ap = argparse.ArgumentParser(prog="python -m launch.train.resume")
    ap.add_argument("--input_folder", required=True)
    ap.add_argument("--output_folder", required=True)
    args = ap.parse_args(argv)
    from deepspeed.checkpoint import ds_to_universal

    sys.argv = ["ds_to_universal", "--input_folder", args.input_folder, "--output_folder", args.output_folder,
                "--num_extract_workers", "1", "--num_merge_workers", "1", "--inject_missing_state"]
    try:
        with restricted_torch_load():
            ds_to_universal.main(ds_to_universal.parse_arguments())
    except pickle.UnpicklingError as e:
        print(tampered_message(Path(args.input_folder), first_line(e)), file=sys.stderr, flush=True)
        return CONVERT_TAMPERED_EXIT
    return 0


# -- the plan ----------------------------------------------------------------------------------------------------

def plan_resume(ckpt_dir: Path, world: int, rank: int, ds_config: dict, identity: dict | None = None,
                config: dict | None = None) -> ResumePlan | None:
    """Collective when the world size changed (rank 0 converts, all wait). May set ds_config['checkpoint'].
    With identity (data_identity() of this run), refuses other data; with config (this run's), rank 0 prints the
    settings that changed since the checkpoint."""
    tag = checkpoint.read_latest(ckpt_dir) if ckpt_dir.is_dir() else None
    if tag is None:
        return None
    info = load_run_info(ckpt_dir, tag)
    if identity is not None and not check_same_data(info, identity, ckpt_dir / tag) and rank == 0:
        print(f"[cloze] warning: {ckpt_dir / tag / 'run.json'} does not record the data it was trained on (an older "
              f"checkpoint); resuming without comparing it with data.path", file=sys.stderr, flush=True)
    if config is not None and rank == 0:
        for change in config_changes(info.get("config") or {}, config):
            print(f"[cloze] changed since {tag}: {change}", file=sys.stderr, flush=True)
    old_world = int(info["world_size"])
    if old_world == world:
        return ResumePlan(tag, ckpt_dir, old_world, [load_rank_state(ckpt_dir, tag, rank)], world)
    states = [load_rank_state(ckpt_dir, tag, r) for r in range(old_world)]
    if int(info.get("zero_stage", 0)) == 0:
        return ResumePlan(tag, ckpt_dir, old_world, states, world)
    universal = ckpt_dir / "universal"
    failure: Exception | None = None
    if rank == 0 and not (universal / tag).is_dir():
        print(f"[cloze] world size changed ({old_world} -> {world}): converting {ckpt_dir / tag} to a universal "
              f"checkpoint", file=sys.stderr, flush=True)
        try:
            to_universal(ckpt_dir / tag, universal / tag)
        except (ValueError, RuntimeError) as e:
            failure = e
    if dist.is_initialized():
        dist.barrier()
    if failure is not None:
        raise failure
    if not (universal / tag).is_dir():
        raise ValueError(f"{universal / tag} missing after rank 0's conversion; rank 0's message says why")
    ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    return ResumePlan(tag, universal, old_world, states, world)


if __name__ == "__main__":
    sys.exit(_convert_main(sys.argv[1:]))
