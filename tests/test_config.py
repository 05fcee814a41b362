"""Config loading and validation: one error listing every problem, raised before anything starts."""

from __future__ import annotations

import json

import pytest

from launch.config import ConfigError, load_config
from launch.train.engine_config import resolve_deepspeed_config
from tests.conftest import ROOT


def test_shipped_configs_load(tmp_path):
    paths = sorted((ROOT / "launch" / "configs").glob("*.yaml"))
    assert len(paths) >= 2
    for path in paths:
        cfg = load_config(path, [f"data.path={tmp_path}"])  # the data is checked separately (preflight)
        assert cfg.train.max_steps >= 1, path


def test_overrides_are_typed_and_applied(tmp_path):
    cfg = load_config(ROOT / "launch/configs/tiny.yaml", ["train.max_steps=7", "objectives.mix.causal=0.5",
                                                          "train.lr=1e-4", f"data.path={tmp_path}"])
    assert cfg.train.max_steps == 7 and cfg.train.lr == pytest.approx(1e-4)
    assert cfg.objectives.mix["causal"] == 0.5


def test_unknown_keys_get_a_suggestion_and_all_problems_are_listed():
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "launch/configs/tiny.yaml", ["train.max_step=5", "train.lr=-1", "data.seq_lenn=3"])
    msg = str(e.value)
    assert "train.max_step: unknown key (did you mean 'max_steps'?)" in msg
    assert "data.seq_lenn: unknown key (did you mean 'seq_len'?)" in msg
    assert len(e.value.problems) == 2  # range checks run only once the keys are right


@pytest.mark.parametrize("mix, needle", [
    ({"mlmm": 1.0}, "mlmm"),
    ({"mlm": -0.5, "causal": 1.0}, "negative"),
    ({"mlm": 0.0, "causal": 0.0}, "zero"),
])
def test_bad_objective_mix_is_rejected(tmp_path, mix, needle):
    f = tmp_path / "c.yaml"
    f.write_text(json.dumps({"objectives": {"mix": mix}}))
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert needle in str(e.value).lower()


def test_unknown_objective_name_suggests_the_nearest(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("objectives:\n  mix: {mlmm: 1.0}\n")
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert "mlm" in str(e.value).replace("mlmm", "")


def test_bad_yaml_and_missing_file_are_one_line(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config("does/not/exist.yaml")
    assert "\n" not in str(e.value) and "not found" in str(e.value)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {max_steps: 5\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert "\n" not in str(e.value) and "not valid YAML" in str(e.value) and str(bad) in str(e.value)


def test_deepspeed_batch_mismatch_lists_every_number(tmp_path):
    ds = json.loads((ROOT / "deepspeed_config.json").read_text())
    ds["train_batch_size"] = 64
    f = tmp_path / "ds.json"
    f.write_text(json.dumps(ds))
    cfg = load_config(ROOT / "launch/configs/tiny.yaml", [f"train.deepspeed_config={f}", f"data.path={tmp_path}"])
    with pytest.raises(ConfigError) as e:
        resolve_deepspeed_config(cfg, world_size=2, precision="fp32")
    msg = str(e.value)
    assert "train_batch_size=64" in msg and "8 x grad_accum 1 x world size 2 = 16" in msg


def test_deepspeed_auto_values_are_filled_from_the_training_config(tmp_path):
    cfg = load_config(ROOT / "launch/configs/tiny.yaml", ["train.grad_accum=3", f"data.path={tmp_path}"])
    ds = resolve_deepspeed_config(cfg, world_size=4, precision="bf16")
    assert ds["train_batch_size"] == 8 * 3 * 4
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == 3
    assert ds["bf16"]["enabled"] is True and ds["gradient_clipping"] == cfg.train.grad_clip
