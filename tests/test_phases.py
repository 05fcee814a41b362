"""Sequence-length phases (data.seq_len_phases, launch/train/phases.py): validation, the per-step shape and where
each phase starts in global rows and tokens, the model's RoPE switch, and the dry run's table."""

from __future__ import annotations

import pytest
import torch

from launch.config import ConfigError, load_config
from launch.train.schedules import build
from model.config import EncoderConfig
from model.heads import EncoderForPretraining
from tests.conftest import ROOT, run_cli

TINY = ROOT / "launch/configs/tiny.yaml"
TWO = "data.seq_len_phases=[{at: 50%, seq_len: 128, global_rope_theta: 20000}, {at: 15, seq_len: 256, " \
      "micro_batch_size: 1}]"


def config(tmp_path, *overrides: str):
    return load_config(TINY, [f"data.path={tmp_path}", *overrides])


def test_every_phase_problem_in_one_error(tmp_path):
    with pytest.raises(ConfigError) as e:
        config(tmp_path, "data.seq_len_phases=[{at: 0.5, seq_len: 100000, micro: 2, global_rope_theta: -1}, 3, "
                         "{seq_len: 7, micro_batch_size: 0}, {at: 25, seq_len: 128}]")
    assert e.value.problems == [
        "data.seq_len_phases[0].micro: unknown key (valid: at, global_rope_theta, local_rope_theta, "
        "micro_batch_size, seq_len)",
        "data.seq_len_phases[0].at: position 0.5 is ambiguous: write a share of train.max_steps with a percent sign "
        "('50%') or an integer step",
        "data.seq_len_phases[0].seq_len=100000 exceeds model.max_position_embeddings=256; raise it (RoPE has no "
        "learned positions, so the weights do not change)",
        "data.seq_len_phases[0].global_rope_theta: must be a number > 0, got -1",
        "data.seq_len_phases[1]: must be a mapping like {at: 90%, seq_len: 8192, micro_batch_size: 4, "
        "global_rope_theta: 160000}",
        "data.seq_len_phases[2].at: needs `at`, e.g. {at: 90%, seq_len: 8192, micro_batch_size: 4, "
        "global_rope_theta: 160000}",
        "data.seq_len_phases[2].seq_len: must be a whole number >= 8, got 7",
        "data.seq_len_phases[2].micro_batch_size: must be a whole number >= 1, got 0",
        "data.seq_len_phases[3].at: step 25 (25) must lie after the previous phase's start (step 0) and before "
        "train.max_steps=20",
    ]


def test_shape_rows_and_tokens_by_step(tmp_path):
    run = build(config(tmp_path, TWO, "train.grad_accum=2"))  # tiny: 20 steps, micro 8 x 64 tokens
    assert [(p.step, p.seq_len, p.micro_batch_size) for p in run.shape] == [(0, 64, 8), (10, 128, 4), (15, 256, 1)]
    assert run.phase_at(9).seq_len == 64 and run.phase_at(10).seq_len == 128 and run.phase_at(19).seq_len == 256
    # The default micro-batch keeps the first phase's tokens: 8 x 64 = 4 x 128.
    assert run.rope_at(9) == (160000.0, 10000.0) and run.rope_at(10) == run.rope_at(19) == (20000.0, 10000.0)
    # On 2 ranks with 2 micro-batches per step: 10 steps of 8 rows, 5 of 4, then 1.
    assert run.shape_knots(world=2) == [(10 * 2 * 8 * 2, 128, 4), (320 + 5 * 2 * 4 * 2, 256, 1)]
    assert run.tokens_before(20, world=1) == 10 * 2 * 8 * 64 + 5 * 2 * 4 * 128 + 5 * 2 * 1 * 256
    assert run.lr_progress(15) == 15  # steps, unless the LR follows tokens
    tokens = build(config(tmp_path, TWO, "train.lr_follows=tokens"))
    assert tokens.lr_progress(15) == pytest.approx(20 * (10 * 512 + 5 * 512) / (15 * 512 + 5 * 256))
    assert build(config(tmp_path)).shape_knots(world=2) == []


def test_set_rope_theta_equals_a_model_built_with_those_bases():
    base = dict(vocab_size=300, hidden_size=64, num_layers=3, num_heads=4, intermediate_size=96,
                global_attn_every_n_layers=3, local_attention=16, global_rope_theta=10000.0, local_rope_theta=10000.0)
    torch.manual_seed(0)
    model = EncoderForPretraining(EncoderConfig(**base)).eval()
    extended = EncoderForPretraining(EncoderConfig(**{**base, "global_rope_theta": 160000.0})).eval()
    extended.load_state_dict(model.state_dict(), strict=True)
    ids = torch.randint(5, 300, (2, 48))
    with torch.no_grad():
        before = model.encoder(ids)
        model.set_rope_theta(160000.0, 10000.0)
        after, want = model.encoder(ids), extended.encoder(ids)
    assert torch.equal(after, want)
    assert not torch.equal(before, after)  # the bases do reach the forward (the same weights, other outputs)
    assert model.cfg.global_rope_theta == model.encoder.cfg.global_rope_theta == 160000.0


def test_dry_run_shows_the_phases_and_sizes_memory_for_the_largest(tiny_data, tmp_path):
    proc = run_cli(["launch.train", "--config", "launch/configs/tiny.yaml", "--dry-run", "--nproc", "2",
                    f"data.path={tiny_data}", f"out_dir={tmp_path}", TWO], timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "(activations of the phase that needs the most: micro-batch 4 x 128 tokens, from step 11)" in out
    table = out[out.index("== schedules"):].splitlines()
    assert table[1].split()[-4:] == ["data.seq_len", "train.micro_batch_size", "model.global_rope_theta",
                                     "model.local_rope_theta"]
    assert [r.split()[-4:] for r in table[2:5]] == [["64", "8", "160000", "10000"], ["128", "4", "20000", "10000"],
                                                     ["256", "1", "20000", "10000"]]
    tokens = 2 * (10 * 8 * 64 + 5 * 4 * 128 + 5 * 256)
    assert table[5].startswith(f"batch warm-up and phases: {tokens:,} tokens in 20 steps on 2 rank(s)")
