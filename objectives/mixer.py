"""The objective mixer: which objective builds micro-batch `step`.

choose(step) is a pure function of (seed, step, weights): every rank computes the same answer with
no communication, and resuming needs nothing but the step. The draw is the low-discrepancy
sequence u_step = frac(offset(seed) + step / golden ratio) (a Weyl sequence, in exact 64-bit integer
arithmetic) rather than independent uniforms: with weights w the count of objective i among any N
consecutive steps stays within O(log N) of N * w_i, so the realised mix tracks the config at every
horizon (independent draws miss a 2% band over 1,000 steps about once in five seeds). The seed sets
the phase of the sequence.

Weights are any non-negative numbers (not all zero), normalised. A schedule lists (step, weights)
knots after step 0; the normalised weights move linearly from knot to knot, starting from
`weights` at step 0, and stay at the last knot's afterwards. An objective missing from a knot has
weight 0 there. To hold the weights and then ramp, repeat them at the step where the ramp starts. With
between="hold" the weights move step-wise instead: each knot's weights hold until the next knot (a curriculum that
switches objectives, e.g. causal first and masked after).

record(name, batch) counts batches, tokens and labels per objective for logging; the counts go into
state_dict() (plain JSON types) so that they survive a resume.
"""

from __future__ import annotations

import copy
import difflib
import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from objectives.batch import Batch
from objectives.common import GOLDEN64, mix64
from objectives.registry import OBJECTIVES

_MIXER_DOMAIN = 0x6D697865  # keeps the phase apart from other users of mix64(seed, ...)
_TWO64 = float(1 << 64)
BETWEEN = ("linear", "hold")
"""How the weights move from one schedule knot to the next."""


def _check_weights(where: str, weights: Any, known: Collection[str] | None, problems: list[str]) -> None:
    if not isinstance(weights, Mapping) or not weights:
        problems.append(f"{where}: weights must be a non-empty mapping of objective name to weight, got {weights!r}")
        return
    total = 0.0
    ok = True
    for name, w in weights.items():
        if known is not None and name not in known:
            close = difflib.get_close_matches(str(name), sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append(f"{where}: unknown objective {name!r}{hint} (valid: {', '.join(sorted(known))})")
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            problems.append(f"{where}: weight of {name!r} must be a number, got {w!r}")
            ok = False
        elif math.isnan(w) or math.isinf(w):
            problems.append(f"{where}: weight of {name!r} is {w}; weights must be finite")
            ok = False
        elif w < 0:
            problems.append(f"{where}: weight of {name!r} is negative ({w})")
            ok = False
        else:
            total += float(w)
    if ok and total <= 0.0:
        problems.append(f"{where}: all weights are zero; at least one must be positive")


class Mixer:
    """Deterministic, resumable choice of the objective per step; see the module docstring."""

    def __init__(
        self,
        weights: Mapping[str, float],
        seed: int,
        schedule: Sequence[tuple[int, Mapping[str, float]]] | None = None,
        known: Collection[str] | None = None,
        between: str = "linear",
    ) -> None:
        """weights: objective name -> weight at step 0. seed: sets the phase (same on all ranks).
        schedule: (step, weights) knots, steps increasing and > 0. known: the valid names
        (default: the registry's objectives). between: "linear" (interpolate from knot to knot) or "hold"
        (each knot's weights until the next knot)."""
        if known is None:
            known = OBJECTIVES.keys()
        problems: list[str] = []
        if between not in BETWEEN:
            problems.append(f"between: must be one of {', '.join(BETWEEN)}, got {between!r}")
        _check_weights("weights", weights, known, problems)
        knots: list[tuple[int, Mapping[str, float]]] = [(0, weights)]
        previous = 0
        for i, knot in enumerate(schedule or []):
            if not isinstance(knot, Sequence) or len(knot) != 2:
                problems.append(f"schedule[{i}]: expected (step, weights), got {knot!r}")
                continue
            step, knot_weights = knot
            if isinstance(step, bool) or not isinstance(step, int) or step <= previous:
                problems.append(f"schedule[{i}]: step {step!r} must be an integer greater than {previous}")
            else:
                previous = step
            _check_weights(f"schedule[{i}] (step {step})", knot_weights, known, problems)
            knots.append((step, knot_weights))
        if problems:
            raise ValueError("invalid objective mix: " + "; ".join(problems))
        self.seed = int(seed)
        self.between = between
        self.names: tuple[str, ...] = tuple(sorted({n for _, w in knots for n in w}))
        """Objective names in a fixed (sorted) order, so every rank cuts [0, 1) the same way."""
        self._config = {
            "seed": self.seed,
            "weights": {n: float(w) for n, w in weights.items()},
            "schedule": [[s, {n: float(v) for n, v in w.items()}] for s, w in knots[1:]],
        }
        if between != "linear":  # absent under the default, so a linear mix's state is what it always was
            self._config["between"] = between
        self._steps = [s for s, _ in knots]
        self._probs = []
        for _, w in knots:
            total = float(sum(w.values()))
            self._probs.append([float(w.get(n, 0.0)) / total for n in self.names])
        self._offset = mix64(_MIXER_DOMAIN, self.seed)
        self._counts = {n: {"batches": 0, "tokens": 0, "labels": 0} for n in self.names}

    def weights_at(self, step: int) -> dict[str, float]:
        """Normalised weights in force at `step`."""
        if step < 0:
            raise ValueError(f"Mixer: step={step} must be >= 0")
        steps, probs = self._steps, self._probs
        if step >= steps[-1]:
            row = probs[-1]
        else:
            i = max(k for k, s in enumerate(steps) if s <= step)
            if self.between == "hold":
                row = probs[i]
            else:
                t = (step - steps[i]) / (steps[i + 1] - steps[i])
                row = [a + (b - a) * t for a, b in zip(probs[i], probs[i + 1])]
        return dict(zip(self.names, row))

    def uniform(self, step: int) -> float:
        """The draw in [0, 1) for `step`: frac(offset + step / golden ratio)."""
        if step < 0:
            raise ValueError(f"Mixer: step={step} must be >= 0")
        return ((self._offset + step * GOLDEN64) & ((1 << 64) - 1)) / _TWO64

    def choose(self, step: int) -> str:
        """The objective for `step`; identical on every rank for the same (seed, step)."""
        u = self.uniform(step)
        cumulative = 0.0
        last_positive = None
        for name, w in self.weights_at(step).items():
            if w > 0.0:
                last_positive = name
                cumulative += w
                if u < cumulative:
                    return name
        assert last_positive is not None, "weights were validated to have a positive entry"
        return last_positive  # u within rounding of 1.0

    def record(self, name: str, batch: Batch) -> None:
        """Count one batch of objective `name` (its tokens and labels) for logging."""
        if name not in self._counts:
            raise ValueError(f"Mixer.record: unknown objective {name!r} (mixed: {', '.join(self.names)})")
        counts = self._counts[name]
        counts["batches"] += 1
        counts["tokens"] += int(batch.input_ids.numel())
        counts["labels"] += batch.num_labels

    def counts(self) -> dict[str, dict[str, int]]:
        """Per objective: batches, tokens and labels recorded so far (a copy)."""
        return copy.deepcopy(self._counts)

    def realised(self) -> dict[str, float]:
        """Fraction of recorded batches per objective (0.0 each before any)."""
        total = sum(c["batches"] for c in self._counts.values())
        return {n: (c["batches"] / total if total else 0.0) for n, c in self._counts.items()}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable: the configuration it was built with and the recorded counts."""
        return {"version": 1, **copy.deepcopy(self._config), "counts": self.counts()}

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> None:
        """Restore the counts. With strict, a checkpoint written under another seed, other weights
        or another schedule is a ValueError naming each difference (the choices would not continue
        the old sequence); strict=False accepts a deliberately changed mix."""
        if state.get("version") != 1:
            raise ValueError(f"Mixer state has version {state.get('version')!r}; this code reads version 1")
        if strict:
            diffs = [
                f"{key}: checkpoint {state.get(key, default)!r} vs config {self._config.get(key, default)!r}"
                for key, default in (("seed", None), ("weights", None), ("schedule", None), ("between", "linear"))
                if _jsonish(state.get(key, default)) != _jsonish(self._config.get(key, default))
            ]
            if diffs:
                raise ValueError(
                    "mixer config differs from the checkpoint (" + "; ".join(diffs) + "); "
                    "restore the old config or load with strict=False"
                )
        counts = {n: {"batches": 0, "tokens": 0, "labels": 0} for n in self.names}
        for name, c in state.get("counts", {}).items():
            if name in counts:
                counts[name] = {k: int(c[k]) for k in ("batches", "tokens", "labels")}
            elif strict:
                raise ValueError(f"Mixer state counts objective {name!r}, which this mix does not have")
        self._counts = counts


def _jsonish(value: Any) -> Any:
    """Tuples as lists, so a state that went through JSON compares equal to the live one."""
    if isinstance(value, Mapping):
        return {k: _jsonish(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonish(v) for v in value]
    return value
