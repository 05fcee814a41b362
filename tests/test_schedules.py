"""Knot schedules: values by step, the config's syntax and its errors, the mixer and objective parameters they
drive, and --dry-run's phase table of the shipped recipes."""

from __future__ import annotations

import pytest

from launch.config import ConfigError, load_config
from launch.train.schedules import Knot, Schedule, build, resolve_at
from objectives import Mixer
from tests.conftest import ROOT, run_cli

TINY = ROOT / "launch/configs/tiny.yaml"


def config(tmp_path, *overrides: str):
    return load_config(TINY, [f"data.path={tmp_path}", *overrides])


def problems_of(tmp_path, *overrides: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        config(tmp_path, *overrides)
    return e.value.problems


def test_linear_and_hold_values_by_step():
    knots = (Knot(4, "4", 0.3), Knot(8, "8", 0.1), Knot(12, "12", 0.2))
    linear, hold = Schedule("k", knots), Schedule("k", knots, "hold")
    assert [linear.value_at(s) for s in (0, 4, 6, 8, 10, 12, 99)] == pytest.approx([0.3, 0.3, 0.2, 0.1, 0.15, 0.2,
                                                                                     0.2])
    assert [hold.value_at(s) for s in (0, 4, 7.5, 8, 11, 12, 99)] == [0.3, 0.3, 0.3, 0.1, 0.1, 0.2, 0.2]
    assert hold.value_at(8, before=True) == 0.3 and linear.value_at(8, before=True) == 0.1


def test_positions_are_steps_or_percent_shares():
    assert resolve_at(7, 20) == 7
    assert resolve_at("75%", 20) == 15
    assert resolve_at("12.5%", 20) == 3  # 2.5 rounds half up, the same on every machine
    assert resolve_at("100%", 1500) == 1500
    assert "'75%'" in resolve_at(0.75, 20)  # a bare fraction is refused, naming the spelling to use
    assert "after the run's end" in resolve_at("150%", 20)
    assert "negative" in resolve_at(-1, 20)


def test_schedules_from_yaml_overrides(tmp_path):
    cfg = config(tmp_path, "objectives.mix={causal: 1}", "objectives.schedule={hold: [[75%, {mlm: 1}]]}",
                 "objectives.params.mlm.rate=[[0, 0.30], [100%, 0.15]]")
    run = build(cfg)
    assert run.names == ["causal", "mlm"]
    assert run.boundaries() == [0, 15]
    assert run.values_at(14) == {"mix/causal": 1.0, "mix/mlm": 0.0, "mlm.rate": pytest.approx(0.3 - 0.15 * 14 / 20)}
    assert run.values_at(15)["mix/mlm"] == 1.0
    assert build(config(tmp_path)).values_at(3) == {}  # nothing scheduled: nothing extra is logged


def test_every_schedule_problem_in_one_error(tmp_path):
    problems = problems_of(
        tmp_path, "objectives.mix={mlm: 1}",
        "objectives.schedule=[[0.5, {mlm: 1}], [0, {causal: 1}]]",
        "objectives.params.mlm.rate=[[0, 0.3], [50%, 0.2], [10, 0.1]]",
        "objectives.params.span.max_span=[[0, 3], [5, 6]]",
        "objectives.params.causal.x={ramp: [[0, 1]]}",
    )
    text = "\n".join(problems)
    assert len(problems) == 5, text
    assert "objectives.schedule[0]: position 0.5 is ambiguous: write a share of train.max_steps with a percent " \
           "sign ('50%') or an integer step" in text
    assert "objectives.schedule[1]: the knot at 0 comes before step 1; objectives.mix is the mix at step 0" in text
    assert "objectives.params.mlm.rate[2]: position 10 (step 10) does not come after the previous knot's (50%, " \
           "step 10)" in text
    assert "objectives.params.span.max_span[0]" not in text
    assert "objectives.params.causal.x: a schedule mapping has one key, linear or hold" in text


def test_values_out_of_range_at_a_knot_and_unknown_objectives_are_named(tmp_path):
    problems = problems_of(tmp_path, "objectives.mix={mlm: 1}", "objectives.params.mlm.rate=[[0, 0.3], [100%, 1.5]]",
                           "objectives.schedule=[[50%, {mlmm: 1}]]")
    text = "\n".join(problems)
    assert "objectives.mlm at step 20 (a knot of its schedule): MLMConfig.rate=1.5 must lie in (0, 1]" in text
    assert "objectives.schedule: invalid objective mix: schedule[0] (step 10): unknown objective 'mlmm'; did you " \
           "mean 'mlm'?" in text
    problems = problems_of(tmp_path, "objectives.mix={span: 1}", "objectives.params.span.max_span=[[0, 3], [5, 6]]")
    assert problems == ["objectives.params.span.max_span: only a number parameter can follow a schedule; give it "
                        "one value"]


@pytest.mark.parametrize("between", ["linear", "hold"])
def test_the_mixer_follows_the_schedule_per_micro_batch(tmp_path, between):
    """With grad_accum 2 the mixer runs over micro-steps; its weights at micro-step m are the schedule's shares at
    the fractional step m / 2, and its choices track them."""
    cfg = config(tmp_path, "train.grad_accum=2", "objectives.mix={mlm: 3, causal: 1}",
                 f"objectives.schedule={{{between}: [[5, {{mlm: 1}}], [15, {{causal: 1}}]]}}")
    run = build(cfg)
    mixer = run.mixer(seed=7)
    for micro_step in range(0, 44):
        assert mixer.weights_at(micro_step) == pytest.approx(run.shares_at(micro_step / 2))
    if between == "hold":
        picks = [mixer.choose(m) for m in range(10, 30)]
        assert set(picks) == {"mlm"}  # steps 5..14: MLM only
        assert {mixer.choose(m) for m in range(30, 40)} == {"causal"}


def test_hold_is_part_of_the_mixers_resume_check():
    held = Mixer({"causal": 1}, seed=3, schedule=[(10, {"mlm": 1})], between="hold")
    linear = Mixer({"causal": 1}, seed=3, schedule=[(10, {"mlm": 1})])
    with pytest.raises(ValueError, match="between: checkpoint 'hold' vs config 'linear'"):
        linear.load_state_dict(held.state_dict())
    assert "between" not in linear.state_dict()  # a linear mix's state is what it always was


def test_each_micro_batch_gets_its_scheduled_rate(tmp_path):
    cfg = config(tmp_path, "train.grad_accum=4", "objectives.mix={mlm: 1}",
                 "objectives.params.mlm={rate: {hold: [[0, 0.3], [10, 0.15]]}, mask_frac: [[0, 0.8], [20, 0.9]]}")
    run = build(cfg)
    base = run.objectives(mode_tokens=False)["mlm"]
    assert base.config.rate == 0.3  # built with the step-0 values
    at = run.objective_at(base, 9, 3).config
    assert at.rate == 0.3 and at.mask_frac == pytest.approx(0.8 + 0.1 * 9.75 / 20)
    assert run.objective_at(base, 10, 0).config.rate == 0.15
    still = build(config(tmp_path, "objectives.params.mlm.rate=0.2"))
    fixed = still.objectives(mode_tokens=False)["mlm"]
    assert still.objective_at(fixed, 5, 0) is fixed  # nothing moves: the same objective, no per-batch rebuild


@pytest.mark.parametrize("recipe, rows", [
    ("gpt-bert", ["1-1500 (0%-100%)  0.062         0.938      0.300 -> 0.150"]),
    ("clm-then-mlm", ["1-1125 (0%-75%)       1.000         0.000", "1126-1500 (75%-100%)  0.000         1.000"]),
])
def test_recipe_dry_run_prints_its_phases(recipe, rows, tiny_data, tmp_path):
    proc = run_cli(["launch.train", "--config", f"launch/configs/{recipe}.yaml", "--dry-run", "--nproc", "2",
                    f"data.path={tiny_data}", f"out_dir={tmp_path}"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    table = proc.stdout[proc.stdout.index("== schedules"):].splitlines()
    assert table[1].split() == ["steps", "share", "causal", "share", "mlm"] + (["mlm.rate"] if recipe == "gpt-bert"
                                                                               else [])
    assert table[2:] == rows


def test_modernbert_base_recipe_dry_run(tiny_data, tmp_path):
    proc = run_cli(["launch.train", "--config", "launch/configs/modernbert-base.yaml", "--dry-run", "--nproc", "2",
                    f"data.path={tiny_data}", f"out_dir={tmp_path}"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "22 layers, hidden 768, heads 12, GeGLU 1152" in out
    assert "global every 3 layers (8 global, 14 local), window 128" in out
    assert "head on 30% of positions" in out
    assert "x seq_len 1024" in out and '"stage": 2' in out
    table = out[out.index("== schedules"):].splitlines()
    assert table[1].split()[-5:] == ["train.grad_accum", "data.seq_len", "train.micro_batch_size",
                                     "model.global_rope_theta", "model.local_rope_theta"]
    # The warm-up ramps over the first 3% (a phase per knot), the context extension starts at 90%.
    assert table[2].split()[2:] == ["1", "->", "5", "1024", "32", "10000", "10000"]
    assert table[-2].split()[:2] == ["90001-100000", "(90%-100%)"]
    assert table[-2].split()[-5:] == ["6", "8192", "4", "160000", "10000"]


def test_batch_warmup_counts_micro_batches_and_moves_the_mixer_and_lr(tmp_path):
    cfg = config(tmp_path, "train.grad_accum=4", "train.batch_warmup=[[0, 1], [50%, 4]]", "train.lr_follows=tokens",
                 "objectives.mix={causal: 1}", "objectives.schedule={hold: [[50%, {mlm: 1}]]}")
    run = build(cfg)
    # 1 micro-batch at step 0 up to 4 at step 10, rounded down: 1 1 1 1 2 2 2 3 3 3 4 ...
    assert [run.accum_at(s) for s in range(12)] == [1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4]
    assert run.micro_start(10) == 4 * 1 + 3 * 2 + 3 * 3 and run.micro_start(20) == 19 + 10 * 4
    mixer = run.mixer(seed=1)
    assert {mixer.choose(m) for m in range(run.micro_start(10))} == {"causal"}  # the knot moved to micro-step 19
    assert {mixer.choose(m) for m in range(run.micro_start(10), run.micro_start(20))} == {"mlm"}
    # The LR schedule reaches its end with the run's last token, not earlier: at step 10 a third of the tokens.
    assert run.lr_progress(10) == pytest.approx(20 * 19 / 59) and run.lr_progress(20) == 20
    assert build(config(tmp_path, "train.grad_accum=4")).micro_start(7) == 28  # no warm-up: steps x grad_accum


def test_batch_warmup_problems(tmp_path):
    problems = problems_of(tmp_path, "train.grad_accum=2", "train.batch_warmup=[[0, 0], [10, 4]]",
                           "train.lr_follows=samples")
    assert problems == [
        "train.lr_follows: must be steps or tokens, got 'samples'",
        "train.batch_warmup[0]: 0 micro-batches per step lies outside 1..2; train.grad_accum is the largest "
        "accumulation (the engine is built for it): raise it or lower the knot",
        "train.batch_warmup[1]: 4 micro-batches per step lies outside 1..2; train.grad_accum is the largest "
        "accumulation (the engine is built for it): raise it or lower the knot",
    ]


def test_batch_warmup_in_the_dry_run(tiny_data, tmp_path):
    proc = run_cli(["launch.train", "--config", "launch/configs/tiny.yaml", "--dry-run", "--nproc", "2",
                    f"data.path={tiny_data}", f"out_dir={tmp_path}", "train.grad_accum=4",
                    "train.micro_batch_size=2", "train.batch_warmup={hold: [[0, 1], [50%, 4]]}"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    table = proc.stdout[proc.stdout.index("== schedules"):].splitlines()
    assert table[1].split()[-1] == "train.grad_accum"
    assert table[2].split()[-1] == "1" and table[3].split()[-1] == "4"
    # 10 steps of 1 micro-batch and 10 of 4, each 2 rows x 2 ranks x 64 tokens
    assert table[4].startswith(f"batch warm-up and phases: {(10 + 40) * 2 * 2 * 64:,} tokens in 20 steps")
