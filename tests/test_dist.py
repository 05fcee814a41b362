"""The distributed bootstrap maps each launcher's environment onto torch's variables."""

from __future__ import annotations

import os

import pytest

from launch.train.dist import bootstrap_env, env_var, expand_hostlist, slurm_port


def test_expand_hostlist():
    assert expand_hostlist("n[1-2]") == ["n1", "n2"]
    assert expand_hostlist("gpu[08-10,12],login") == ["gpu08", "gpu09", "gpu10", "gpu12", "login"]
    assert expand_hostlist("a1,b[3-4]-ib") == ["a1", "b3-ib", "b4-ib"]
    assert expand_hostlist("node7") == ["node7"]


def test_torchrun_variables_win():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "1234",
           "SLURM_PROCID": "0", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2"}
    d = bootstrap_env(env)
    assert (d.rank, d.world_size, d.local_rank, d.master_addr, d.master_port, d.source) == (3, 4, 1, "h0", 1234,
                                                                                          "torchrun")


def test_srun_task_derives_everything_from_slurm():
    env = {"SLURM_PROCID": "2", "SLURM_LOCALID": "0", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "0",
           "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_ID": "4711"}
    d = bootstrap_env(env)
    assert (d.rank, d.local_rank, d.world_size, d.master_addr, d.source) == (2, 0, 4, "n1", "slurm")
    assert d.master_port == slurm_port("4711") == 20000 + 4711
    assert env["RANK"] == "2" and env["WORLD_SIZE"] == "4" and env["MASTER_ADDR"] == "n1"


def test_bare_process_is_a_one_rank_world():
    env: dict[str, str] = {"SLURM_PROCID": "0", "SLURM_JOB_ID": "5"}  # batch shell: no step id -> not a rank
    d = bootstrap_env(env)
    assert (d.rank, d.world_size, d.source) == (0, 1, "single") and d.master_addr == "127.0.0.1"


def test_env_var_restores_the_old_value_or_its_absence_even_on_error(monkeypatch):
    monkeypatch.setenv("CLOZE_T_SET", "old")
    monkeypatch.delenv("CLOZE_T_UNSET", raising=False)
    with env_var("CLOZE_T_SET", "new"), env_var("CLOZE_T_UNSET", "1"):
        assert os.environ["CLOZE_T_SET"] == "new" and os.environ["CLOZE_T_UNSET"] == "1"
    assert os.environ["CLOZE_T_SET"] == "old" and "CLOZE_T_UNSET" not in os.environ
    with pytest.raises(RuntimeError), env_var("CLOZE_T_UNSET", "1"):
        raise RuntimeError("inside")
    assert "CLOZE_T_UNSET" not in os.environ
