"""Sequence-length phases: the run's row length, micro-batch and RoPE bases as steps of a schedule.

    data:
      seq_len: 1024                      # the first phase
      seq_len_phases:
        - {at: 90%, seq_len: 8192, micro_batch_size: 4, global_rope_theta: 160000}

Each later phase starts at `at` (an optimizer step or a share of train.max_steps, as in launch/train/schedules.py)
and sets
- `seq_len`: tokens per row from then on (required; at most model.max_position_embeddings);
- `micro_batch_size`: rows per rank per forward pass. By default the tokens of a micro-batch stay those of the
  first phase (train.micro_batch_size x data.seq_len / seq_len, rounded down, at least 1), so activation memory
  stays about level while the attention's share of it grows;
- `global_rope_theta`, `local_rope_theta`: the RoPE bases of the global and local layers (ModernBERT's context
  extension moves the global base from 10000 to 160000). Left out: the previous phase's.

The loader switches at the phase's first global row: every source's packing goes on from where it stands at the
new length, so no document is lost or repeated (data/rows.py). The global batch in rows is micro_batch_size x
accumulation x world size, so it changes with the micro-batch; train.lr_follows=tokens lets the LR schedule follow
tokens rather than steps. DeepSpeed keeps its engine: the trainer sets the micro-batch (and the accumulation)
before the phase's first step, and the model's RoPE bases; the rotary tables are built per forward, so nothing
else changes. Under train.compile each compiled layer recompiles once for the new shape at the boundary. The
held-out evaluation keeps the first phase's shape throughout, so its figures stay comparable over the run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from launch.train.schedules import resolve_at

if TYPE_CHECKING:
    from launch.config import RunConfig

KEYS = ("at", "seq_len", "micro_batch_size", "global_rope_theta", "local_rope_theta")
"""The keys a phase may have."""
EXAMPLE = "[{at: 90%, seq_len: 8192, micro_batch_size: 4, global_rope_theta: 160000}]"


@dataclass(frozen=True)
class Phase:
    """One phase of the run's shape; the first is the config's data.seq_len and train.micro_batch_size."""

    step: int
    """Optimizer steps completed before the phase starts (its first step is step + 1 in the log)."""
    written: str
    """`at` as the config wrote it."""
    seq_len: int
    micro_batch_size: int
    global_rope_theta: float | None = None
    """None: the previous phase's (the model's own, in the first phase)."""
    local_rope_theta: float | None = None


def parse_phases(cfg: RunConfig, problems: list[str]) -> tuple[Phase, ...]:
    """The run's phases, the first one from data.seq_len and train.micro_batch_size; each problem of
    data.seq_len_phases appended to `problems` (then only the first phase is returned)."""
    d, t = cfg.data, cfg.train
    first = Phase(0, "0", d.seq_len, t.micro_batch_size)
    raw = d.seq_len_phases
    if raw is None or raw == []:
        return (first,)
    if not isinstance(raw, list):
        problems.append(f"data.seq_len_phases: must be a list of phases, e.g. {EXAMPLE}")
        return (first,)
    before = len(problems)
    phases = [first]
    max_steps = max(1, t.max_steps)
    for i, item in enumerate(raw):
        where = f"data.seq_len_phases[{i}]"
        if not isinstance(item, Mapping):
            problems.append(f"{where}: must be a mapping like {EXAMPLE[1:-1]}")
            continue
        phase = _phase(where, item, phases[-1], cfg, max_steps, problems)
        if phase is not None:
            phases.append(phase)
    return tuple(phases) if len(problems) == before else (first,)


def _phase(where: str, item: Mapping, previous: Phase, cfg: RunConfig, max_steps: int,
           problems: list[str]) -> Phase | None:
    from launch.config import _suggest, shown

    n = len(problems)
    for key in item:
        if key not in KEYS:
            problems.append(f"{where}.{key}: unknown key{_suggest(str(key), list(KEYS))}")
    step = resolve_at(item.get("at"), max_steps) if "at" in item else f"needs `at`, e.g. {EXAMPLE[1:-1]}"
    if isinstance(step, str):
        problems.append(f"{where}.at: {step}")
    elif not previous.step < step < max_steps:
        problems.append(f"{where}.at: step {step} ({shown(item['at'])}) must lie after the previous phase's start "
                        f"(step {previous.step}) and before train.max_steps={max_steps}")
    seq_len = item.get("seq_len")
    if not _whole(seq_len) or seq_len < 8:
        problems.append(f"{where}.seq_len: must be a whole number >= 8, got {shown(seq_len)}")
    else:
        problems.extend(_fits(where, seq_len, cfg))
    micro = item.get("micro_batch_size")
    if micro is not None and (not _whole(micro) or micro < 1):
        problems.append(f"{where}.micro_batch_size: must be a whole number >= 1, got {shown(micro)}")
    for key in ("global_rope_theta", "local_rope_theta"):
        value = item.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not (math.isfinite(value) and value > 0)):
            problems.append(f"{where}.{key}: must be a number > 0, got {shown(value)}")
    if len(problems) > n:
        return None
    if micro is None:  # the first phase's tokens per micro-batch
        micro = max(1, cfg.train.micro_batch_size * cfg.data.seq_len // seq_len)
    theta = {k: float(item[k]) if item.get(k) is not None else None for k in ("global_rope_theta", "local_rope_theta")}
    return Phase(int(step), str(item["at"]), int(seq_len), int(micro), **theta)  # type: ignore[arg-type]


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fits(where: str, seq_len: int, cfg: RunConfig) -> list[str]:
    """A phase's rows must fit the model's positions (with model.init_from, preflight checks the folder's)."""
    from model.config import EncoderConfig

    if cfg.model.init_from:
        return []
    max_pos = cfg.model.max_position_embeddings
    if max_pos is None:
        max_pos = EncoderConfig.__dataclass_fields__["max_position_embeddings"].default
    if seq_len > max_pos:
        return [f"{where}.seq_len={seq_len} exceeds model.max_position_embeddings={max_pos}; raise it (RoPE has no "
                f"learned positions, so the weights do not change)"]
    return []


def check_phases(cfg: RunConfig) -> list[str]:
    """data.seq_len_phases' problems, one line each."""
    problems: list[str] = []
    parse_phases(cfg, problems)
    return problems


def rope_at(phases: tuple[Phase, ...], step: int, global_theta: float, local_theta: float) -> tuple[float, float]:
    """The (global, local) RoPE bases at `step`: the model's, overridden by every phase started by then."""
    for phase in phases:
        if phase.step > step:
            break
        global_theta = phase.global_rope_theta if phase.global_rope_theta is not None else global_theta
        local_theta = phase.local_rope_theta if phase.local_rope_theta is not None else local_theta
    return global_theta, local_theta
