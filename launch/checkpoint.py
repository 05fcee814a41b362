"""Checkpoints: DeepSpeed's tag directory plus cloze's own JSON state, and a `latest` pointer moved atomically.

Layout of <out_dir>/checkpoints:
    step_00000200/            DeepSpeed's model/optimizer shards (one file per rank under ZeRO)
        run.json              resolved config, encoder config, token ids, world size (rank 0)
        trainer_state_rank{r}.json   step, tokens, loader and mixer state of rank r
        tokenizer/            the SentencePiece model and HF tokenizer files, so export needs nothing else
    latest                    the tag of the newest complete checkpoint, written last

Our state is JSON, never pickle, so reading a checkpoint cannot run code through our files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

TAG_RE = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def read_latest(ckpt_dir: Path) -> str | None:
    """The tag named by `latest`, or None when there is no checkpoint yet."""
    f = ckpt_dir / "latest"
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    if not TAG_RE.match(tag) or not (ckpt_dir / tag).is_dir():
        raise ValueError(f"{f} names {tag!r}, which is not a checkpoint directory in {ckpt_dir}; "
                         f"point it at an existing step_XXXXXXXX directory or delete it to start over")
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


def save(engine, ckpt_dir: Path, step: int, rank_state: dict, run_info: dict, tokenizer_dir: Path, keep: int) -> str:
    """Collective: every rank calls it. Returns the tag."""
    tag = tag_for(step)
    rank = dist.get_rank()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)
    tag_dir = ckpt_dir / tag
    write_json_atomic(tag_dir / f"trainer_state_rank{rank}.json", rank_state)
    if rank == 0:
        write_json_atomic(tag_dir / "run.json", run_info)
        dst = tag_dir / "tokenizer"
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(tokenizer_dir, dst)
    # `latest` moves only once every rank has finished writing, so a crash mid-save leaves the previous one valid.
    dist.barrier()
    if rank == 0:
        tmp = ckpt_dir / "latest.tmp"
        tmp.write_text(tag)
        os.replace(tmp, ckpt_dir / "latest")
        prune(ckpt_dir, keep)
    dist.barrier()
    return tag


def prune(ckpt_dir: Path, keep: int) -> None:
    tags = sorted(d.name for d in ckpt_dir.iterdir() if d.is_dir() and TAG_RE.match(d.name))
    latest = read_latest(ckpt_dir)
    for tag in tags[:-keep] if keep > 0 else []:
        if tag != latest:
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
    universal = ckpt_dir / "universal"  # conversions made for a world-size change (launch/resume.py)
    if universal.is_dir():
        for d in universal.iterdir():
            if not (ckpt_dir / d.name).is_dir():
                shutil.rmtree(d, ignore_errors=True)


def load_rank_state(ckpt_dir: Path, tag: str, rank: int) -> dict:
    f = ckpt_dir / tag / f"trainer_state_rank{rank}.json"
    if not f.is_file():
        raise FileNotFoundError(f"{f} missing: checkpoint {tag} was written by a smaller world "
                                f"(resuming on a different world size is not supported yet)")
    return json.loads(f.read_text())


def load_run_info(ckpt_dir: Path, tag: str) -> dict:
    f = ckpt_dir / tag / "run.json"
    if not f.is_file():
        raise FileNotFoundError(f"{f} missing: {ckpt_dir / tag} is not a complete cloze checkpoint")
    return json.loads(f.read_text())
