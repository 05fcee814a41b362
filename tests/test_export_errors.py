"""Bad input to `python -m launch.export`: a clear one-line error naming what is wrong, exit code 2, and nothing
(not even a temporary folder) left at or beside --out. Each case damages a copy of one real 2-rank ZeRO-3
checkpoint (every rank writes its own model and optimizer shard there)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def good_run(tiny_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("errors") / "run"
    run_cli(["launch.train", "--config", "launch/configs/tiny.yaml", "--nproc", "2", f"out_dir={out}",
             f"data.path={tiny_data}", "train.zero_stage=3", "train.max_steps=2", "train.warmup_steps=1"], check=True)
    return out


@pytest.fixture
def run(good_run, tmp_path) -> Path:
    """A private copy to damage."""
    return Path(shutil.copytree(good_run, tmp_path / "run"))


def tag_dir(run: Path) -> Path:
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()


def export_fails(run: Path, out: Path, capsys, *extra: str) -> str:
    """The CLI's main under its error handler, in-process (one interpreter start less per case); expect a user
    error and return its message. Checks that nothing was left at or beside --out."""
    from launch.cli import run_cli as handle_errors
    from launch.export.main import main

    before = set(out.parent.iterdir()) if out.parent.exists() else set()
    capsys.readouterr()
    code = handle_errors(lambda: main(["--checkpoint", str(run), "--out", str(out), *extra]))
    err = capsys.readouterr().err
    assert code == 2, (code, err[-2000:])
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err[-2000:]
    after = set(out.parent.iterdir()) if out.parent.exists() else set()
    assert after == before, f"export left {sorted(p.name for p in after - before)} behind"
    return errors[0]


@pytest.mark.parametrize("victim", ["zero_pp_rank_1_mp_rank_00_model_states.pt",
                                    "zero_pp_rank_1_mp_rank_00_optim_states.pt"])
def test_missing_rank_shard_is_named(run, tmp_path, victim, capsys):
    (tag_dir(run) / victim).unlink()
    msg = export_fails(run, tmp_path / "out", capsys)
    assert "incomplete" in msg and victim in msg and "2 ranks" in msg, msg


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty"])
def test_corrupt_shard_is_named(run, tmp_path, how, capsys):
    victim = tag_dir(run) / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = victim.read_bytes()
    victim.write_bytes({"truncated": data[: len(data) // 2], "garbage": bytes(range(256)) * 64, "empty": b""}[how])
    msg = export_fails(run, tmp_path / "out", capsys)
    assert "corrupt" in msg and str(victim) in msg, msg


def test_corrupt_run_json_is_named(run, tmp_path, capsys):
    (tag_dir(run) / "run.json").write_text('{"encoder": {"vocab_size": 10')
    msg = export_fails(run, tmp_path / "out", capsys)
    assert "run.json" in msg and "corrupt" in msg, msg


def test_weights_of_another_model_shape(run, tmp_path, capsys):
    # run.json describes a wider MLP than the DeepSpeed shards hold, as when files of two runs get mixed
    info_file = tag_dir(run) / "run.json"
    info = json.loads(info_file.read_text())
    info["encoder"]["intermediate_size"] = 128
    info_file.write_text(json.dumps(info))
    msg = export_fails(run, tmp_path / "out", capsys)
    assert "another model shape" in msg and "mlp.Wi.weight" in msg and "[256, 64]" in msg, msg


def test_tokenizer_of_another_run(run, tmp_path, capsys):
    info_file = tag_dir(run) / "run.json"
    info = json.loads(info_file.read_text())
    info["encoder"]["vocab_size"] += 24
    info_file.write_text(json.dumps(info))
    msg = export_fails(run, tmp_path / "out", capsys)
    assert "tokenizer" in msg and "vocab_size" in msg, msg


def test_out_that_exists_is_refused_and_kept(run, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = run_cli(["launch.export", "--checkpoint", str(run), "--out", str(out)])  # the real CLI, once
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "error: --out" in proc.stderr and "already exists" in proc.stderr and "--overwrite" in proc.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    # --overwrite replaces only an earlier export (tests/test_security_cli.py), never a folder like this one
    msg = export_fails(run, out, capsys, "--overwrite", "--no-verify", "--no-card")
    assert "not a cloze export" in msg, msg
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "run"], "temporary folders left behind"


def test_failure_after_writing_leaves_nothing(run, tmp_path, capsys):
    # A tokenizer.json that disagrees with spm.model passes every up-front check; the verify step finds it after
    # the weights are written. The temporary folder must go, and --out must not appear. (cloze's checkpoints keep
    # spm.model alone, and the export converts it; a checkpoint that brings its own tokenizer.json is read too.)
    from data.hf_tokenizer import write_hf_tokenizer

    folder = tag_dir(run) / "tokenizer"
    write_hf_tokenizer(folder / "spm.model", folder, model_max_length=256)
    tok_file = folder / "tokenizer.json"
    tok = json.loads(tok_file.read_text())
    tok["normalizer"] = {"type": "Lowercase"}
    tok_file.write_text(json.dumps(tok))
    msg = export_fails(run, tmp_path / "nested" / "out", capsys)
    assert "AutoTokenizer ids differ from SentencePiece" in msg, msg
    assert not (tmp_path / "nested" / "out").exists()


def test_missing_checkpoint_path(tmp_path, capsys):
    msg = export_fails(tmp_path / "no-such-run", tmp_path / "out", capsys)
    assert "no-such-run" in msg, msg
