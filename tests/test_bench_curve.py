"""bench/gpu_curve.py's committed reference still matches the code: the GPU session compares a GPU run with
bench/curve_reference.json, so a change to the model, the objectives or the trainer that moved the CPU fp32 curve
would make that check fail on the GPU for no GPU reason (and spend device time to learn it). This runs the
reference's own fp32 run again on this CPU and holds it to the fp32 tolerance."""

from __future__ import annotations

import json

import pytest

from bench.gpu_curve import CURVE_STEPS, FP32_TOL, REFERENCE, data_fingerprint, main, prepare


@pytest.mark.slow
def test_the_committed_reference_curve_holds_on_this_cpu(tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "curve.json"
    prepare(data)
    if data_fingerprint(data) != json.loads(REFERENCE.read_text())["data_manifest_sha256"]:
        pytest.skip("this interpreter's stdlib is not the one bench/curve_reference.json was recorded on; record "
                    "it again with `python -m bench.gpu_curve prepare` and `reference`")
    # The first 20 of the 60 steps (train.stop_at keeps the run's own schedule): a third of the time, and any
    # change to the model, the masks or the data order shows from step 1.
    rc = main(["compare", "--device", "cpu", "--data", str(data), "--out", str(out), "--steps", "20"])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["precision"] == "fp32" and row["steps"] == 20 < CURVE_STEPS, row
    assert row["max_abs_diff"] <= FP32_TOL and row["ok"] and rc == 0, row
    assert "| cpu vs CPU fp32 reference |" in capsys.readouterr().out
