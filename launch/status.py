"""`python -m launch.status JOB [--log N] [--json]`: state, nodes, elapsed time and the last logged step of a job.

The run directory comes from the job's --comment (written by `launch.submit`), the last step from the last line of
<out_dir>/metrics.jsonl (rank 0 writes one per optimizer step, across restarts). Exit status 0 when the
controller knows the job, 1 when it does not (or Slurm failed: the message says why).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from launch.cli import run_cli


def last_jsonl_record(path: Path, tail_bytes: int = 65536) -> dict | None:
    """The last complete JSON line of a file that may be growing (a half-written last line is skipped)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - tail_bytes))
            lines = f.read().decode("utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return None
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            return record
    return None


def fmt_elapsed(seconds: int) -> str:
    """Slurm's own style, [D-]HH:MM:SS (launch.train.metrics has one too, but importing it pulls in torch)."""
    days, rem = divmod(max(0, int(seconds)), 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    return (f"{days}-" if days else "") + f"{h:02d}:{m:02d}:{s:02d}"


def tail(path: str | Path, n: int) -> list[str]:
    try:
        return Path(path).read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


def collect(job_id: str) -> dict | None:
    """Everything the status line shows, as a dict (also `--json`'s output); None for an unknown job."""
    from launch.slurm.client import job_info
    from launch.slurm.render import parse_comment

    info = job_info(job_id)
    if info is None:
        return None
    meta = parse_comment(info.comment)
    # A pretraining job names its run directory, an export job its output folder.
    out = {**asdict(info), "nodes": info.nodes, "kind": meta.get("kind", ""),
           "out_dir": meta.get("out_dir") or meta.get("out", ""),
           "max_steps": int(meta["max_steps"]) if meta.get("max_steps", "").isdigit() else None,
           "last_step": None, "last_loss": None, "metrics": None}
    if out["kind"] == "pretrain" and out["out_dir"]:
        metrics = Path(out["out_dir"]) / "metrics.jsonl"
        out["metrics"] = str(metrics)
        record = last_jsonl_record(metrics)
        if record is not None:
            out["last_step"], out["last_loss"] = record.get("step"), record.get("loss")
    return out


def format_status(s: dict) -> str:
    lines = [f"job {s['job_id']} ({s['name']}): {s['state']}"
             + (f", reason {s['reason']}" if s["reason"] not in ("", "None") else "")
             + (f", exit code {s['exit_code']}" if s["state"] not in ("RUNNING", "PENDING") else "")]
    nodes = f"{s['nodelist']} ({', '.join(s['nodes'])})" if s["nodes"] else "(none yet)"
    lines.append(f"nodes:     {nodes}, {s['tasks']} task(s), partition {s['partition']}")
    lines.append(f"elapsed:   {fmt_elapsed(s['elapsed_s'])}, restarts {s['restart_count']}")
    if s["kind"] == "pretrain":
        if s["last_step"] is None:
            lines.append(f"last step: none logged yet ({s['metrics']})")
        else:
            of = f"/{s['max_steps']}" if s["max_steps"] else ""
            loss = s["last_loss"]
            loss_text = (" ".join(f"{k} {v:.4f}" for k, v in loss.items()) if isinstance(loss, dict)
                         else str(loss))
            lines.append(f"last step: {s['last_step']}{of}, loss {loss_text} ({s['metrics']})")
    elif s["kind"] == "export":
        lines.append(f"export to: {s['out_dir'] or '?'}")
    lines.append(f"log:       {s['stdout']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.status", description=__doc__.splitlines()[0])
    ap.add_argument("job", help="Slurm job id (printed by launch.submit)")
    ap.add_argument("--log", type=int, default=0, metavar="N", help="also print the last N lines of the job's log")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = ap.parse_args(argv)
    from launch.slurm.client import SlurmError

    try:
        s = collect(args.job)
    except SlurmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if s is None:
        print(f"error: job {args.job} is not known to the Slurm controller (a wrong id, or it ended more than "
              f"MinJobAge ago: see `scontrol show config | grep MinJobAge`; sacct may still know it)",
              file=sys.stderr)
        return 1
    print(json.dumps(s) if args.json else format_status(s))
    if args.log:
        print(f"--- last {args.log} lines of {s['stdout']}")
        print("\n".join(tail(s["stdout"], args.log)))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
