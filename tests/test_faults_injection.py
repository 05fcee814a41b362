"""launch/train/faults.py: the fault-injection variables are read once into a Faults, inert when none is set.

The faults themselves are exercised end to end by tests/test_train.py (NaN loss, NaN gradient), test_faults_kill.py
(SIGKILL of a rank and inside a save) and test_security_run.py (the pid files); this checks the reading and where
each hook fires."""

from __future__ import annotations

import math

import torch

from launch.train.faults import NO_FAULTS, Faults

ENV = {"CLOZE_FAULT_NAN_STEPS": "3, 5", "CLOZE_FAULT_NAN_GRAD_STEPS": "4", "CLOZE_FAULT_PID_DIR": "/x",
       "CLOZE_FAULT_CKPT_KILL": "after_state:20"}


def test_no_variables_means_no_faults():
    assert Faults.from_env(0, {}) == NO_FAULTS
    loss = torch.tensor(1.5)
    assert NO_FAULTS.loss(loss, 3, 0) is loss


def test_the_variables_are_parsed_once():
    f = Faults.from_env(0, ENV)
    assert f.nan_loss_steps == {3, 5} and f.nan_grad_steps == {4}
    assert str(f.pid_dir) == "/x" and f.ckpt_kill == "after_state:20"


def test_a_nan_loss_only_on_rank_0_and_the_first_micro_batch_of_its_step():
    loss = torch.tensor(1.5)
    rank0, rank1 = Faults.from_env(0, ENV), Faults.from_env(1, ENV)
    assert math.isnan(rank0.loss(loss, 3, 0).item())
    assert rank0.loss(loss, 3, 1).item() == 1.5 and rank0.loss(loss, 4, 0).item() == 1.5
    assert rank1.loss(loss, 3, 0).item() == 1.5


def test_a_nan_gradient_for_one_backward_only():
    w = torch.ones(2, requires_grad=True)
    f = Faults.from_env(0, ENV)
    with f.gradient(w, 4, 0):
        (w * 2).sum().backward()
    assert torch.isnan(w.grad).all()
    w.grad = None
    (w * 2).sum().backward()  # the hook is gone after the step
    assert torch.equal(w.grad, torch.full((2,), 2.0))
