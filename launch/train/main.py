"""`python -m launch.train --config launch/configs/demo.yaml [key=value ...]`: parse, build, train, close.

Run one process per rank under torchrun, the deepspeed launcher or srun; a bare `python -m launch.train` is a
one-rank world. `--nproc N` starts N local ranks under torchrun for you (CPU or one node).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from data.manifest import Manifest
    from launch.config import RunConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m launch.train", description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="YAML training config, e.g. launch/configs/demo.yaml")
    ap.add_argument("--nproc", type=int, default=0,
                    help="start this many local ranks with torchrun (default: use the launcher's environment)")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the resolved config, DeepSpeed config, batch arithmetic, model size, FLOPs and "
                         "memory per rank under ZeRO 0-3, then exit")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=50 data.seq_len=256")
    return ap.parse_intermixed_args(argv)


def check_run_dir(cfg: RunConfig, manifest: Manifest) -> None:
    """Before the ranks start: a live run holding out_dir, or a checkpoint there trained on other data, is one
    error here rather than one per rank. The ranks check both again (rank 0 takes the lock itself)."""
    from launch.train import checkpoint, runlock
    from launch.train.checkpoint import load_run_info
    from launch.train.resume import check_same_data, data_identity

    out = Path(cfg.out_dir)
    runlock.check_free(out)
    ckpt_dir = out / "checkpoints"
    tag = checkpoint.read_latest(ckpt_dir, warn=False) if ckpt_dir.is_dir() else None
    if tag is None:
        return
    if cfg.data.sources:
        from data.location import Location

        sources = [(spec, Location(spec).manifest(check_files=False)) for spec in cfg.data.sources]
    else:
        sources = [(cfg.data.path, manifest)]
    try:
        info = load_run_info(ckpt_dir, tag)
    except (OSError, ValueError):
        return  # a damaged checkpoint: the ranks report it, naming the file
    check_same_data(info, data_identity(manifest.tokenizer_sha256, sources), ckpt_dir / tag)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from launch.config import load_config

    cfg = load_config(args.config, args.overrides)  # validate before spawning anything
    world = args.nproc or int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)
    from launch.train.preflight import preflight

    pre = preflight(cfg, world)
    if args.dry_run:
        from launch.train.dry_run import describe, expected_labelled_fraction

        print(describe(cfg, world, pre.ds_config, pre.tokenizer.vocab_size, pre.precision,
                       expected_labelled_fraction(cfg), pre.init_from.encoder if pre.init_from else None))
        return 0
    if args.nproc and "RANK" not in os.environ:
        from launch.train import localrun
        from launch.train.dist import env_var, free_port

        check_run_dir(cfg, pre.manifest)

        os.environ.setdefault("OMP_NUM_THREADS", "1")
        # torchrun's launcher runs in this process (it has torch imported already; a separate launcher process
        # would import it again, ~2 s before any rank starts); the ranks are its subprocesses.
        launcher_args = ["--nnodes", "1", "--nproc_per_node", str(args.nproc), "--master_addr", "127.0.0.1",
                         "--master_port", str(free_port()), "-m", "launch.train", "--config", args.config,
                         *args.overrides]
        with tempfile.TemporaryDirectory() as tmp:
            exit_file = os.path.join(tmp, "exit")
            with env_var("CLOZE_EXIT_FILE", exit_file):
                rc = localrun.main(launcher_args)
            if rc != 0 and os.path.exists(exit_file):
                codes = [int(x) for x in open(exit_file).read().split()]
                return max(codes) if codes else rc
            return rc

    from launch.train.dist import bootstrap_env
    from launch.train.trainer import run

    env = bootstrap_env()
    run(cfg, env)
    return 0

