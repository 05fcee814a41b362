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

Writing (the trainer) and reading (resuming: launch/train/resume.py and the trainer; the export:
launch/export/main.py) both live here. cloze's own state is JSON, never pickle, so reading it cannot run code.

Checkpoints are not trusted (DESIGN.md, "Trust boundaries"): every torch.load here, DeepSpeed's own included, runs
under `restricted_torch_load`, which admits tensors and the three plain DeepSpeed types its files hold, so a planted
pickle names its file and never runs.

Consolidation (the export, and tests comparing weights): `lazy_state_dict` maps a tag directory of any ZeRO stage
to EncoderForPretraining's keys without reading the tensors; `consolidate` materialises it in fp32. Stage 0 has no
ZeRO partitions: its weights sit whole in the model-states file, and a bf16 run's fp32 master weights in its
optimizer state (`_stage0_master`).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from launch.train.dist import env_var
from launch.train.faults import NO_FAULTS, Faults

if TYPE_CHECKING:
    from model.config import EncoderConfig

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


def save(engine, ckpt_dir: Path, step: int, rank_state: dict, run_info: dict, tokenizer_model: bytes, keep: int,
         faults: Faults = NO_FAULTS) -> str:
    """Collective: every rank calls it. Returns the tag. `faults` may kill rank 0 at one of its points (tests).
    tokenizer_model: the SentencePiece model as the run read and checked it, kept as tokenizer/spm.model (only
    that file: the folder the data's manifest names is not copied, so nothing else in it reaches a checkpoint)."""
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
            dst.mkdir()
            (dst / "spm.model").write_bytes(tokenizer_model)
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


# -- reading -----------------------------------------------------------------------------------------------------
def first_line(e: BaseException) -> str:
    """The first line of an error, at most 200 characters (its type when it has no text)."""
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def tampered_message(what: Path, reason: str) -> str:
    return (f"refusing to load checkpoint {what}: a file holds objects other than tensors and plain DeepSpeed state "
            f"({reason[:200]}); it was not written by cloze's trainer or has been tampered with. Move it away to "
            f"start over.")


@contextlib.contextmanager
def restricted_torch_load() -> Iterator[None]:
    """Make every torch.load inside (DeepSpeed's included, which asks for weights_only=False) use torch's restricted
    unpickler, admitting only the three plain DeepSpeed types its optimizer files hold. Reading a checkpoint then
    cannot run code, whoever wrote it. DeepSpeed's progress prints go to stderr so stdout stays clean."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with env_var("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1"), \
            torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]), \
            contextlib.redirect_stdout(sys.stderr):
        yield


# -- cloze's JSON state --------------------------------------------------------------------------------------------

def load_rank_state(ckpt_dir: Path, tag: str, rank: int) -> dict:
    f = ckpt_dir / tag / f"trainer_state_rank{rank}.json"
    if not f.is_file():
        raise FileNotFoundError(f"{f} missing: {ckpt_dir / tag} is not a complete cloze checkpoint (every rank of "
                                f"the run that wrote it leaves its state there); point `latest` at an earlier "
                                f"checkpoint, or move this one away to start over")
    return json.loads(f.read_text())


def load_run_info(ckpt_dir: Path, tag: str) -> dict:
    f = ckpt_dir / tag / "run.json"
    if not f.is_file():
        raise FileNotFoundError(f"{f} missing: {ckpt_dir / tag} is not a complete cloze checkpoint")
    return json.loads(f.read_text())


def read_run_info(ckpt_dir: Path, tag: str) -> dict:
    """run.json, with a damaged file named in the error."""
    try:
        info = load_run_info(ckpt_dir, tag)
    except json.JSONDecodeError as e:
        raise ValueError(f"{ckpt_dir / tag / 'run.json'} is corrupt (not JSON: {e}); export an earlier "
                         "checkpoint") from None
    if not isinstance(info, dict):
        raise ValueError(f"{ckpt_dir / tag / 'run.json'} is corrupt (not a JSON object); export an earlier checkpoint")
    return info


# -- DeepSpeed's files -----------------------------------------------------------------------------------------------

def load_engine(engine: Any, load_dir: Path, tag: str) -> None:
    """Resume `engine` (weights, optimizer, scheduler) from load_dir/tag. DeepSpeed unpickles its .pt files with
    weights_only=False; under the restricted unpickler a planted payload cannot run code on resume."""
    try:
        with restricted_torch_load():
            load_path, _ = engine.load_checkpoint(str(load_dir), tag=tag)
    except pickle.UnpicklingError as e:
        raise ValueError(tampered_message(load_dir / tag, first_line(e))) from None
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed could not load {load_dir / tag}")


def check_weights_only(tag_dir: Path) -> None:
    """Every .pt file under tag_dir loads under the restricted unpickler; ValueError naming the first one that
    does not (a planted pickle, or a damaged file)."""
    import zipfile

    for f in sorted(tag_dir.rglob("*.pt")):
        try:
            with restricted_torch_load():
                # torch.save's zip files are memory-mapped (tensors are not read); anything else is a legacy or
                # foreign pickle, which the restricted unpickler reads as it is
                torch.load(f, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(f))
        except pickle.UnpicklingError as e:
            raise ValueError(tampered_message(f, first_line(e))) from None
        except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, EOFError... for damaged files
            raise ValueError(f"checkpoint file {f} is corrupt or unreadable ({first_line(e)}); move the checkpoint "
                             f"away to start over, or point `latest` at an earlier one") from None


def expected_files(zero_stage: int, world_size: int) -> list[str]:
    """Glob patterns of the DeepSpeed files a complete checkpoint of this stage and world holds, one per shard."""
    optim = [f"*zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world_size)]  # "bf16_" prefix or none
    if zero_stage == 0:
        return ["mp_rank_00_model_states.pt"]
    if zero_stage in (1, 2):
        return ["mp_rank_00_model_states.pt", *optim]
    return [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world_size)] + optim


def _load_pt(path: Path) -> Any:
    """A DeepSpeed file through the restricted unpickler, memory-mapped (tensors are read when used)."""
    try:
        with restricted_torch_load():
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError... for damaged files
        text = str(e).strip()
        reason = text.splitlines()[0].split(". ")[0][:200] if text else type(e).__name__
        raise ValueError(f"checkpoint file {path} is corrupt or unreadable ({reason}); export an earlier "
                         f"checkpoint or re-save this one") from None



def check_checkpoint(ckpt_dir: Path, tag: str, info: dict) -> None:
    """Every rank's shard present and readable; otherwise one error naming each missing or damaged file."""
    tag_dir = ckpt_dir / tag
    stage, world = int(info.get("zero_stage", -1)), int(info.get("world_size", 0))
    if stage not in (0, 1, 2, 3) or world < 1:
        raise ValueError(f"{tag_dir / 'run.json'}: zero_stage={info.get('zero_stage')!r} and "
                         f"world_size={info.get('world_size')!r} must be 0-3 and >= 1; is it a cloze checkpoint?")
    missing, found = [], []
    for pattern in expected_files(stage, world):
        hits = sorted(tag_dir.glob(pattern))
        if hits:
            found.extend(hits)
        else:
            missing.append(pattern.lstrip("*"))
    if not (tag_dir / "tokenizer" / "spm.model").is_file():
        missing.append("tokenizer/spm.model")
    if missing:
        others = sorted(d.name for d in ckpt_dir.iterdir() if TAG_RE.match(d.name) and d.name != tag)
        hint = f"; export an earlier one ({', '.join(others)})" if others else ""
        raise ValueError(f"checkpoint {tag_dir} is incomplete (ZeRO stage {stage}, {world} ranks): missing "
                         f"{', '.join(missing)}; was the save interrupted?{hint}")
    for f in found:
        _load_pt(f)  # names the damaged file; mmap makes this cheap for large shards


def _stage0_master(state: dict, cfg: EncoderConfig) -> dict[str, torch.Tensor] | None:
    """fp32 master weights of a stage-0 bf16 run: DeepSpeed's bf16 wrapper keeps them in optimizer.fp32_groups,
    in the order of cloze's optimizer param groups (launch/train/optim.py). None when the module is already fp32."""
    from launch.train.optim import param_groups
    from model.heads import EncoderForPretraining

    groups = (state.get("optimizer") or {}).get("fp32_groups")
    if not groups:
        return None
    with torch.device("meta"):
        model = EncoderForPretraining(cfg)
    names = {}
    for name, p in model.named_parameters(remove_duplicate=True):
        names.setdefault(id(p), name)
    ordered = [[names[id(p)] for p in g["params"]] for g in param_groups(model, 0.0)]
    if [len(g) for g in ordered] != [len(g) for g in groups]:
        raise ValueError(f"stage-0 checkpoint holds {[len(g) for g in groups]} fp32 master tensors per param "
                         f"group, a model of run.json's shape has {[len(g) for g in ordered]}: another model shape")
    return {n: t for ns, ts in zip(ordered, groups) for n, t in zip(ns, ts)}


def lazy_state_dict(ckpt_dir: Path, tag: str, zero_stage: int, cfg: EncoderConfig | None = None) -> dict[str, Any]:
    """EncoderForPretraining keys -> fp32 tensors or DeepSpeed's lazy GatheredTensor (`.contiguous()` gives the
    tensor). Nothing is materialised: stage-0 and ZeRO-1/2 tensors are views of memory-mapped files (DeepSpeed
    concatenates ZeRO-1/2 partitions into one fp32 vector per param group), ZeRO-3 parameters are gathered on use."""
    if zero_stage == 0:
        state = _load_pt(ckpt_dir / tag / "mp_rank_00_model_states.pt")
        module = dict(state["module"])
        master = _stage0_master(state, cfg) if cfg is not None else None
        if master:
            module.update(master)
            module["head.decoder.weight"] = module["encoder.embeddings.tok_embeddings.weight"]  # tied
        return module
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        with restricted_torch_load():
            return dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag, lazy_mode=True))
    except (RuntimeError, ValueError, KeyError, IndexError) as e:
        raise ValueError(f"DeepSpeed could not consolidate {ckpt_dir / tag}: {str(e).splitlines()[0][:300]}") from None


def training_precision(ckpt_dir: Path, tag: str, zero_stage: int) -> str:
    """'bf16' or 'fp32', from the DeepSpeed config saved beside the weights (run.json may say 'auto')."""
    name = "zero_pp_rank_0_mp_rank_00_model_states.pt" if zero_stage == 3 else "mp_rank_00_model_states.pt"
    ds = _load_pt(ckpt_dir / tag / name).get("ds_config") or {}
    return "bf16" if (ds.get("bf16") or {}).get("enabled") else "fp32"


def check_shapes(lazy: dict[str, Any], cfg: EncoderConfig, source: Path) -> None:
    """Keys and shapes equal those of EncoderForPretraining(cfg), or a ValueError listing the differences."""
    from model.heads import EncoderForPretraining

    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in EncoderForPretraining(cfg).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in lazy.items()}
    problems = [f"{k} is {list(got[k])}, expected {list(want[k])}" for k in want if k in got and got[k] != want[k]]
    problems += [f"{k} missing" for k in want if k not in got]
    problems += [f"unexpected {k}" for k in got if k not in want]
    if problems:
        shown = "; ".join(problems[:4]) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")
        raise ValueError(f"checkpoint {source} holds weights of another model shape than its run.json encoder "
                         f"config (hidden {cfg.hidden_size}, {cfg.num_layers} layers, vocab {cfg.vocab_size}): "
                         f"{shown}")


def materialise(t: Any) -> torch.Tensor:
    return t.contiguous().float()


def consolidate(ckpt_dir: Path, tag: str, zero_stage: int) -> dict[str, torch.Tensor]:
    """fp32 state dict of EncoderForPretraining from a DeepSpeed checkpoint (every tensor in memory at once)."""
    from model.config import EncoderConfig

    ckpt_dir = Path(ckpt_dir)
    cfg = EncoderConfig.from_dict(read_run_info(ckpt_dir, tag)["encoder"])
    lazy = lazy_state_dict(ckpt_dir, tag, zero_stage, cfg)
    done: dict[int, torch.Tensor] = {}  # tied entries are one object: materialise once, keep them one tensor
    return {k: done.setdefault(id(v), materialise(v)) for k, v in lazy.items()}
