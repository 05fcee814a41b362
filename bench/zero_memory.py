"""Per-rank memory of model states under ZeRO 1, 2 and 3 at world sizes 1, 2 and 4 (CPU, gloo), measured on a
live DeepSpeed engine and compared with the formula `--dry-run` uses (launch/train/dry_run.py).

    .venv/bin/python -m bench.zero_memory [--hidden 256 --layers 4 --vocab 8000 --precision fp32]

Measured per rank after one optimizer step: the bytes of every tensor in the ZeRO optimizer's state_dict (the fp32
master partition plus Adam's two moments, i.e. what this rank owns), and the bytes of this rank's share of the
module parameters (under ZeRO-3 the local partition `ds_tensor`). Gradients are freed after the step and are shown
from the formula only. Prints one table: the ratio column is measured / formula for the optimizer state (the term
that ZeRO partitions first and that dominates at scale).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def tensor_bytes(obj) -> int:
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def worker(args) -> None:
    import deepspeed
    import torch

    from launch.config import TrainConfig
    from launch.train.optim import build_optimizer
    from model.config import EncoderConfig
    from model.heads import EncoderForPretraining

    deepspeed.init_distributed(dist_backend="gloo")
    world = int(os.environ["WORLD_SIZE"])
    cfg = EncoderConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                        num_heads=max(1, args.hidden // 64), intermediate_size=args.hidden * 3 // 2)
    torch.manual_seed(0)
    model = EncoderForPretraining(cfg)
    params = sum(p.numel() for p in model.parameters())
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 2 * world,
          "zero_optimization": {"stage": args.stage}, "bf16": {"enabled": args.precision == "bf16"},
          "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, TrainConfig()), config=ds)
    ids = torch.randint(9, args.vocab, (2, 32))
    labels = torch.where(torch.rand(2, 32) < 0.15, ids, torch.full_like(ids, -100))
    labels[0, 0] = ids[0, 0]
    engine.backward(engine(input_ids=ids, labels=labels).loss)
    engine.step()
    optim = tensor_bytes(engine.optimizer.state_dict())
    local = sum((p.ds_tensor if hasattr(p, "ds_tensor") else p).numel() * p.element_size()
                for p in engine.module.parameters())
    if int(os.environ["RANK"]) == 0:
        Path(args.result).write_text(json.dumps({"params": params, "optimizer_bytes": optim, "param_bytes": local}))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    from launch.train.dist import exit_skipping_teardown

    exit_skipping_teardown(0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--worlds", default="1,2,4")
    ap.add_argument("--stage", type=int, default=-1, help=argparse.SUPPRESS)
    ap.add_argument("--result", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.result:
        worker(args)
        return 0

    from launch.train.dist import free_port
    from launch.train.dry_run import zero_memory_bytes

    rows = []
    for stage in (1, 2, 3):
        for world in map(int, args.worlds.split(",")):
            with tempfile.TemporaryDirectory() as tmp:
                result = Path(tmp) / "r.json"
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
                       "--master_port", str(free_port()),
                       "-m", "bench.zero_memory", f"--stage={stage}", f"--result={result}",
                       f"--hidden={args.hidden}", f"--layers={args.layers}", f"--vocab={args.vocab}",
                       f"--precision={args.precision}"]
                env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore"}
                proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.exit(f"stage {stage}, world {world} failed:\n{proc.stderr[-3000:]}")
                r = json.loads(result.read_text())
            f = zero_memory_bytes(r["params"], stage, world, args.precision)
            rows.append((stage, world, r["params"], r["param_bytes"], f["weights"], r["optimizer_bytes"],
                         f["optimizer"], f["grads"]))
    mib = 2**20
    print(f"ZeRO per-rank model-state memory, {args.precision}, CPU gloo; model: hidden {args.hidden}, "
          f"{args.layers} layers, vocab {args.vocab}")
    print("| stage | world | params | weights measured | weights formula | optimizer measured | optimizer formula "
          "| ratio | grads formula |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for stage, world, p, wm, wf, om, of, gf in rows:
        print(f"| {stage} | {world} | {p:,} | {wm / mib:.2f} MiB | {wf / mib:.2f} MiB | {om / mib:.2f} MiB | "
              f"{of / mib:.2f} MiB | {om / of:.2f} | {gf / mib:.2f} MiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
