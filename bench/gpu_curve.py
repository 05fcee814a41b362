"""Does a GPU run follow the CPU fp32 reference curve? Issue 8's correctness check for the optimised path.

    # here, on CPU (once; the result is committed as bench/curve_reference.json):
    .venv/bin/python -m bench.gpu_curve prepare --data runs/curve/data
    .venv/bin/python -m bench.gpu_curve reference --data runs/curve/data
    # on the GPU machine (carry runs/curve/data):
    python -m bench.gpu_curve compare --data runs/curve/data --out curve.json
    # here again, whenever the model or the trainer changes: does the committed reference still hold?
    .venv/bin/python -m bench.gpu_curve compare --device cpu --data runs/curve/data

`reference` trains CURVE_STEPS steps of a small encoder on one CPU rank in fp32 and records the per-step loss of
every micro-batch (rank 0's metrics.jsonl). `compare` trains the same run (same data, seed, init, objective mix
and masks: all are functions of the seed and the step) on the GPU, once in fp32 and once in bf16, and prints, per
precision, the largest per-step loss difference from the reference against the tolerance below. A third run is
the optimised path in bf16 (LEVERS: FlexAttention, compiled layers, the fused head loss), held to the bf16
tolerance.

Tolerances (absolute, in nats of the per-micro-batch loss, over the first CURVE_STEPS steps):
- fp32 on the GPU: FP32_TOL. Both sides compute in fp32; only the summation order of the kernels differs
  (~1e-6 relative per op), and training amplifies the difference step by step, so the first steps agree to a few
  1e-4 and the bound leaves an order of magnitude for that growth.
- bf16 on the GPU: BF16_TOL. bf16 keeps 8 bits of mantissa (relative rounding 2^-9 ~ 0.2%) in the matmuls; the
  loss of a ~7-nat model is then off by ~0.01-0.02 per step at init, and the two trajectories drift apart slowly.
  0.15 nats over 60 steps flags a real bug (a wrong mask, a missing scale, a kernel that drops a document boundary
  moves the loss by far more) without failing on rounding.
The data must be the same files on both machines (the stdlib differs between Python versions), hence `prepare`
here and carrying the folder.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.gpu_speed import LEVERS  # the optimised path: compare runs it in bf16 as a third row

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "bench" / "curve_reference.json"
CURVE_STEPS = 60
FP32_TOL = 5e-3
BF16_TOL = 0.15
OVERRIDES = [
    f"train.max_steps={CURVE_STEPS}", "train.log_every=20", "train.warmup_steps=10", "train.lr=1e-3",
    "train.micro_batch_size=16", "train.grad_accum=1", "train.seed=11", "train.checkpoint_every=0",
    "data.seq_len=128", "data.num_workers=1", "model.hidden_size=256", "model.num_layers=4", "model.num_heads=4",
    "model.intermediate_size=384", "model.max_position_embeddings=512", "eval.path=",
]
"""A small run (4 layers, width 256, 16 x 128 tokens per step) on top of launch/configs/tiny.yaml."""


def prepare(data: Path) -> None:
    from tests.conftest import corpus_files  # the same stdlib slice the tests use

    inputs = [arg for p in corpus_files() for arg in ("--input", f"{p}/**/*.py")]
    subprocess.run([sys.executable, "-m", "launch.prepare", *inputs, "--out", str(data), "--vocab-size", "2000",
                    "--shard-bytes", "400000"], cwd=ROOT, check=True)


def train_curve(data: Path, precision: str, device_env: dict[str, str], extra: list[str] = ()) -> list[dict]:
    """One single-rank run; returns rank 0's per-step records ({"step", "loss": {objective: value}})."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "launch.train", "--config", "launch/configs/tiny.yaml", f"data.path={data}",
               f"out_dir={tmp}/run", f"train.precision={precision}", *OVERRIDES, *extra]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), **device_env}
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"training ({precision} {' '.join(extra)}) failed with exit code {proc.returncode}:\n"
                               f"{proc.stderr[-4000:]}")
        lines = Path(tmp, "run", "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r and isinstance(r["loss"], dict)]


def data_fingerprint(data: Path) -> str:
    """sha256 of manifest.json, which records every shard's and the tokenizer's own sha256."""
    import hashlib

    return hashlib.sha256((data / "manifest.json").read_bytes()).hexdigest()


def differences(reference: list[dict], run: list[dict]) -> list[float]:
    by_step = {r["step"]: r["loss"] for r in reference}
    out = []
    for r in run:
        want = by_step.get(r["step"], {})
        if set(want) != set(r["loss"]):
            raise SystemExit(f"step {r['step']}: objectives {sorted(r['loss'])} differ from the reference's "
                             f"{sorted(want)}: not the same run (data, seed or mix differ)")
        out += [abs(r["loss"][k] - want[k]) for k in want]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_curve", description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["prepare", "reference", "compare"])
    ap.add_argument("--data", type=Path, default=ROOT / "runs" / "curve" / "data")
    ap.add_argument("--reference", type=Path, default=REFERENCE)
    ap.add_argument("--out", type=Path, help="compare: write the comparison as JSON here")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                    help="compare: cuda (the check), or cpu: the fp32 row alone, which shows that the committed "
                         "reference still matches the code (tests/test_bench_curve.py)")
    ap.add_argument("--steps", type=int, default=CURVE_STEPS,
                    help=f"compare: only the first N of the {CURVE_STEPS} steps (train.stop_at: the schedule and "
                         "every step before N are the reference run's own)")
    args = ap.parse_args(argv)
    data = args.data.resolve()
    if args.mode == "prepare":
        prepare(data)
        return 0
    if not (data / "manifest.json").is_file():
        sys.exit(f"{data}: no prepared data; run `python -m bench.gpu_curve prepare --data {data}` (on the CPU "
                 f"machine, then carry the folder)")
    if args.mode == "reference":
        try:
            curve = train_curve(data, "fp32", {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"})
        except RuntimeError as e:
            sys.exit(str(e))
        args.reference.write_text(json.dumps({"data_manifest_sha256": data_fingerprint(data),
                                              "overrides": OVERRIDES, "device": "CPU fp32, 1 rank",
                                              "steps": curve}, indent=0) + "\n")
        print(f"wrote {args.reference}: {len(curve)} steps")
        return 0
    ref = json.loads(args.reference.read_text())
    if ref["data_manifest_sha256"] != data_fingerprint(data) or ref["overrides"] != OVERRIDES:
        sys.exit(f"{args.reference} was recorded on other data or another config; carry the data folder that "
                 f"`prepare` wrote, or record the reference again")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("compare needs a GPU (the reference is the CPU run); --device cpu checks the reference itself")
    if not 1 <= args.steps <= CURVE_STEPS:
        sys.exit(f"--steps {args.steps}: choose 1 to {CURVE_STEPS}")
    rows = []
    runs = [("fp32", "fp32", [], FP32_TOL), ("bf16", "bf16", [], BF16_TOL),
            ("bf16, flex + compile + fused head loss", "bf16", LEVERS, BF16_TOL)]
    if args.device == "cpu":
        # The same code and data on a CPU: the reference's own run again, off only by this CPU's kernels.
        runs, device_env, name = runs[:1], {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}, "cpu"
    else:
        device_env, name = {}, torch.cuda.get_device_name(0)
    print(f"| {name} vs CPU fp32 reference | steps | max |loss diff| | first 10 steps | tolerance | ok |")
    print("| --- | --- | --- | --- | --- | --- |", flush=True)
    # Each row is printed and saved as soon as it is measured: a run ended at a deadline keeps the rows before.
    for label, precision, extra, tol in runs:
        try:
            stop = [f"train.stop_at={args.steps}"] if args.steps < CURVE_STEPS else []
            diffs = differences(ref["steps"], train_curve(data, precision, device_env, [*extra, *stop]))
        except RuntimeError as e:  # the next rows still run: each is another path to check
            print(e, file=sys.stderr, flush=True)
            rows.append({"precision": label, "error": str(e)[-2000:], "tolerance": tol, "ok": False})
            print(f"| {label} | failed: {str(e).splitlines()[0][:100]} | | | {tol:.0e} | NO |", flush=True)
        else:
            r = {"precision": label, "steps": len(diffs), "max_abs_diff": max(diffs),
                 "max_abs_diff_first_10": max(diffs[:10]), "tolerance": tol, "ok": max(diffs) <= tol}
            rows.append(r)
            print(f"| {r['precision']} | {r['steps']} | {r['max_abs_diff']:.2e} | {r['max_abs_diff_first_10']:.2e} "
                  f"| {r['tolerance']:.0e} | {'yes' if r['ok'] else 'NO'} |", flush=True)
        if args.out:
            args.out.write_text(json.dumps({"device": name, "rows": rows}, indent=1) + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
