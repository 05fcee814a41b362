"""Resolve deepspeed_config.json against the training config: one source of truth for batch sizes.

The file may say "auto" for train_batch_size, train_micro_batch_size_per_gpu, gradient_accumulation_steps,
gradient_clipping and bf16.enabled; those are filled from the training config. A number that disagrees with the
training config or the world size is an error that prints every number involved.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from launch.config import ConfigError, RunConfig


def resolve_precision(precision: str, has_gpu: bool) -> str:
    if precision == "auto":
        return "bf16" if has_gpu else "fp32"
    return precision


def read_deepspeed_config(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"DeepSpeed config not found: {p} (set train.deepspeed_config)"])
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError([f"not valid JSON: {e}"], str(p)) from None
    if not isinstance(data, dict):
        raise ConfigError(["top level must be a JSON object"], str(p))
    return data


def resolve_deepspeed_config(cfg: RunConfig, world_size: int, precision: str) -> dict[str, Any]:
    """Return the engine config to pass to deepspeed.initialize, or raise ConfigError listing every mismatch."""
    path = cfg.train.deepspeed_config
    raw = read_deepspeed_config(path)
    ds = copy.deepcopy(raw)
    t = cfg.train
    micro, accum = t.micro_batch_size, t.grad_accum
    want = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
    }
    problems: list[str] = []
    for key, value in want.items():
        got = ds.get(key, "auto")
        if got == "auto":
            ds[key] = value
        elif got != value:
            problems.append(f"{key}={got!r} but the training config gives {value}")
    if problems:
        problems.append(
            f"batch arithmetic: micro_batch_size {micro} x grad_accum {accum} x world size {world_size} = "
            f"{micro * accum * world_size}; set these keys to \"auto\" (recommended) or to these numbers"
        )
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = t.grad_clip
    elif ds["gradient_clipping"] != t.grad_clip:
        problems.append(f"gradient_clipping={ds['gradient_clipping']} but train.grad_clip={t.grad_clip}")
    for key in ("optimizer", "scheduler"):
        if key in ds:
            problems.append(f"'{key}' section: cloze builds AdamW and the LR schedule from train.*; remove it")
    if (ds.get("fp16") or {}).get("enabled") in (True, "auto"):
        problems.append("fp16 is not supported (loss scaling); use train.precision=bf16")
    bf16 = ds.setdefault("bf16", {})
    if bf16.get("enabled", "auto") == "auto":
        bf16["enabled"] = precision == "bf16"
    elif bool(bf16["enabled"]) != (precision == "bf16"):
        problems.append(f"bf16.enabled={bf16['enabled']} but train.precision resolves to {precision}")
    zero = ds.setdefault("zero_optimization", {})
    if t.zero_stage is not None:
        zero["stage"] = t.zero_stage
    if zero.get("stage", 0) not in (0, 1, 2, 3):
        problems.append(f"zero_optimization.stage must be 0-3, got {zero.get('stage')}")
    if problems:
        raise ConfigError(problems, str(path))
    ds.setdefault("steps_per_print", 10**9)
    return ds
