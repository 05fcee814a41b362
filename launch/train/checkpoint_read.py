"""Reading a checkpoint: cloze's JSON state, and DeepSpeed's `.pt` files through torch's restricted unpickler.

The writing side and the layout are launch/train/checkpoint.py. Both resuming (launch/train/resume.py, the
trainer) and the export (launch/export/main.py) read through this module.

Checkpoints are not trusted (DESIGN.md, "Trust boundaries"): every torch.load here, DeepSpeed's own included, runs
under `restricted_torch_load`, which admits tensors and the three plain DeepSpeed types its files hold, so a planted
pickle names its file and never runs. cloze's own state is JSON.

Consolidation (the export, and tests comparing weights): `lazy_state_dict` maps a tag directory of any ZeRO stage
to EncoderForPretraining's keys without reading the tensors; `consolidate` materialises it in fp32. Stage 0 has no
ZeRO partitions: its weights sit whole in the model-states file, and a bf16 run's fp32 master weights in its
optimizer state (`_stage0_master`).
"""

from __future__ import annotations

import contextlib
import json
import pickle
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from launch.train.checkpoint import TAG_RE
from launch.train.dist import env_var

if TYPE_CHECKING:
    from model.config import EncoderConfig


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
