"""LR schedules and weight-decay groups."""

from __future__ import annotations

import pytest
import torch

from launch.config import TrainConfig
from launch.train.optim import lr_factor, param_groups
from model.config import EncoderConfig
from model.heads import EncoderForPretraining


@pytest.mark.parametrize("schedule", ["warmup_linear", "warmup_cosine", "wsd"])
def test_schedules_warm_up_then_reach_the_floor(schedule):
    t = TrainConfig(max_steps=100, warmup_steps=10, min_lr_ratio=0.1, schedule=schedule, decay_frac=0.2)
    f = [lr_factor(s, t) for s in range(t.max_steps + 1)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # step 1 trains: never lr 0
    assert all(a < b for a, b in zip(f[:10], f[1:10]))
    assert f[100] == pytest.approx(0.1)
    assert all(a >= b - 1e-12 for a, b in zip(f[10:], f[11:]))  # never increases after warm-up
    if schedule == "wsd":
        assert f[10:80] == [1.0] * 70 and f[90] == pytest.approx(0.55)
    if schedule == "warmup_cosine":
        assert f[55] == pytest.approx(0.55)  # half-way through the decay: the mean of 1 and the floor
    if schedule == "warmup_linear":
        assert f[55] == pytest.approx(0.55)


def test_no_weight_decay_on_norms_and_biases():
    model = EncoderForPretraining(EncoderConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=2,
                                                intermediate_size=48))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim >= 2 for p in decay["params"])
    assert {names[id(p)].rsplit(".", 2)[-2] for p in no_decay["params"]} >= {"norm", "decoder"}
    total = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert total == sum(p.numel() for p in model.parameters())  # tied weight counted once
    assert isinstance(torch.optim.AdamW([decay, no_decay]), torch.optim.AdamW)


def test_zero_memory_formula_partitions_what_each_stage_partitions():
    from launch.train.dry_run import zero_memory_bytes

    p = 1000
    # Values measured by bench/zero_memory.py on a live engine (fp32): optimizer state 12 bytes/param under ZeRO.
    assert zero_memory_bytes(p, 1, 4, "fp32") == {"weights": 4000, "grads": 4000, "optimizer": 3000,
                                                  "total": 11000}
    assert zero_memory_bytes(p, 2, 4, "fp32")["grads"] == 1000
    assert zero_memory_bytes(p, 3, 4, "bf16") == {"weights": 500, "grads": 500, "optimizer": 3000, "total": 4000}
    assert zero_memory_bytes(p, 0, 4, "fp32")["optimizer"] == 8000  # stage 0: Adam moments only, nothing split
