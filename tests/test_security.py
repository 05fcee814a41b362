"""No code execution from data we did not write: a pickle payload planted in a checkpoint does not run on resume."""

from __future__ import annotations

import pickle

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.distributed


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # unpickling this creates the marker file


def test_pickle_payload_in_a_checkpoint_does_not_run_on_resume(tiny_data, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "PWNED"
    common = ["launch.train", "--config", "launch/configs/tiny.yaml", "--nproc", "2", f"data.path={tiny_data}",
              f"out_dir={out}", "train.max_steps=6"]
    run_cli([*common, "train.stop_at=3"], check=True)
    target = out / "checkpoints" / "step_00000003" / "mp_rank_00_model_states.pt"
    assert target.is_file()
    target.write_bytes(pickle.dumps({"module": Payload(marker)}))
    proc = run_cli(common)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert not marker.exists(), "the payload ran"
    assert "refusing to load checkpoint" in proc.stderr and "tampered" in proc.stderr
