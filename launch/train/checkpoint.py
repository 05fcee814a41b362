"""Checkpoints: DeepSpeed's tag directory plus cloze's own JSON state, and a `latest` pointer moved atomically.

Layout of <out_dir>/checkpoints:
    step_00000200/            DeepSpeed's model/optimizer shards (one file per rank under ZeRO)
        run.json              resolved config, encoder config, token ids, world size (rank 0)
        trainer_state_rank{r}.json   step, tokens, loader and mixer state of rank r
        tokenizer/            the SentencePiece model and HF tokenizer files, so export needs nothing else
    latest                    the tag of the newest complete checkpoint, written last

Every file and directory of a checkpoint is fsynced before `latest` moves, and `latest` itself after: a power
loss or a node crash cannot leave `latest` naming a checkpoint whose files never reached the disk.

A tag dir newer than `latest` is the remains of an interrupted save (a kill, a full disk): resume ignores it with
a warning; the next successful save removes it if it is incomplete, and a save of the same step replaces it.
CLOZE_FAULT_CKPT_KILL=<point>:<step> kills rank 0 inside `save` (launch/train/faults.py), so tests can prove this.

Our state is JSON, never pickle, so reading a checkpoint cannot run code through our files. Reading a checkpoint
(resume, export) is launch/train/checkpoint_read.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch.distributed as dist

from launch.train.faults import NO_FAULTS, Faults

TAG_RE = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def fsync_path(path: Path) -> None:
    """Flush one file or directory (its entries) to the disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file under root, then every directory bottom-up, root last. Each rank runs it after its own
    writes (on a shared file system a rank can only flush what its own node wrote), so every file is flushed at
    least by its writer; another rank's `.tmp` file may be renamed away meanwhile, and is skipped."""
    dirs = [root]
    for d, subdirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                fsync_path(Path(d, name))
        dirs.extend(Path(d, s) for s in subdirs)
    for d in reversed(dirs):
        with contextlib.suppress(FileNotFoundError):
            fsync_path(d)


def step_of(tag: str) -> int:
    m = TAG_RE.match(tag)
    assert m, tag
    return int(m.group(1))


def partial_tags(ckpt_dir: Path, latest: str | None) -> list[str]:
    """Tag dirs newer than `latest` (all of them when there is no `latest`): a save that never finished, because
    `latest` moves only after every rank has written everything."""
    if not ckpt_dir.is_dir():
        return []
    newest = step_of(latest) if latest else -1
    return sorted(d.name for d in ckpt_dir.iterdir()
                  if d.is_dir() and TAG_RE.match(d.name) and step_of(d.name) > newest)


def is_complete(tag_dir: Path) -> bool:
    """run.json and every rank's trainer state are there (DeepSpeed's files are written before ours)."""
    try:
        world = int(json.loads((tag_dir / "run.json").read_text())["world_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return all((tag_dir / f"trainer_state_rank{r}.json").is_file() for r in range(world))


def _warn_partial(ckpt_dir: Path, latest: str | None) -> None:
    partial = partial_tags(ckpt_dir, latest)
    if partial and os.environ.get("RANK", "0") == "0":
        print(f"[cloze] warning: ignoring incomplete checkpoint(s) {', '.join(partial)} in {ckpt_dir} (newer than "
              f"`latest` = {latest}: a save was interrupted, or `latest` was moved back); the next saves replace them",
              file=sys.stderr, flush=True)


def read_latest(ckpt_dir: Path, warn: bool = True) -> str | None:
    """The tag named by `latest`, or None when there is no checkpoint yet. Warns about partial tag dirs."""
    f = ckpt_dir / "latest"
    if not f.is_file():
        if warn:
            _warn_partial(ckpt_dir, None)
        return None
    tag = f.read_text().strip()
    if not TAG_RE.match(tag) or not (ckpt_dir / tag).is_dir():
        raise ValueError(f"{f} names {tag!r}, which is not a checkpoint directory in {ckpt_dir}; "
                         f"point it at an existing step_XXXXXXXX directory or delete it to start over")
    if warn:
        _warn_partial(ckpt_dir, tag)
    return tag


def resolve_checkpoint(path: str | Path) -> tuple[Path, str]:
    """Accept a checkpoints dir (uses `latest`), a run dir (its checkpoints/), or a tag dir; return (dir, tag)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint path not found: {p}")
    if TAG_RE.match(p.name) and p.is_dir():
        return p.parent, p.name
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    tag = read_latest(p)
    if tag is None:
        raise FileNotFoundError(f"no checkpoint in {p}: no `latest` file (was the training run finished?)")
    return p, tag


class CheckpointWriteError(ValueError):
    """A checkpoint could not be written (disk full, quota, I/O error). A ValueError so the CLI reports it as one
    line and exit code 2: the fix is on the user's side (free space), and the previous checkpoint is intact."""


def _write_error(e: BaseException) -> bool:
    """True for failures of the storage. torch.save reports a full disk as a RuntimeError from its C++ writer,
    worded by where the write failed: "unexpected pos" (inside a record) or "basic_ios::clear: iostream error" (at
    the end of the file, seen when the disk filled on the second of two ranks); tests/test_faults_disk.py makes
    both on /dev/full."""
    if isinstance(e, OSError):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(k in text for k in ("write failed", "no space", "file write",
                                                                   "unexpected pos", "iostream error"))


def save(engine, ckpt_dir: Path, step: int, rank_state: dict, run_info: dict, tokenizer_dir: Path, keep: int,
         faults: Faults = NO_FAULTS) -> str:
    """Collective: every rank calls it. Returns the tag. `faults` may kill rank 0 at one of its points (tests)."""
    tag = tag_for(step)
    rank = dist.get_rank()
    tag_dir = ckpt_dir / tag
    # A leftover of an interrupted save of this same step would mix old and new files: remove it first.
    if rank == 0 and tag_dir.is_dir() and tag != read_latest(ckpt_dir, warn=False):
        shutil.rmtree(tag_dir, ignore_errors=True)
    dist.barrier()
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)
        faults.checkpoint_point("after_deepspeed", step)
        write_json_atomic(tag_dir / f"trainer_state_rank{rank}.json", rank_state)
        if rank == 0:
            write_json_atomic(tag_dir / "run.json", run_info)
            dst = tag_dir / "tokenizer"
            if dst.exists():
                shutil.rmtree(dst)
            shutil.copytree(tokenizer_dir, dst)
        faults.checkpoint_point("after_state", step)
        fsync_tree(tag_dir)
    except (OSError, RuntimeError) as e:
        if not _write_error(e):
            raise
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0][:120]
        try:  # torch's writer hides ENOSPC behind "unexpected pos"; the free space says what happened
            reason += f"; {shutil.disk_usage(ckpt_dir).free / 2**20:.1f} MiB free there"
        except OSError:
            pass
        previous = (ckpt_dir / "latest").read_text().strip() if (ckpt_dir / "latest").is_file() else None
        kept = (f"the previous checkpoint {previous} is intact and `latest` still names it" if previous
                else "there is no earlier checkpoint")
        raise CheckpointWriteError(f"could not write checkpoint {tag_dir} ({reason}); {kept}. Free space in "
                                   f"{ckpt_dir} (or lower train.keep_checkpoints) and run again to resume") from None
    # `latest` moves only once every rank has finished writing, so a crash mid-save leaves the previous one valid.
    dist.barrier()
    if rank == 0:
        faults.checkpoint_point("before_latest", step)
        fsync_path(ckpt_dir)  # the tag directory's own entry
        tmp = ckpt_dir / "latest.tmp"
        tmp.write_text(tag)
        fsync_path(tmp)
        os.replace(tmp, ckpt_dir / "latest")
        fsync_path(ckpt_dir)
        prune(ckpt_dir, keep)
    dist.barrier()
    return tag


def prune(ckpt_dir: Path, keep: int) -> None:
    tags = sorted(d.name for d in ckpt_dir.iterdir() if d.is_dir() and TAG_RE.match(d.name))
    latest = read_latest(ckpt_dir, warn=False)
    for tag in tags[:-keep] if keep > 0 else []:
        if tag != latest:
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
    # Incomplete leftovers of an interrupted save go. A complete one newer than `latest` stays: someone may have
    # pointed `latest` back on purpose (a roll-back), and `save` replaces it when training reaches that step again.
    for tag in partial_tags(ckpt_dir, latest):
        if not is_complete(ckpt_dir / tag):
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
    universal = ckpt_dir / "universal"  # conversions made for a world-size change (launch/train/resume.py)
    if universal.is_dir():
        for d in universal.iterdir():
            if not (ckpt_dir / d.name).is_dir():
                shutil.rmtree(d, ignore_errors=True)

