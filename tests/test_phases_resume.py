"""A real 2-rank DeepSpeed run with a sequence-length phase: the rows, the micro-batch and the RoPE base switch at
the knot, a run stopped there and resumed trains bit for bit as the uninterrupted one, and the export carries the
last phase's RoPE base and length into a folder stock transformers loads."""

from __future__ import annotations

import json

import pytest

from tests.conftest import run_cli, run_whole_and_cut

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_a_phase_switches_shape_and_rope_and_resumes_exactly(tiny_data, tmp_path):
    common = ["launch.train", "--config", "launch/configs/tiny.yaml", "--nproc", "2", f"data.path={tiny_data}",
              "train.precision=fp32", "train.max_steps=6", "train.log_every=3", "train.micro_batch_size=4",
              "data.seq_len_phases=[{at: 3, seq_len: 128, global_rope_theta: 20000}]"]
    whole, cut = run_whole_and_cut(common, tmp_path, stop_at=3, max_steps=6)
    assert [r["loss"] for r in cut] == [r["loss"] for r in whole]  # fp32 CPU, same world: exactly equal
    assert [r["schedule"]["data.seq_len"] for r in whole] == [64] * 3 + [128] * 3
    assert [r["schedule"]["train.micro_batch_size"] for r in whole] == [4] * 3 + [2] * 3  # tokens kept: 4 x 64
    assert [r["schedule"]["model.global_rope_theta"] for r in whole] == [160000] * 3 + [20000] * 3
    summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert summary["tokens_seen"] == 3 * 4 * 2 * 64 + 3 * 2 * 2 * 128  # steps x rows x ranks x seq_len

    out = tmp_path / "export"
    proc = run_cli(["launch.export", "--checkpoint", str(tmp_path / "cut"), "--out", str(out)], timeout=300)
    assert proc.returncode == 0, proc.stderr  # the export loads the folder in transformers and compares it
    config = json.loads((out / "config.json").read_text())
    assert config["global_rope_theta"] == 20000 and config["local_rope_theta"] == 10000
    assert json.loads((out / "sentence_bert_config.json").read_text())["max_seq_length"] == 128
    assert "| sequence length | 64, then 128 from 3 |" in (out / "README.md").read_text()
