"""Config fuzzing: malformed configs each end in one error line naming the key, and exit code 2 through the CLI.

Most cases go through `load_config` (fast, same code path the CLI takes first); a handful go through the real CLI
to prove the error path prints one line, exits 2 and never shows a traceback. Together with test_cli_errors.py and
test_config.py this is well over 30 malformed configs.
"""

from __future__ import annotations

import json

import pytest

from launch.config import ConfigError, load_config
from launch.train.engine_config import resolve_deepspeed_config
from tests.conftest import ROOT, run_cli

TINY = ROOT / "launch" / "configs" / "tiny.yaml"

# (overrides on top of tiny.yaml, fragments the single error line must contain)
OVERRIDE_CASES = [
    # types
    (["train.max_steps=ten"], ["train.max_steps", "expected an integer"]),
    (["train.lr=fast"], ["train.lr", "expected a number"]),
    (["train.lr=true"], ["train.lr"]),
    (["train.micro_batch_size=2.5"], ["train.micro_batch_size", "integer"]),
    (["data.seq_len=[64]"], ["data.seq_len"]),
    (["objectives.mode_tokens=maybe"], ["objectives.mode_tokens", "true/false"]),
    (["data=5"], ["data", "expected a mapping"]),
    (["model=[1, 2]"], ["model", "expected a mapping"]),
    (["train.betas=[0.9]"], ["train.betas", "list of 2"]),
    (["data.path=[a, b]"], ["data.path", "string"]),
    (["train.compile=yes please"], ["train.compile", "true/false"]),
    (["train.attention_backend=flash"], ["train.attention_backend", "auto, sdpa or flex"]),
    (["train.atention_backend=flex"], ["train.atention_backend", "attention_backend"]),
    (["train.head_loss=chunked"], ["train.head_loss", "plain or fused"]),
    # ranges
    (["train.max_steps=0"], ["train.max_steps", ">= 1"]),
    (["train.grad_accum=-2"], ["train.grad_accum", ">= 1"]),
    (["train.checkpoint_every=-1"], ["train.checkpoint_every", ">= 0"]),
    (["train.keep_checkpoints=0"], ["train.keep_checkpoints", ">= 1"]),
    (["train.decay_frac=1.5"], ["train.decay_frac", "(0, 1]"]),
    (["train.min_lr_ratio=2"], ["train.min_lr_ratio", "[0, 1]"]),
    (["train.weight_decay=-0.1"], ["train.weight_decay", ">= 0"]),
    (["train.grad_clip=-1"], ["train.grad_clip"]),
    (["train.betas=[0.9, 1.0]"], ["train.betas", "[0, 1)"]),
    (["train.precision=fp16"], ["train.precision", "fp16"]),
    (["train.schedule=linear"], ["train.schedule", "wsd"]),
    (["data.seq_len=4"], ["data.seq_len", ">= 8"]),
    (["data.seq_len=512"], ["data.seq_len=512", "max_position_embeddings=256"]),
    (["data.num_workers=-1"], ["data.num_workers", ">= 0"]),
    (["data.on_bad_data=ignore"], ["data.on_bad_data", "fail or skip"]),
    (["eval.batches=0"], ["eval.batches"]),
    (["train.max_bad_steps=0"], ["train.max_bad_steps", ">= 1"]),
    # unknown keys, with the nearest valid key suggested
    (["trian.max_steps=3"], ["trian", "unknown section", "did you mean 'train'"]),
    (["data.seqlen=64"], ["data.seqlen", "did you mean 'seq_len'"]),
    (["train.learning_rate=0.1"], ["train.learning_rate", "unknown key"]),
    (["model.hiden_size=32"], ["model.hiden_size", "did you mean 'hidden_size'"]),
    (["model.vocab_size=500"], ["model.vocab_size", "set by the data manifest"]),
    (["objectives.mix={mlm: 1, spam: 1}"], ["spam", "'span'"]),
    # YAML's flow map needs a space after each colon: {mlm:1} is the key 'mlm:1' with no value
    (["objectives.mix={mlm:1}"], ["objectives.mix", "'mlm:1'", "space after the colon (mlm: 1)"]),
    # missing paths
    (["train.deepspeed_config=/nonexistent/ds.json"], ["train.deepspeed_config", "file not found"]),
    (["eval.path=/nonexistent/eval"], ["eval.path", "not found"]),
    (["data.sources={/nonexistent/src: 1.0}"], ["data.sources./nonexistent/src", "not found"]),
    (["data.sources={/tmp: -1}"], ["data.sources./tmp", "positive number"]),
    # malformed overrides
    (["train.max_steps"], ["expected key=value"]),
    (["train.max_steps=[1,"], ["not valid YAML"]),
]


def one_line_config_error(exc: pytest.ExceptionInfo, fragments: list[str]) -> None:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    for f in fragments:
        assert f in msg, (f, msg)


@pytest.mark.parametrize("overrides, fragments", OVERRIDE_CASES, ids=[" ".join(c[0]) for c in OVERRIDE_CASES])
def test_malformed_override_is_one_line(tmp_path, overrides, fragments):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [f"data.path={tmp_path}", f"out_dir={tmp_path / 'out'}", *overrides])
    one_line_config_error(e, fragments)


YAML_CASES = [
    ("train: {max_steps: 5\n", ["not valid YAML"]),
    ("train:\n  max_steps: 5\n   lr: 1\n", ["not valid YAML"]),
    ("- just\n- a list\n", ["top level must be a mapping", "list"]),
    ("train: [1, 2]\n", ["train", "expected a mapping"]),
    ("\tdata: {}\n", ["not valid YAML"]),
    ("objectives:\n  mix: {mlm:-0.5}\n", ["objectives.mix", "'mlm:-0.5'", "space after the colon"]),
]


@pytest.mark.parametrize("text, fragments", YAML_CASES, ids=[str(i) for i in range(len(YAML_CASES))])
def test_malformed_yaml_file_is_one_line(tmp_path, text, fragments):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(f, [f"data.path={tmp_path}"])
    one_line_config_error(e, fragments)
    assert str(f) in str(e.value) or "top level" in str(e.value)


BATCH_CASES = [
    ({"train_batch_size": 48}, "train_batch_size=48"),
    ({"train_micro_batch_size_per_gpu": 4}, "train_micro_batch_size_per_gpu=4"),
    ({"gradient_accumulation_steps": 3}, "gradient_accumulation_steps=3"),
]


@pytest.mark.parametrize("override, fragment", BATCH_CASES, ids=[c[1] for c in BATCH_CASES])
def test_inconsistent_batch_sizes_name_every_number(tmp_path, override, fragment):
    ds = json.loads((ROOT / "deepspeed_config.json").read_text())
    ds.update(override)
    f = tmp_path / "ds.json"
    f.write_text(json.dumps(ds))
    cfg = load_config(TINY, [f"train.deepspeed_config={f}", f"data.path={tmp_path}"])
    with pytest.raises(ConfigError) as e:
        resolve_deepspeed_config(cfg, world_size=2, precision="fp32")
    # Two lines by design: the mismatching key, then the arithmetic that fixes it (the CLI prints one error).
    assert fragment in str(e.value) and "8 x grad_accum 1 x world size 2 = 16" in str(e.value)


def assert_cli_one_line(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for f in fragments:
        assert f in errors[0], (f, errors[0])


@pytest.mark.parametrize("kind", ["yaml", "type", "unknown", "path"])
def test_cli_error_path_is_one_line_exit_2(tmp_path, kind):
    config, overrides = str(TINY), [f"data.path={tmp_path}", f"out_dir={tmp_path / 'out'}"]
    if kind == "yaml":
        config = str(tmp_path / "bad.yaml")
        (tmp_path / "bad.yaml").write_text("train: {max_steps: 5\n")
        fragments = ["not valid YAML", "bad.yaml"]
    elif kind == "type":
        overrides.append("train.lr=fast")
        fragments = ["train.lr", "expected a number"]
    elif kind == "unknown":
        overrides.append("data.seqlen=64")
        fragments = ["did you mean 'seq_len'"]
    else:
        overrides.append("train.deepspeed_config=/nonexistent/ds.json")
        fragments = ["train.deepspeed_config", "file not found"]
    proc = run_cli(["launch.train", "--config", config, "--nproc", "2", *overrides], timeout=120)
    assert_cli_one_line(proc, *fragments)
