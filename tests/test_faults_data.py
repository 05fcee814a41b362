"""Hostile shards through the full trainer: `fail` stops before a step with one line naming the shard; `skip`
trains on, counts what it skipped and reports the counts in the run summary."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.distributed


@pytest.fixture()
def damaged(tiny_data, tmp_path):
    """A copy of the prepared data whose second shard has one byte flipped (its sha256 no longer matches)."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    shard = sorted(data.glob("shard-*.tar"))[1]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    return data, shard.name


def train(data, out, *extra):
    return run_cli(["launch.train", "--config", "launch/configs/tiny.yaml", "--nproc", "2", f"data.path={data}",
                    f"out_dir={out}", "train.max_steps=30", "train.log_every=10", *extra])


def test_fail_policy_names_the_shard_and_exits_2(damaged, tmp_path):
    data, name = damaged
    proc = train(data, tmp_path / "fail", "train.max_steps=400")  # long enough for every shard to be opened
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error")]
    assert errors and name in errors[0] and "sha256" in errors[0], proc.stderr[-3000:]
    assert not (tmp_path / "fail" / "summary.json").exists()


def test_skip_policy_counts_and_reports(damaged, tmp_path):
    data, name = damaged
    proc = train(data, tmp_path / "skip", "data.on_bad_data=skip", "train.max_steps=400")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "skip" / "summary.json").read_text())
    assert summary["steps"] == 400
    assert summary["data"].get("skipped_shards/sha256", 0) >= 1, summary["data"]
    assert "data skipped so far" in proc.stderr
