"""Knot schedules: config values that move during a run (the objective mix, an objective's masking rate, the mix
of data sources).

In YAML a schedulable value is one of

    rate: 0.15                                  # a constant
    rate: [[0, 0.30], [100%, 0.15]]             # linear from knot to knot
    rate: {linear: [[0, 0.30], [100%, 0.15]]}   # the same, spelt out
    rate: {hold: [[0, 0.30], [50%, 0.15]]}      # step-wise: each knot's value holds until the next knot

A knot is `[at, value]`. `at` is either an integer optimizer step or a share of train.max_steps written with a
percent sign ("75%", "12.5%"), resolved to round-half-up(share x max_steps). A bare fraction such as 0.75 is refused:
an integer always means a step and a percent sign always a share, so a knot never changes meaning with max_steps'
type. The value of a knot at step s applies from the optimizer step that follows s completed steps (the log's step
s + 1): `[[75%, ...]]` in a 20-step run leaves the first 15 steps before the knot. Resolved positions must strictly
increase. Before the first knot the first value holds, after the last knot the last value.

Where schedules are read:
- `objectives.params.<objective>.<parameter>`: any float parameter of an objective (mlm.rate, span.rate,
  mask_frac, prefix.min_frac, ...). Each micro-batch gets the value at its fractional step, step + micro/grad_accum.
- `objectives.schedule`: knots of the objective mix after step 0 (objectives.mix is the mix at step 0), values are
  weight mappings like objectives.mix. Weights are normalised per knot and the shares move between knots; an
  objective missing from a knot has weight 0 there. The mixer follows it per micro-batch (objectives/mixer.py).
- `data.schedule`: knots of the data-source mix after step 0 (data.sources is the mix at step 0), values are
  weight mappings over data.sources' keys, e.g. {hold: [[90%, {runs/web: 0.3, runs/books: 0.7}]]}. A source
  missing from a knot has weight 0 there. The trainer turns each knot's step into a global row (step x the
  global batch, micro x accum x world rows) and the loader picks each global row's source so that every
  source's realised share follows the scheduled weight row by row (data/order.py, MixSchedule).

- `train.batch_warmup`: micro-batches per optimizer step (gradient accumulation) as a schedule, e.g.
  [[0, 1], [10%, 8]] ramps from 1 to 8 (a value is rounded down to a whole count) and {hold: [[0, 2], [5%, 4]]}
  steps. Values lie in 1..train.grad_accum: the engine is built for train.grad_accum (ZeRO's gradient accumulation
  buffers and bucket sizes are those of the largest batch), and the micro-batch never changes, so memory never
  grows and a compiled layer (train.compile) sees one shape throughout. With `train.lr_follows: tokens` the LR
  schedule runs on the share of the run's tokens seen instead of the step count (a small early batch then moves
  through the warm-up more slowly).

Every value is a pure function of the step, so a resumed run continues the same values exactly: nothing about a
schedule is kept in a checkpoint (the mixer's own state still records the mix knots and refuses a changed mix).
data/ and objectives/ never import this module: the trainer evaluates the schedules and hands plain values on.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from launch.config import RunConfig
    from launch.train.phases import Phase
    from objectives.mixer import Mixer
    from objectives.registry import Objective

BETWEEN = ("linear", "hold")
"""How a schedule moves from one knot to the next."""
_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")
SYNTAX = "[[0, 0.30], [100%, 0.15]] (linear) or {hold: [[0, 0.30], [50%, 0.15]]}"
"""The short reminder every schedule error ends with."""

Value = float | dict[str, float]


@dataclass(frozen=True)
class Knot:
    step: int
    """Resolved optimizer step."""
    written: str
    """The position as the config wrote it ("75%" or "15"), for messages and the dry-run table."""
    value: Value


@dataclass(frozen=True)
class Schedule:
    """A validated schedule: value_at(step) is a pure function of the (possibly fractional) optimizer step."""

    key: str
    """The dotted config key, e.g. objectives.params.mlm.rate."""
    knots: tuple[Knot, ...]
    between: str = "linear"

    def value_at(self, step: float, before: bool = False) -> Value:
        """The value at `step`; with before, the value just before it (a hold schedule's previous knot's value when
        a knot sits at `step`: where a phase ends)."""
        knots = self.knots
        i = _last_at_or_before(knots, step)
        if before and self.between == "hold" and i > 0 and knots[i].step == step:
            i -= 1
        if i < 0:
            return knots[0].value
        if self.between == "hold" or i == len(knots) - 1:
            return knots[i].value
        a, b = knots[i], knots[i + 1]
        t = (step - a.step) / (b.step - a.step)
        if isinstance(a.value, dict):
            names = sorted(set(a.value) | set(b.value))
            return {n: a.value.get(n, 0.0) + (b.value.get(n, 0.0) - a.value.get(n, 0.0)) * t for n in names}
        return a.value + (b.value - a.value) * t

    @property
    def constant(self) -> bool:
        return len({repr(k.value) for k in self.knots}) == 1


def _last_at_or_before(knots: tuple[Knot, ...], step: float) -> int:
    i = -1
    for k, knot in enumerate(knots):
        if knot.step <= step:
            i = k
    return i


def resolve_at(at: Any, max_steps: int) -> int | str:
    """A knot position as a step, or a problem text (a str) saying what is wrong with it."""
    if isinstance(at, bool):
        return f"position {at!r} is neither a step nor a share"
    if isinstance(at, int):
        return at if at >= 0 else f"step {at} is negative"
    if isinstance(at, float):
        return (f"position {at!r} is ambiguous: write a share of train.max_steps with a percent sign "
                f"('{at * 100:g}%') or an integer step")
    if isinstance(at, str) and (m := _PERCENT.match(at)):
        share = Fraction(m.group(1))
        if share > 100:
            return f"position {at!r} lies after the run's end (100%)"
        return math.floor(share * max_steps / 100 + Fraction(1, 2))
    return f"position {str(at)[:40]!r} must be an integer step or a share like '75%'"


def is_schedule(raw: Any) -> bool:
    """Whether a parameter's value is written as a schedule: a knot list or a {linear|hold: knots} mapping (an
    objective's parameters are otherwise plain scalars, so any list or mapping is read as one, and parse names
    what is wrong with it)."""
    return isinstance(raw, (list, Mapping))


def parse(key: str, raw: Any, max_steps: int, problems: list[str], weights: bool = False,
          first_step: int = 0, mix_key: str = "objectives.mix", noun: str = "objective") -> Schedule | None:
    """The schedule `raw` at config key `key`, or None with a line per problem appended to `problems`.

    weights: knot values are weight mappings (of `noun`s, like `mix_key`; checked by their user later), else
    finite numbers. first_step: the lowest step a knot may sit at (1 for a mix schedule, whose step 0 is
    `mix_key`)."""
    from launch.config import shown

    between = "linear"
    knots_raw = raw
    if isinstance(raw, Mapping):
        if len(raw) != 1 or next(iter(raw)) not in BETWEEN:
            problems.append(f"{key}: a schedule mapping has one key, linear or hold, got {shown(raw)}; e.g. {SYNTAX}")
            return None
        between, knots_raw = next(iter(raw.items()))
    if not isinstance(knots_raw, list) or not knots_raw:
        problems.append(f"{key}: expected a non-empty list of [at, value] knots, got {shown(knots_raw)}; "
                        f"e.g. {SYNTAX}")
        return None
    knots: list[Knot] = []
    before = len(problems)
    for i, knot in enumerate(knots_raw):
        where = f"{key}[{i}]"
        if not isinstance(knot, list) or len(knot) != 2:
            problems.append(f"{where}: a knot is [at, value], got {shown(knot)}; e.g. {SYNTAX}")
            continue
        at, value = knot
        step = resolve_at(at, max_steps)
        if isinstance(step, str):
            problems.append(f"{where}: {step}")
            continue
        if step < first_step:
            problems.append(f"{where}: the knot at {at} comes before step {first_step}; {mix_key} is the mix at "
                            f"step 0, so {key} lists the knots after it")
            continue
        if weights:
            if not isinstance(value, Mapping):
                problems.append(f"{where}: the value must be a mapping of {noun} weights like {mix_key}, "
                                f"got {shown(value)}")
                continue
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            problems.append(f"{where}: the value must be a finite number, got {shown(value)}")
            continue
        if knots and step <= knots[-1].step:
            problems.append(f"{where}: position {at} (step {step}) does not come after the previous knot's "
                            f"({knots[-1].written}, step {knots[-1].step}) with train.max_steps={max_steps}; "
                            f"knot positions must strictly increase")
            continue
        knots.append(Knot(step, str(at), dict(value) if weights else float(value)))
    if len(problems) > before:
        return None
    return Schedule(key, tuple(knots), between)


def _fields(objective: str) -> set[str]:
    """The parameters of objective `objective` (none for an unknown name: the mixer names that mistake)."""
    from objectives import OBJECTIVES

    spec = OBJECTIVES.get(objective)
    return {f.name for f in dataclasses.fields(spec.config)} if spec else set()


def _schedulable(objective: str) -> set[str]:
    """Float parameters of objective `objective`: the ones a schedule may move."""
    from objectives import OBJECTIVES

    spec = OBJECTIVES.get(objective)
    return {f.name for f in dataclasses.fields(spec.config) if "float" in str(f.type)} if spec else set()


@dataclass
class RunSchedules:
    """Every schedule of one run, parsed from a validated config; see the module docstring."""

    mix: Mapping[str, float]
    """objectives.mix: the weights at step 0."""
    mix_schedule: Schedule | None
    """objectives.schedule, or None for a fixed mix."""
    params: dict[str, dict[str, Any]]
    """Per objective, its fixed parameters (a schedule's value at step 0 in their place)."""
    moving: dict[str, dict[str, Schedule]]
    """Per objective, its scheduled parameters."""
    max_steps: int
    grad_accum: int
    data_mix: Mapping[str, float] = dataclasses.field(default_factory=dict)
    """data.sources: the source weights at step 0 (empty: one source)."""
    data_schedule: Schedule | None = None
    """data.schedule, or None for a fixed source mix."""
    accum: Schedule | None = None
    """train.batch_warmup, or None: every step accumulates grad_accum micro-batches."""
    lr_follows: str = "steps"
    shape: tuple[Phase, ...] = ()
    """data.seq_len_phases after the first phase (launch/train/phases.py); () for one shape throughout."""
    rope: tuple[float, float] = (160000.0, 10000.0)
    """The model's own (global, local) RoPE bases, which the phases override from their start."""
    _sums: Any = None  # per step from 0 to max_steps: micro-batches, rows per rank, tokens per rank before it

    def accum_at(self, step: int) -> int:
        """Micro-batches accumulated in optimizer step `step` (0-based)."""
        if self.accum is None:
            return self.grad_accum
        return max(1, min(self.grad_accum, math.floor(self.accum.value_at(step))))  # type: ignore[arg-type]

    def phase_at(self, step: int) -> Phase:
        """The shape of optimizer step `step` (0-based)."""
        current = self.shape[0]
        for phase in self.shape:
            if phase.step <= step:
                current = phase
        return current

    def rope_at(self, step: int) -> tuple[float, float]:
        """(global, local) RoPE bases of optimizer step `step`."""
        from launch.train.phases import rope_at

        return rope_at(self.shape, step, *self.rope)

    def _before(self, step: int, column: int) -> int:
        """Per rank, micro-batches (column 0), rows (1) or tokens (2) of all the steps before `step`."""
        import numpy as np

        if self._sums is None:
            per_step = np.zeros((self.max_steps, 3), dtype=np.int64)
            for s in range(self.max_steps):
                accum, phase = self.accum_at(s), self.phase_at(s)
                per_step[s] = (accum, accum * phase.micro_batch_size, accum * phase.micro_batch_size * phase.seq_len)
            self._sums = np.concatenate([np.zeros((1, 3), dtype=np.int64), np.cumsum(per_step, axis=0)])
        if step <= self.max_steps:
            return int(self._sums[step, column])
        accum, phase = self.accum_at(step), self.phase_at(step)
        last = (accum, accum * phase.micro_batch_size, accum * phase.micro_batch_size * phase.seq_len)[column]
        return int(self._sums[-1, column]) + (step - self.max_steps) * last

    def micro_start(self, step: int) -> int:
        """Micro-batches of all the steps before `step`: the mixer's index of (step, micro 0)."""
        return step * self.grad_accum if self.accum is None else self._before(step, 0)

    def rows_before(self, step: int, world: int) -> int:
        """Global rows of all the steps before `step` on `world` ranks: where step `step` starts in the loader."""
        return self._before(step, 1) * world

    def tokens_before(self, step: int, world: int) -> int:
        return self._before(step, 2) * world

    def shape_knots(self, world: int) -> list[tuple[int, int, int]]:
        """data.seq_len_phases for the loader: (global row, seq_len, rows per rank) of every phase after the first."""
        return [(self.rows_before(p.step, world), p.seq_len, p.micro_batch_size) for p in self.shape[1:]]

    def lr_progress(self, step: int) -> float:
        """The step the LR schedule is at after `step` optimizer steps: the step itself, or with lr_follows=tokens
        the same share of max_steps as the share of the run's tokens seen (the batch warm-up and the phases move
        the tokens per step)."""
        if self.lr_follows != "tokens" or (self.accum is None and len(self.shape) < 2):
            return float(step)
        return self.tokens_before(step, 1) * self.max_steps / self.tokens_before(self.max_steps, 1)

    @property
    def names(self) -> list[str]:
        """Every objective the mix can choose over the run, in the order first named."""
        out = list(self.mix)
        for knot in self.mix_schedule.knots if self.mix_schedule else ():
            out += [n for n in knot.value if n not in out]
        return out

    def mix_knots(self) -> list[tuple[int, dict[str, float]]]:
        """The mix as (step, weights) knots from step 0: objectives.mix, then objectives.schedule's."""
        return [(0, dict(self.mix))] + [(k.step, dict(k.value)) for k in (self.mix_schedule.knots
                                                                           if self.mix_schedule else ())]

    def shares_at(self, step: float, before: bool = False) -> dict[str, float]:
        """The normalised mix at `step` (what the mixer draws from); before: see Schedule.value_at."""
        knots = [Knot(s, str(s), _normalised(w)) for s, w in self.mix_knots()]
        between = self.mix_schedule.between if self.mix_schedule else "linear"
        value = Schedule("objectives.mix", tuple(knots), between).value_at(step, before)
        assert isinstance(value, dict)
        return {n: value.get(n, 0.0) for n in self.names}

    def data_shares_at(self, step: float, before: bool = False) -> dict[str, float]:
        """The normalised source mix at `step` (the loader interpolates per global row; this is its value at the
        step's first row)."""
        assert self.data_schedule is not None
        knots = [Knot(0, "0", _normalised(self.data_mix))]
        knots += [Knot(k.step, k.written, _normalised(k.value)) for k in self.data_schedule.knots]  # type: ignore
        value = Schedule("data.sources", tuple(knots), self.data_schedule.between).value_at(step, before)
        assert isinstance(value, dict)
        return {n: value.get(n, 0.0) for n in self.data_mix}

    def data_knots(self, world: int) -> tuple[list[tuple[int, dict[str, float]]], str]:
        """data.schedule for the loader: (global row, {source: weight}) knots after row 0 on `world` ranks, and how
        the weights move between knots. No knots: the data.sources weights hold."""
        if self.data_schedule is None:
            return [], "linear"
        return ([(self.rows_before(k.step, world), dict(k.value))  # type: ignore[arg-type]
                 for k in self.data_schedule.knots], self.data_schedule.between)

    def mixer(self, seed: int) -> Mixer:
        """The mixer over micro-steps (micro_start(step) + micro): the mix knots moved to micro-steps, so the
        mixer's interpolation equals shares_at(step + micro / accum_at(step))."""
        from objectives.mixer import Mixer

        knots = self.mix_knots()
        between = self.mix_schedule.between if self.mix_schedule else "linear"
        return Mixer(knots[0][1], seed=seed, schedule=[(self.micro_start(s), w) for s, w in knots[1:]],
                     between=between)

    def objectives(self, mode_tokens: bool) -> dict[str, Objective]:
        """Each objective with its fixed parameters (scheduled ones at their step-0 value)."""
        from objectives import build_objective

        return {n: build_objective(n, self.params.get(n, {}), mode_tokens=mode_tokens) for n in self.names}

    def objective_at(self, base: Objective, step: int, micro: int) -> Objective:
        """`base` with its scheduled parameters at micro-batch (step, micro); `base` itself when none moves."""
        moving = self.moving.get(base.name)
        if not moving:
            return base
        at = step + micro / self.accum_at(step)
        values = {p: s.value_at(at) for p, s in moving.items()}
        return dataclasses.replace(base, config=dataclasses.replace(base.config, **values))

    def values_at(self, step: int) -> dict[str, float]:
        """Every scheduled value at `step`, keyed for TensorBoard: mix/<name> (the share, when the mix moves) and
        <objective>.<parameter>. Empty when nothing is scheduled."""
        if not (self.mix_schedule or self.moving or self.data_schedule or self.accum or len(self.shape) > 1):
            return {}
        out = self._values(step)
        return out if self.mix_schedule else {k: v for k, v in out.items() if not k.startswith("mix/")}

    def boundaries(self) -> list[int]:
        """Steps in [0, max_steps) where some schedule has a knot, with 0: the starts of the run's phases."""
        every = [k.step for k in self.mix_schedule.knots] if self.mix_schedule else []
        every += [k.step for m in self.moving.values() for s in m.values() for k in s.knots]
        every += [k.step for k in self.data_schedule.knots] if self.data_schedule else []
        every += [k.step for k in self.accum.knots] if self.accum else []
        every += [p.step for p in self.shape]
        return sorted({0, *(s for s in every if s < self.max_steps)})

    def phases(self) -> list[tuple[int, int, dict[str, float], dict[str, float]]]:
        """(first step, end step, values at the first step, values where the phase ends) per phase; the end step
        is the next phase's first (or max_steps): where a linear ramp arrives, while a held value stays."""
        starts = self.boundaries()
        ends = starts[1:] + [self.max_steps]
        return [(a, b, self._values(a), self._values(b, before=True)) for a, b in zip(starts, ends)]

    def _values(self, step: float, before: bool = False) -> dict[str, float]:
        out = {f"mix/{n}": v for n, v in self.shares_at(step, before).items()}
        for name, moving in self.moving.items():
            out.update({f"{name}.{p}": float(s.value_at(step, before))  # type: ignore[arg-type]
                        for p, s in moving.items()})
        if self.data_schedule:
            out.update({f"data/{n}": v for n, v in self.data_shares_at(step, before).items()})
        at = max(0, math.ceil(step) - 1) if before else int(step)  # a step's own value: its phase holds to its end
        if self.accum:
            out["train.grad_accum"] = float(self.accum_at(at))
        if len(self.shape) > 1:
            phase = self.phase_at(at)
            out["data.seq_len"], out["train.micro_batch_size"] = float(phase.seq_len), float(phase.micro_batch_size)
            if any(p.global_rope_theta is not None or p.local_rope_theta is not None for p in self.shape):
                out["model.global_rope_theta"], out["model.local_rope_theta"] = self.rope_at(at)
        return out


def _normalised(weights: Mapping[str, float]) -> dict[str, float]:
    total = float(sum(weights.values()))
    return {n: float(w) / total for n, w in weights.items()}


def build(cfg: RunConfig, problems: list[str] | None = None, data: bool = True) -> RunSchedules | None:
    """The run's schedules. With `problems`, append one line per problem and return None when there are any;
    without, a problem raises ConfigError (the config was validated, so that is a programming error). data=False
    leaves data.schedule out (check_schedules: check_data_schedule reports its problems)."""
    from launch.config import ConfigError
    from launch.train.phases import parse_phases

    own: list[str] = [] if problems is None else problems
    before = len(own)
    o, t = cfg.objectives, cfg.train
    max_steps = max(1, t.max_steps)
    mix_schedule = None
    if o.schedule is not None:
        mix_schedule = parse("objectives.schedule", o.schedule, max_steps, own, weights=True, first_step=1)
    params: dict[str, dict[str, Any]] = {}
    moving: dict[str, dict[str, Schedule]] = {}
    for name, raw in o.params.items():
        if not isinstance(raw, Mapping):
            own.append(f"objectives.params.{name}: expected a mapping of its parameters, e.g. {{rate: 0.3}}, "
                       f"got {raw!r:.80}")
            continue
        params[name] = dict(raw)
        for param, value in raw.items():
            if not is_schedule(value):
                continue
            key = f"objectives.params.{name}.{param}"
            if param in _fields(name) - _schedulable(name):
                own.append(f"{key}: only a number parameter can follow a schedule; give it one value")
                continue
            schedule = parse(key, value, max_steps, own)
            if schedule is not None:
                moving.setdefault(name, {})[param] = schedule
                params[name][param] = schedule.value_at(0)
    data_schedule = _data_schedule(cfg, own) if data else None
    shape = parse_phases(cfg, own if data else [])  # data=False: check_phases reports its problems
    accum = None
    if t.batch_warmup is not None:
        accum = parse("train.batch_warmup", t.batch_warmup, max_steps, own)
        for i, knot in enumerate(accum.knots if accum else ()):
            if not 1 <= knot.value <= t.grad_accum:  # type: ignore[operator]
                own.append(f"train.batch_warmup[{i}]: {knot.value:g} micro-batches per step lies outside 1.."
                           f"{t.grad_accum}; train.grad_accum is the largest accumulation (the engine is built "
                           f"for it): raise it or lower the knot")
    if len(own) > before:
        if problems is None:
            raise ConfigError(own)
        return None
    return RunSchedules(dict(o.mix), mix_schedule, params, moving, max_steps, max(1, t.grad_accum),
                        {str(k): float(v) for k, v in cfg.data.sources.items()}, data_schedule,
                        accum, t.lr_follows, shape, _model_rope(cfg))


def _model_rope(cfg: RunConfig) -> tuple[float, float]:
    """The config's (global, local) RoPE bases, or EncoderConfig's defaults (with model.init_from the trainer puts
    the folder's in their place)."""
    from model.config import EncoderConfig

    fields = EncoderConfig.__dataclass_fields__
    g, loc = cfg.model.global_rope_theta, cfg.model.local_rope_theta
    return (float(g if g is not None else fields["global_rope_theta"].default),
            float(loc if loc is not None else fields["local_rope_theta"].default))


def _data_schedule(cfg: RunConfig, problems: list[str]) -> Schedule | None:
    """data.schedule parsed, its knot values checked against data.sources; None with problems appended."""
    from launch.config import _suggest, shown

    d = cfg.data
    if d.schedule is None:
        return None
    if not d.sources:
        problems.append("data.schedule: moves the weights of data.sources, which is empty; list the sources with "
                        "their step-0 weights, e.g. data.sources={runs/web: 0.7, runs/books: 0.3}")
        return None
    before = len(problems)
    schedule = parse("data.schedule", d.schedule, max(1, cfg.train.max_steps), problems, weights=True,
                     first_step=1, mix_key="data.sources", noun="source")
    names = [str(k) for k in d.sources]
    raw = d.schedule
    if isinstance(raw, Mapping) and len(raw) == 1:
        raw = next(iter(raw.values()))
    # Every knot's weights, also those of a knot whose position is wrong: all problems in one error.
    for i, knot in enumerate(raw if isinstance(raw, list) else []):
        if not (isinstance(knot, list) and len(knot) == 2 and isinstance(knot[1], Mapping)):
            continue  # parse named it
        where = f"data.schedule[{i}]"
        for name, weight in knot[1].items():
            if str(name) not in names:
                problems.append(f"{where}: unknown source {shown(name)}{_suggest(str(name), names)}; a knot weighs "
                                f"the keys of data.sources")
            elif isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (
                    math.isfinite(weight) and weight >= 0):
                problems.append(f"{where}.{name}: weight must be a number >= 0, got {shown(weight)}")
        if not any(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w > 0
                   for w in knot[1].values()):
            problems.append(f"{where}: every weight is 0 (or missing); give at least one source a weight > 0")
    if len(problems) > before or schedule is None:
        return None
    knots = tuple(Knot(k.step, k.written, {str(n): float(w) for n, w in k.value.items()})  # type: ignore[union-attr]
                  for k in schedule.knots)
    return Schedule(schedule.key, knots, schedule.between)


def check_data_schedule(cfg: RunConfig) -> list[str]:
    """data.schedule's problems (knot syntax, source names, weights), one line each."""
    problems: list[str] = []
    _data_schedule(cfg, problems)
    return problems


def check_schedules(cfg: RunConfig) -> list[str]:
    """The schedules' problems (train.batch_warmup) and the objectives section's: the mix and its
    schedule, each objective's parameters, and every scheduled parameter at every knot of its objective (the
    parameters' constraints are intervals and sums, so a value valid at every knot is valid between them too)."""
    from launch.config import warn
    from objectives import OBJECTIVES, build_objective
    from objectives.mixer import Mixer

    problems: list[str] = []
    o = cfg.objectives
    run = build(cfg, problems, data=False)
    if run is None:
        return problems
    try:
        Mixer(dict(o.mix), seed=cfg.train.seed)
        if run.mix_schedule:  # knot steps are optimizer steps here, as in the config
            Mixer(dict(o.mix), seed=cfg.train.seed, schedule=run.mix_knots()[1:], between=run.mix_schedule.between)
    except ValueError as e:
        key = "objectives.schedule" if "schedule[" in str(e) else "objectives.mix"
        problems.append(f"{key}: {e}")
    names = run.names
    for name in o.params:
        if name not in names:
            warn(f"objectives.params.{name} is ignored: '{name}' is not in objectives.mix"
                 + (" or objectives.schedule" if o.schedule is not None else ""))
    for name in names:
        if name not in OBJECTIVES:
            continue  # the mixer already reported it, with the nearest valid name
        moving = run.moving.get(name, {})
        steps = sorted({0, *(k.step for s in moving.values() for k in s.knots)})
        for step in steps:
            params = {**run.params.get(name, {}), **{p: s.value_at(step) for p, s in moving.items()}}
            try:
                build_objective(name, params, mode_tokens=o.mode_tokens)
            except (ValueError, TypeError) as e:
                at = f" at step {step} (a knot of its schedule)" if moving else ""
                problems.append(f"objectives.{name}{at}: {e}")
                break
    return problems
