"""A real 2-rank DeepSpeed ZeRO-2 run (torchrun, gloo, CPU) of the tiny config: disjoint shards, falling loss,
a checkpoint that reloads and continues, and the export of that checkpoint loading in stock transformers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def tiny_run(tiny_data, tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("run") / "train"
    proc = run_cli(["launch.train", "--config", "launch/configs/tiny.yaml", "--nproc", "2", f"out_dir={out}",
                    f"data.path={tiny_data}", "train.max_steps=40", "train.checkpoint_every=20"], check=True)
    return out, proc


def read_steps(out: Path) -> list[dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r]  # per-step training records (eval records have eval/* keys)


def test_two_ranks_deal_out_one_global_sequence(tiny_run):
    out, _ = tiny_run
    tag = (out / "checkpoints" / "latest").read_text().strip()
    states = [json.loads((out / "checkpoints" / tag / f"trainer_state_rank{r}.json").read_text()) for r in (0, 1)]
    # both ranks walk the same global rows (each keeps its slice of every step): one position, one shard history
    assert states[0]["consumed_shards"] and states[0]["consumed_shards"] == states[1]["consumed_shards"]
    position = [{k: v for k, v in s["stream"].items() if k != "layout"} for s in states]
    assert position[0] == position[1] and position[0]["rows"] == 40 * 8 * 2  # 40 steps x 8 rows x 2 ranks
    assert all(s["world_size"] == 2 for s in states)


def test_loss_falls(tiny_run):
    out, _ = tiny_run
    steps = read_steps(out)
    assert [s["step"] for s in steps] == list(range(1, 41))
    mlm = [s["loss"]["mlm"] for s in steps if "mlm" in s["loss"]]
    # Initial loss is about ln(1000) = 6.9; 40 steps at lr 3e-3 bring it well down. The 0.5 margin is several times
    # the step-to-step noise of these 8x64-token micro-batches.
    first, last = sum(mlm[:5]) / 5, sum(mlm[-5:]) / 5
    assert last < first - 0.5, (first, last)


def test_progress_and_tensorboard(tiny_run):
    out, proc = tiny_run
    assert "step     40/40" in proc.stderr and "tok/s" in proc.stderr
    assert "error" not in proc.stderr.lower()
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for name in ("loss/mlm", "loss/span", "loss/causal", "accuracy/mlm", "lr", "tokens_per_s", "samples_per_s",
                 "grad_norm", "data_wait_share", "memory_gib"):
        assert name in tags, (name, tags)
        values = [e.value for e in acc.Scalars(name)]
        assert values and all(math.isfinite(v) for v in values), (name, values)
    assert "mfu" not in tags  # CPU: no peak to divide by, so no made-up MFU
    # Useful FLOPs per token (from the per-micro-batch count) must lie between the dense matmuls alone and the
    # full-square, every-position-labelled upper bound of the tiny model (hidden 64, 2 layers, GeGLU 96).
    from model.config import EncoderConfig

    cfg = EncoderConfig(vocab_size=1000, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96)
    useful = [e.value for e in acc.Scalars("useful_tflops_per_device")]
    rates = [e.value for e in acc.Scalars("tokens_per_s")]
    for flops, rate in zip(useful, rates, strict=True):
        per_token = flops * 1e12 * 2 / rate  # 2 ranks: the rate is summed over them, the FLOPs are per device
        assert 6 * cfg.num_params(include_embeddings=False) * 0.9 < per_token < cfg.flops_per_token(64, 1.0)


def test_checkpoint_reloads_and_continues(tiny_run, tiny_data):
    out, _ = tiny_run
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000040"
    assert (ckpts / "step_00000020").is_dir(), "checkpoint_every=20 should have kept the step-20 checkpoint"
    before = read_steps(out)
    proc = run_cli(["launch.train", "--config", "launch/configs/tiny.yaml", "--nproc", "2", f"out_dir={out}",
                    f"data.path={tiny_data}", "train.max_steps=44", "train.checkpoint_every=20"], check=True)
    assert "resumed from" in proc.stderr and "step_00000040" in proc.stderr
    after = read_steps(out)
    assert [s["step"] for s in after[len(before):]] == [41, 42, 43, 44]
    assert (ckpts / "latest").read_text().strip() == "step_00000044"


def test_export_loads_in_transformers_and_matches(tiny_run, tmp_path):
    out, _ = tiny_run
    export = tmp_path / "export"
    proc = run_cli(["launch.export", "--checkpoint", str(out), "--out", str(export)], check=True)
    assert "verified" in proc.stderr
    from transformers import AutoModel, AutoTokenizer

    from launch.train.checkpoint import consolidate
    from model.config import EncoderConfig
    from model.heads import EncoderForPretraining

    model, info = AutoModel.from_pretrained(export, output_loading_info=True)
    assert not any(info.values()), info
    assert type(model).__name__ == "ModernBertModel"
    tok = AutoTokenizer.from_pretrained(export)
    tag = (out / "checkpoints" / "latest").read_text().strip()
    # The checkpoint keeps the tokenizer model the run read and checked, not the folder the manifest names.
    assert [p.name for p in (out / "checkpoints" / tag / "tokenizer").iterdir()] == ["spm.model"]
    run = json.loads((out / "checkpoints" / tag / "run.json").read_text())
    ours = EncoderForPretraining(EncoderConfig.from_dict(run["encoder"]))
    ours.load_state_dict(consolidate(out / "checkpoints", tag, run["zero_stage"]))
    ours.eval()
    model.eval()
    torch.manual_seed(0)
    ids = torch.randint(9, run["encoder"]["vocab_size"], (2, 50))
    with torch.no_grad():
        theirs = model(input_ids=ids).last_hidden_state
        mine = ours.encoder(ids)
    assert (theirs - mine).abs().max().item() < 1e-4
    enc = tok("def f(x):\n    return x  # comment")
    assert enc["input_ids"][0] == tok.cls_token_id and enc["input_ids"][-1] == tok.sep_token_id
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in export.iterdir()}


def test_resume_is_bit_exact(tiny_data, tmp_path):
    """Stopped at step 6 and resumed, steps 7..12 reproduce the uninterrupted run's losses exactly (CPU fp32:
    same world, same reduction order, so the tolerance is 0). The trainer prefetches the next micro-batch, across
    step boundaries too; the checkpoint must still record the stream's position at the step boundary. (Two
    micro-batches per step: tests/test_schedules_resume.py resumes a grad_accum=2 run the same way.)"""
    common = ["--config", "launch/configs/tiny.yaml", "--nproc", "2", f"data.path={tiny_data}", "train.max_steps=12",
              "train.log_every=3", "train.micro_batch_size=8"]
    run_cli(["launch.train", *common, f"out_dir={tmp_path / 'a'}"], check=True)
    first = run_cli(["launch.train", *common, f"out_dir={tmp_path / 'b'}", "train.stop_at=6"], check=True)
    assert "stopped at step 6" in first.stderr
    second = run_cli(["launch.train", *common, f"out_dir={tmp_path / 'b'}"], check=True)
    assert "resumed from" in second.stderr
    a, b = read_steps(tmp_path / "a"), read_steps(tmp_path / "b")
    assert [r["step"] for r in b] == list(range(1, 13)), "a gap or a repeated step in the resumed curve"
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["lr"] for r in a] == [r["lr"] for r in b]


def test_nan_loss_skips_the_step_and_repeated_nans_halt(tiny_data, tmp_path):
    common = ["launch.train", "--config", "launch/configs/tiny.yaml", "--nproc", "2", f"data.path={tiny_data}",
              "train.max_steps=8", "train.log_every=4"]
    proc = run_cli([*common, f"out_dir={tmp_path / 'one'}"], env={"CLOZE_FAULT_NAN_STEPS": "3"}, check=True)
    assert "step 3: non-finite loss" in proc.stderr
    summary = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert summary["skipped_steps"] == 1 and summary["steps"] == 8
    steps = read_steps(tmp_path / "one")
    assert steps[2]["step"] == 3 and steps[2]["loss"] == {}  # the skipped micro-batch logged no loss
    finite = [v for s in steps for v in s["loss"].values()]
    assert len(finite) == 7 and all(v == v and abs(v) < 100 for v in finite)  # weights stayed finite afterwards

    proc = run_cli([*common, f"out_dir={tmp_path / 'many'}", "train.max_bad_steps=2"],
                   env={"CLOZE_FAULT_NAN_STEPS": "2,3,4"})
    assert proc.returncode != 0
    assert "training halted: 2 steps in a row with a non-finite loss (last: step 3)" in proc.stderr


def test_fused_head_loss_and_compiled_layers_train_like_eager(tiny_data, tmp_path):
    """Against the shipped path (eager layers, plain head loss), fp32, 2 ranks, 6 steps:
    - train.head_loss=fused: per-step losses within 1e-5 (only the summation order of the head's gradients
      differs);
    - train.compile=true with the fused head loss (torch.compile of each encoder layer and of the head loss's
      chunk, inductor's CPU backend here): within 1e-4 (inductor fuses and reorders the elementwise ops, ~1e-6
      relative per op, which a few steps of training amplify)."""
    common = ["--config", "launch/configs/tiny.yaml", "--nproc", "2", f"data.path={tiny_data}", "train.max_steps=6",
              "train.log_every=3"]
    run_cli(["launch.train", *common, f"out_dir={tmp_path / 'eager'}"], check=True)
    proc = run_cli(["launch.train", *common, f"out_dir={tmp_path / 'fused'}", "train.head_loss=fused"], check=True)
    assert "head loss fused" in proc.stderr
    proc = run_cli(["launch.train", *common, f"out_dir={tmp_path / 'compiled'}", "train.compile=true",
                    "train.head_loss=fused"], check=True)
    assert "torch.compile: 2 encoder layers and the fused head loss's chunk" in proc.stderr
    eager = read_steps(tmp_path / "eager")
    for name, tol in (("fused", 1e-5), ("compiled", 1e-4)):
        other = read_steps(tmp_path / name)
        assert [r["step"] for r in other] == list(range(1, 7)), name
        for a, b in zip(eager, other, strict=True):
            assert a["loss"].keys() == b["loss"].keys()
            for k in a["loss"]:
                assert abs(a["loss"][k] - b["loss"][k]) < tol, (name, a, b)


def test_fused_head_loss_in_bf16_follows_plain(tiny_data, tmp_path):
    """DeepSpeed's bf16 path (bf16 weights, fp32 master copy, ZeRO-2) with the fused head loss: its fp32 weight
    gradient is cast to the bf16 parameter's dtype in backward. Per-step losses within 0.01 of the plain path's
    over 6 steps (the two round the head's gradients to bf16 at different points, 2^-9 relative; measured 4e-4)."""
    common = ["--config", "launch/configs/tiny.yaml", "--nproc", "2", f"data.path={tiny_data}", "train.max_steps=6",
              "train.log_every=3", "train.precision=bf16"]
    for head_loss in ("plain", "fused"):
        run_cli(["launch.train", *common, f"out_dir={tmp_path / head_loss}", f"train.head_loss={head_loss}"],
                check=True)
    plain, fused = read_steps(tmp_path / "plain"), read_steps(tmp_path / "fused")
    assert [r["step"] for r in fused] == list(range(1, 7))
    for a, b in zip(plain, fused, strict=True):
        assert a["loss"].keys() == b["loss"].keys()
        for k in a["loss"]:
            assert abs(a["loss"][k] - b["loss"][k]) < 0.01, (a, b)


@pytest.mark.parametrize("stage", [0, 2])
def test_a_nan_gradient_under_a_finite_loss(tiny_data, tmp_path, stage):
    """A NaN gradient under a finite loss at step 5 (the loss guard cannot see it). ZeRO-2 skips that update itself
    (DeepSpeed's gradient-norm check): the trainer says so, counts it, and the run ends with finite weights. ZeRO-0
    has no such check, so the NaN reaches the weights: the run halts at its next checkpoint (step 8) with exit 3
    instead of writing it, and `latest` keeps step 4."""
    out = tmp_path / "run"
    proc = run_cli(["launch.train", "--config", "launch/configs/tiny.yaml", "--nproc", "2", f"data.path={tiny_data}",
                    f"out_dir={out}", "train.max_steps=8", "train.checkpoint_every=4", "train.log_every=4",
                    f"train.zero_stage={stage}"], env={"CLOZE_FAULT_NAN_GRAD_STEPS": "5"})
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    if stage == 2:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "step 5: non-finite gradient norm; DeepSpeed skipped the update (1 in all)" in proc.stderr
        summary = json.loads((out / "summary.json").read_text())
        assert summary["skipped_updates_nonfinite_grad"] == 1 and summary["skipped_steps"] == 0
        assert all(v == v for r in read_steps(out) for v in r["loss"].values())  # no NaN loss afterwards
        return
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "weights are non-finite after step 8" in proc.stderr and "step_00000004" in proc.stderr, proc.stderr[-3000:]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert not (out / "checkpoints" / "step_00000008").exists()
