"""User mistakes end in one clear line and exit code 2 before any training starts; --dry-run plans a run."""

from __future__ import annotations

import json

import pytest

from tests.conftest import ROOT, run_cli


def train(*overrides: str, data, extra=()):
    return run_cli(["launch.train", "--config", "launch/configs/tiny.yaml", *extra, f"data.path={data}", *overrides],
                   timeout=120)


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for f in fragments:
        assert f in errors[0], (f, errors[0])
    assert "step " not in proc.stderr  # nothing trained


@pytest.mark.parametrize("overrides, fragments", [
    (["objectives.mix={mlmm: 1.0}"], ["unknown objective", "mlmm", "'mlm'"]),
    (["objectives.mix={mlm: -1.0, causal: 1.0}"], ["mlm", "negative"]),
    (["objectives.mix={mlm: 0, causal: 0}"], ["zero"]),
    (["train.lr=-0.1"], ["train.lr"]),
    (["train.warmup_steps=50", "train.max_steps=10"], ["train.warmup_steps=50"]),
    (["train.zero_stage=4"], ["train.zero_stage"]),
    (["eval.every=0"], ["eval.every"]),
    (["train.max_stepz=3"], ["train.max_stepz", "did you mean 'max_steps'"]),
    (["train.micro_batch_size=two"], ["train.micro_batch_size", "integer"]),
    (["out_dir=/etc/hostname/run"], ["out_dir", "not a directory"]),
])
def test_bad_config_is_one_line(tiny_data, overrides, fragments):
    assert_one_line_error(train(*overrides, data=tiny_data), *fragments)


def test_missing_data_dir_names_the_fix(tmp_path):
    proc = train(data=tmp_path / "nope")
    assert_one_line_error(proc, "data.path", "nope", "launch.prepare")


def test_deepspeed_batch_mismatch_stops_before_spawning(tiny_data, tmp_path):
    ds = json.loads((ROOT / "deepspeed_config.json").read_text())
    ds["train_batch_size"] = 48
    f = tmp_path / "ds.json"
    f.write_text(json.dumps(ds))
    proc = train(f"train.deepspeed_config={f}", data=tiny_data, extra=["--nproc", "2"])
    assert proc.returncode == 2 and "train_batch_size=48" in proc.stderr
    assert "8 x grad_accum 1 x world size 2 = 16" in proc.stderr
    assert "torch.distributed" not in proc.stderr and "Traceback" not in proc.stderr


def test_more_ranks_than_shards_is_fine(tiny_data):
    """Every rank reads the one global row sequence and takes its slice of each step, so a source needs no shard
    per rank."""
    proc = train(data=tiny_data, extra=["--nproc", "64", "--dry-run"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "x world size 64 = global batch 512 rows" in proc.stdout


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "launch" / "configs").glob("*.yaml")))
def test_dry_run_of_every_shipped_config(config, tiny_data, tmp_path):
    proc = run_cli(["launch.train", "--config", f"launch/configs/{config}", "--dry-run", "--nproc", "2",
                    f"data.path={tiny_data}", f"out_dir={tmp_path}"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "x world size 2 = global batch" in out and "tokens per optimizer step" in out
    assert "parameters" in out and "MFLOP" in out
    for stage in range(4):
        assert f"ZeRO-{stage}:" in out
    assert '"train_batch_size":' in out  # the resolved DeepSpeed config, with the autos filled in
    assert not (tmp_path / "checkpoints").exists()  # nothing ran
