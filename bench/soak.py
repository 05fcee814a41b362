"""Soak: train the tiny config for a given duration while killing a random rank at random moments and restarting,
then compare with an uninterrupted run of the same steps.

    .venv/bin/python -m bench.soak --duration 600

Because every batch and mask is a pure function of (seed, step, rank) and the loader position, a resumed run
that lost or repeated any sample would see different data at some step and its loss there would differ from the
uninterrupted run's. So: samples lost or duplicated = 0 exactly when every step's loss (rank 0's, the last launch
that logged it) equals the reference bit for bit. Steps recomputed = steps logged more than once (trained after
the last checkpoint before a kill, then again after the restart). Prints one table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def launch(data: Path, out: Path, max_steps: int, every: int, pid_dir: Path | None, extra=()) -> subprocess.Popen:
    """Start one job; its output goes to <out>.log (a pipe nobody drains would block the job once full)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    if pid_dir:
        env["CLOZE_FAULT_PID_DIR"] = str(pid_dir)
    cmd = [sys.executable, "-m", "launch.train", "--config", "launch/configs/tiny.yaml", "--nproc", "2",
           f"data.path={data}", f"out_dir={out}", f"train.max_steps={max_steps}", f"train.checkpoint_every={every}",
           "train.log_every=50", "train.keep_checkpoints=2", *extra]
    out.parent.mkdir(parents=True, exist_ok=True)
    log = open(out.with_suffix(".log"), "a")
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)


def tail(out: Path) -> str:
    return out.with_suffix(".log").read_text()[-3000:]


def last_losses(out: Path) -> dict[int, dict]:
    steps: dict[int, dict] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            steps[r["step"]] = r["loss"]
    return steps


def logged_steps(out: Path) -> list[int]:
    return [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in ln]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=600, help="seconds of killing and restarting")
    ap.add_argument("--max-steps", type=int, default=100000)
    ap.add_argument("--checkpoint-every", type=int, default=25)
    ap.add_argument("--kill-after", type=float, nargs=2, default=(4.0, 20.0), help="uniform seconds between kills")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", default="", help="prepared data (default: prepare a stdlib slice)")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="cloze-soak-"))
    data = Path(args.data) if args.data else tmp / "data"
    if not args.data:
        import sysconfig

        std = Path(sysconfig.get_paths()["stdlib"])
        inputs = [a for p in ("json", "email", "logging", "urllib", "http") for a in ("--input", f"{std}/{p}/**/*.py")]
        subprocess.run([sys.executable, "-m", "launch.prepare", *inputs, "--out", str(data), "--vocab-size", "1000",
                        "--shard-bytes", "200000"], cwd=ROOT, check=True, capture_output=True)
    out, pids = tmp / "soak", tmp / "pids"
    pids.mkdir()
    kills, t0 = 0, time.time()
    while time.time() - t0 < args.duration:
        for f in pids.glob("*.pid"):
            f.unlink()
        proc = launch(data, out, args.max_steps, args.checkpoint_every, pids)
        up = time.time()
        while len(list(pids.glob("rank*.pid"))) < 2 and proc.poll() is None and time.time() - up < 120:
            time.sleep(0.1)  # both ranks built their engines (the kill then lands in training or a save)
        wait = rng.uniform(*args.kill_after)
        try:
            proc.wait(timeout=min(wait, max(1.0, args.duration - (time.time() - t0))))
            if proc.returncode != 0:
                sys.exit(f"soak run failed on its own (exit {proc.returncode}):\n{tail(out)}")
            break  # finished max_steps
        except subprocess.TimeoutExpired:
            pass
        victims = sorted(pids.glob("rank*.pid"))
        if victims:
            victim = rng.choice(victims)
            os.kill(int(victim.read_text()), signal.SIGKILL)
            kills += 1
            print(f"[soak] {time.time() - t0:.0f} s: SIGKILL {victim.stem} after {wait:.1f} s "
                  f"(last logged step {max(logged_steps(out), default=0)})", file=sys.stderr, flush=True)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            sys.exit(f"a killed job did not exit within 60 s (hang); killed after {wait:.1f} s; its output:\n"
                     f"{tail(out)}")
    # Finish cleanly: stop at the next checkpoint so the reference can run to exactly the same step.
    done = max(logged_steps(out))
    stop = (done // args.checkpoint_every + 1) * args.checkpoint_every
    final = launch(data, out, args.max_steps, args.checkpoint_every, None, [f"train.stop_at={stop}"])
    if final.wait() != 0:
        sys.exit(f"final resume failed:\n{tail(out)}")
    print(f"[soak] killing done; finishing at step {stop}, then the uninterrupted reference", file=sys.stderr,
          flush=True)
    ref = launch(data, tmp / "ref", args.max_steps, args.checkpoint_every, None, [f"train.stop_at={stop}"])
    if ref.wait() != 0:
        sys.exit(f"reference run failed:\n{tail(tmp / 'ref')}")
    soak, reference = last_losses(out), last_losses(tmp / "ref")
    logged = logged_steps(out)
    mismatched = [s for s in reference if soak.get(s) != reference[s]]
    missing = sorted(set(reference) - set(soak))
    print("| duration | kills | steps | steps recomputed | max per kill (interval) | steps with other data | "
          "steps missing |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    recomputed = len(logged) - len(set(logged))
    print(f"| {time.time() - t0:.0f} s | {kills} | {stop} | {recomputed} | {args.checkpoint_every} | "
          f"{len(mismatched)} | {len(missing)} |")
    verdict = "0" if not mismatched and not missing else f"SOME: see steps {mismatched[:10]} {missing[:10]}"
    print(f"samples lost or duplicated: {verdict}")
    return 1 if mismatched or missing else 0


if __name__ == "__main__":
    sys.exit(main())
