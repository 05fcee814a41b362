"""Optimizer and learning-rate schedule, built on the client side so DeepSpeed compiles no op on CPU."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from launch.config import TrainConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: norms (1-D weights) and biases are excluded, since decaying a norm's gain
    towards 0 fights the normalisation instead of regularising anything. The tied embedding is a matrix and decays."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, t: TrainConfig) -> torch.optim.Optimizer:
    """torch's AdamW with the fused kernel (one kernel over all parameters instead of several per tensor; torch
    has it for CUDA and for CPU, so the CPU tests run the same implementation the GPU does)."""
    return torch.optim.AdamW(param_groups(model, t.weight_decay), lr=t.lr, betas=t.betas, eps=1e-8, fused=True)


def lr_factor(step: int, t: TrainConfig) -> float:
    """Multiplier of t.lr for optimizer step `step` (0-based). Warm-up is linear from 1/warmup_steps (not 0, so the
    first step already trains) to 1; then, by t.schedule, a decay that reaches min_lr_ratio at max_steps:
    warmup_linear (linear), warmup_cosine (half cosine), wsd (flat at 1, then linear over the last decay_frac)."""
    if t.warmup_steps and step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    floor = t.min_lr_ratio
    if t.schedule == "wsd":
        decay_start = max(t.warmup_steps, t.max_steps - round(t.decay_frac * t.max_steps))
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, t.max_steps - decay_start))
        return 1.0 - (1.0 - floor) * progress
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    if t.schedule == "warmup_cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - (1.0 - floor) * progress


def build_scheduler(optimizer: torch.optim.Optimizer, t: TrainConfig,
                    progress: Callable[[int], float] | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """progress: where the schedule is after s optimizer steps (default s itself; under train.batch_warmup with
    train.lr_follows=tokens, the share of the run's tokens seen, in steps: launch/train/schedules.py)."""
    if progress is None:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, t))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(progress(s), t))
