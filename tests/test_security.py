"""No code execution from data we did not write: a pickle payload planted in a checkpoint does not run on resume,
and one planted in an export folder does not run when the export is fine-tuned (nor when stock transformers loads
it). Pickles in shards: tests/test_data_hostile.py and tests/test_faults_data.py."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

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


@pytest.fixture(scope="module")
def exported(tiny_data, tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    run_cli(["launch.train", "--config", "launch/configs/tiny.yaml", "--nproc", "2", f"data.path={tiny_data}",
             f"out_dir={base / 'run'}", "train.max_steps=3"], check=True)
    run_cli(["launch.export", "--checkpoint", str(base / "run"), "--out", str(base / "export"), "--no-card"],
            check=True)
    rows = "text,label\n" + "".join(f"message {i} about {w},{w}\n" for i in range(4) for w in ("refund", "crash"))
    (base / "rows.csv").write_text(rows)
    return base


def finetune(base, export):
    return run_cli(["launch.finetune", "--export", str(export), "--train", str(base / "rows.csv"),
                    "--eval", str(base / "rows.csv"), "--epochs", "1"])


@pytest.mark.parametrize("plant", ["pickle_beside_safetensors", "pickle_instead_of_safetensors",
                                   "pickle_named_safetensors"])
def test_pickle_payload_in_an_export_does_not_run(exported, tmp_path, plant):
    export, marker = Path(shutil.copytree(exported / "export", tmp_path / "export")), tmp_path / "PWNED"
    payload = pickle.dumps({"encoder.weight": Payload(marker)})
    if plant == "pickle_beside_safetensors":
        (export / "pytorch_model.bin").write_bytes(payload)
    elif plant == "pickle_instead_of_safetensors":
        (export / "model.safetensors").unlink()
        (export / "pytorch_model.bin").write_bytes(payload)
    else:
        (export / "model.safetensors").write_bytes(payload)
    proc = finetune(exported, export)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert not marker.exists(), "the payload ran"
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    named = "model.safetensors" if plant == "pickle_named_safetensors" else "pytorch_model.bin"
    assert named in errors[0] and "launch.export" in errors[0], errors[0]
    if plant == "pickle_instead_of_safetensors":
        # A product team loading the folder with stock transformers: its loader refuses the pickle too.
        from transformers import AutoModel

        with pytest.raises(Exception):  # noqa: B017 (whatever it raises, the point is that nothing ran)
            AutoModel.from_pretrained(export)
        assert not marker.exists(), "transformers ran the payload"


def test_untouched_export_still_finetunes(exported):
    proc = finetune(exported, exported / "export")  # the check above refuses only what it should
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "accuracy" in proc.stdout
