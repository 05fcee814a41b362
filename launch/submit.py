"""`python -m launch.submit --config X --nodes N --gpus-per-node G [...] [--dry-run] [key=value ...]`: render, submit.

Renders launch/slurm/pretrain.sbatch from the training config (validated first, so a typo costs no queue time),
writes it to <out_dir>/slurm/pretrain.sbatch and submits it with sbatch; prints the job id on stdout (and nothing
else there, so `JOB=$(python -m launch.submit ...)` works). `--dry-run` prints the script instead.
`python -m launch.submit export --checkpoint RUN --out DIR [--after JOB]` does the same for an export job.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from launch.cli import run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The job kind is an optional first word; an argparse positional would swallow the first key=value override.
    kind = argv.pop(0) if argv and argv[0] in ("pretrain", "export") else "pretrain"
    ap = argparse.ArgumentParser(prog="python -m launch.submit [pretrain|export]",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="training config (pretrain), e.g. launch/configs/demo.yaml")
    ap.add_argument("--checkpoint", help="export: run dir, its checkpoints/ dir or one step_XXXXXXXX dir")
    ap.add_argument("--out", help="export: output folder of the Hugging Face model")
    ap.add_argument("--with-head", action="store_true", help="export: keep the MLM head")
    ap.add_argument("--no-verify", action="store_true", help="export: skip the transformers parity check")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", type=int, default=0, help="one rank per GPU; 0 for a CPU job (gloo)")
    ap.add_argument("--tasks-per-node", type=int, default=0, help="ranks per node (default: one per GPU, else 1)")
    ap.add_argument("--cpus-per-task", type=int, default=0, help="cores per rank (default: Slurm's, 1)")
    ap.add_argument("--partition", default="", help="Slurm partition (default: the cluster's default)")
    ap.add_argument("--time", default="", help="time limit, e.g. 2-00:00:00 (default: the partition's)")
    ap.add_argument("--account", default="", help="account to charge (default: yours)")
    ap.add_argument("--job-name", default="", help="default: cloze-<config name> / cloze-export")
    ap.add_argument("--signal-seconds", type=int, default=300,
                    help="USR1 this long before the time limit: one step plus one checkpoint must fit (default 300)")
    ap.add_argument("--launcher", choices=("srun", "torchrun"), default="srun",
                    help="srun: one task per rank (default); torchrun: one torchrun per node")
    ap.add_argument("--python", default=sys.executable, help="interpreter on the compute nodes (default: this one)")
    ap.add_argument("--setup", action="append", default=[], metavar="LINE",
                    help="shell line run before launching, e.g. 'module load cuda' (repeatable)")
    ap.add_argument("--sbatch-arg", action="append", default=[], metavar="OPTION",
                    help="extra #SBATCH option, e.g. --qos=high (repeatable)")
    ap.add_argument("--after", default="", metavar="JOB", help="start only after job JOB completed successfully")
    ap.add_argument("--dry-run", action="store_true", help="print the script; submit nothing")
    ap.add_argument("overrides", nargs="*", help="pretrain: key=value config overrides, e.g. train.max_steps=50")
    args = ap.parse_args(argv)
    args.kind = kind
    return args


def build(args: argparse.Namespace) -> tuple[str, Path]:
    """(script text, path to keep it at). Raises ValueError/ConfigError for user mistakes."""
    from launch.slurm.render import JobSpec, check_one_line, log_dir, render_export, render_pretrain

    # First, as the job name and the log path are derived from these (the renderers check them again).
    for flag, value in (("--config", args.config), ("--checkpoint", args.checkpoint), ("--out", args.out)):
        check_one_line(flag, value or "")
    common = dict(nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
                  cpus_per_task=args.cpus_per_task, partition=args.partition, time=args.time, account=args.account,
                  signal_seconds=args.signal_seconds, launcher=args.launcher, python=args.python,
                  setup=list(args.setup), sbatch_args=list(args.sbatch_arg),
                  dependency=f"afterok:{args.after}" if args.after else "")
    if args.after and not args.after.isdigit():
        raise ValueError(f"--after {args.after!r}: expected a job id (digits)")
    if args.kind == "export":
        if not args.checkpoint or not args.out:
            raise ValueError("submit export needs --checkpoint RUN_DIR and --out DIR")
        if args.config or args.overrides:
            raise ValueError("submit export takes no --config or overrides (the checkpoint holds its config)")
        if args.nodes != 1:
            raise ValueError(f"an export runs on one node; drop --nodes {args.nodes}")
        from launch.export.main import check_out_of_run

        # The run may not exist yet (--after): its folder follows from the path (RUN, RUN/checkpoints[/step_N]).
        ckpt = Path(args.checkpoint)
        run_dir = ckpt.parent if ckpt.name.startswith("step_") else ckpt
        check_out_of_run(Path(args.out), run_dir.parent if run_dir.name == "checkpoints" else run_dir)
        spec = JobSpec(job_name=args.job_name or "cloze-export", **common)
        extra = (["--with-head"] if args.with_head else []) + (["--no-verify"] if args.no_verify else [])
        text = render_export(args.checkpoint, args.out, spec, extra)
        out_abs = Path(args.out).resolve()
        return text, out_abs.parent / "slurm" / f"export-{out_abs.name}.sbatch"
    if not args.config:
        raise ValueError("submit needs --config, e.g. --config launch/configs/demo.yaml")
    spec = JobSpec(job_name=args.job_name or f"cloze-{Path(args.config).stem}", **common)  # cheap checks first
    from launch.config import load_config

    cfg = load_config(args.config, args.overrides)
    text = render_pretrain(args.config, list(args.overrides), spec, cfg.out_dir, cfg.train.max_steps)
    return text, log_dir(cfg.out_dir) / "pretrain.sbatch"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    text, keep = build(args)
    if args.dry_run:
        sys.stdout.write(text)
        return 0
    from launch.slurm.client import SlurmError, submit

    keep.parent.mkdir(parents=True, exist_ok=True)  # sbatch does not create the log's directory
    keep.write_text(text)
    try:
        job_id = submit(keep)
    except SlurmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(job_id, flush=True)
    print(f"[cloze] submitted job {job_id} ({keep}); follow it with `python -m launch.status {job_id}`",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
