"""Every GPU check in one device call: one time budget, the most valuable step first, results in one folder.

    .venv/bin/python -m bench.gpu_session --prepare     # here, once: .whl, runs/bench-data, runs/curve/data
    # on the GPU machine, carrying .whl, runs/bench-data and runs/curve/data (bench/README.md):
    python3 -m bench.gpu_session --out $OUT
    # here, on the CPU: the same plan on tiny sizes (the test); CUDA-only steps are recorded as skipped
    .venv/bin/python -m bench.gpu_session --tiny --device cpu --out /tmp/session

A task that is lent a GPU has 15 minutes of device time in all, the machine's start (a minute or more) included, and
one command may run 10 minutes. So the whole of the GPU work has to fit one call of about 9 minutes, and
whatever finished has to come back even if a later step hangs. This module only uses the standard library until the
steps run, so it starts before the wheels are installed, and installs them itself (`.whl/`, from
../shared/tools/gpu-wheels.sh) when deepspeed or webdataset is missing.

Steps, in order (each a subprocess in its own process group, ended at its deadline; a failed or killed step never
stops the ones after it):
1. `env`: versions, the GPU's name, and an import of every package the run needs. Seconds; a broken install shows
   here, not as six failed rows.
2. `speed`: bench.gpu_speed, cloze and both transformers peers (the issue's figures). Its own --budget-s is what the
   session leaves after reserving each later step's share, so the later steps still run.
3. `curve`: bench.gpu_curve compare, the GPU run against the CPU fp32 reference (correctness of the optimised path).
4. `head_loss`: bench.head_loss, plain against fused decoder cross entropy.
5. `tests`: the CUDA-only tests (pytest tests/test_attention_backends.py), with what is left.

Written to --out (at most 8 files, the device tool's limit): session.json (every step's command, exit code, seconds
and whether it was killed), session.log (every step's output, interleaved in order), summary.md (each step's table,
ready for bench/SPEED.md), and the JSON each step writes: speed.json, curve.json, head.json. session.json and
summary.md are rewritten after every step.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / ".whl"
NEEDED = ("torch", "deepspeed", "webdataset", "sentencepiece", "transformers", "tensorboard", "yaml", "safetensors")
"""Imported by the env step: what launch.train, the peers and the tests import."""
GRACE_S = 15
"""Seconds between SIGTERM and SIGKILL for a step past its deadline; each deadline leaves this much of the budget."""


@dataclass
class Step:
    """One subprocess of the session."""

    name: str
    """Label in session.json and summary.md."""
    argv: list[str]
    """The command (run from the repository root)."""
    share_s: float
    """Seconds reserved for this step when the steps before it set their own budgets."""
    cap_s: float
    """The most this step may run, whatever is left."""
    needs_cuda: bool = False
    """Skipped (and recorded so) without a GPU."""
    result: dict = field(default_factory=dict)
    """Filled by run_step."""


def plan(out: Path, tiny: bool, device: str, bench_data: Path, curve_data: Path, budget_s: float) -> list[Step]:
    """The steps and their time shares, most valuable first. On a GPU, of the default 580 s: up to 1 min for env,
    about 6.5 for the speed rows (the issue's figures: whatever the later shares leave), 1.5 for the curve (the
    optimised path's correctness), 0.5 for the head loss and the rest, at least 45 s, for the CUDA tests (the
    curve's levers row already trains through their code). Estimates: bench/SPEED.md, "What the harness does not
    measure yet"."""
    py = sys.executable
    env_code = ("import importlib, json, platform, sys\n"
                "out = {'python': platform.python_version()}\n"
                f"for name in {NEEDED!r}:\n"
                "    try:\n"
                "        out[name] = getattr(importlib.import_module(name), '__version__', 'present')\n"
                "    except Exception as e:\n"
                "        out[name] = f'MISSING: {type(e).__name__}: {e}'\n"
                "import torch\n"
                "out['cuda'] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None\n"
                "try:\n"
                "    import triton\n"
                "    out['triton'] = triton.__version__\n"
                "except ImportError:\n"
                "    out['triton'] = None\n"
                "print('env: ' + json.dumps(out))\n"
                "sys.exit(1 if any(str(v).startswith('MISSING') for v in out.values()) else 0)\n")
    dev = ["--device", device]
    if tiny:
        speed = [py, "-m", "bench.gpu_speed", "--tiny", *dev, "--shapes", "tiny-bert-64", "--systems", "cloze",
                 "--data", str(bench_data), "--out", str(out / "speed.json")]
        head = [py, "-m", "bench.head_loss", *dev, "--rows", "64", "--hidden", "32", "--vocab", "256", "--iters",
                "1", "--no-compile", "--out", str(out / "head.json")]
    else:
        speed = [py, "-m", "bench.gpu_speed", *dev, "--data", str(bench_data), "--out", str(out / "speed.json")]
        head = [py, "-m", "bench.head_loss", *dev, "--out", str(out / "head.json")]
    steps = [
        Step("env", [py, "-c", env_code], share_s=20, cap_s=60),
        Step("speed", speed, share_s=0, cap_s=budget_s),
        Step("curve", [py, "-m", "bench.gpu_curve", "compare", "--data", str(curve_data), "--out",
                       str(out / "curve.json")], share_s=90, cap_s=150, needs_cuda=True),
        Step("head_loss", head, share_s=30, cap_s=60),
        # only the CUDA tests (-k cuda): the CPU ones run in CI
        Step("tests", [py, "-m", "pytest", "tests/test_attention_backends.py", "-q", "-k", "cuda", "-p",
                       "no:cacheprovider", "-o", "addopts=-ra"], share_s=45, cap_s=240, needs_cuda=True),
    ]
    if device != "cuda":
        for s in steps:
            s.share_s = 0 if s.needs_cuda else s.share_s
    return steps


def install_wheels(log) -> dict:
    """pip-install .whl/ into /tmp/site and put it on PYTHONPATH when a needed package is missing."""
    import importlib.util

    missing = [m for m in ("deepspeed", "webdataset") if importlib.util.find_spec(m) is None]
    if not missing:
        return {"installed": False, "reason": "deepspeed and webdataset importable"}
    wheels = sorted(str(p) for p in WHEELS.glob("*.whl"))
    if not wheels:
        raise SystemExit(f"{', '.join(missing)} missing and no wheels in {WHEELS}: run ../shared/tools/gpu-wheels.sh "
                         f"on the CPU machine and carry .whl")
    site = Path("/tmp/site")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--target", str(site), *wheels]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log.write(f"== install ({len(wheels)} wheels) exit {proc.returncode}\n{proc.stdout}{proc.stderr}\n")
    if proc.returncode:
        raise SystemExit(f"installing {WHEELS} failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {"installed": True, "missing": missing, "wheels": len(wheels), "seconds": round(time.perf_counter() - t0, 1)}


def wait_or_end_group(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait for proc (started with start_new_session=True); past timeout, SIGTERM its whole process group (its
    own children too: trainer ranks, loader workers), then SIGKILL GRACE_S later. True if it ended by itself."""
    try:
        proc.wait(timeout=timeout)
        return True
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return False


def run_step(step: Step, deadline_s: float, log) -> None:
    """Run one step for at most deadline_s, its output appended to log; fill step.result."""
    log.write(f"\n== {step.name}: {' '.join(step.argv)[:300]} (deadline {deadline_s:.0f} s)\n")
    log.flush()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    t0 = time.perf_counter()
    proc = subprocess.Popen(step.argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    lines: list[str] = []

    def copy() -> None:  # line by line, so that a killed step's progress is in session.log
        for line in proc.stdout:
            log.write(line)
            log.flush()
            lines.append(line.rstrip("\n"))

    reader = threading.Thread(target=copy, daemon=True)
    reader.start()
    killed = not wait_or_end_group(proc, deadline_s)
    reader.join(timeout=10)
    if killed:
        log.write(f"\n[session] {step.name}: deadline {deadline_s:.0f} s reached; its process group was ended\n")
    step.result = {"exit": proc.returncode, "seconds": round(time.perf_counter() - t0, 1), "killed": killed,
                   "deadline_s": round(deadline_s), "command": step.argv[:2] + (["<env check>"] if step.name == "env"
                                                                               else step.argv[2:])}
    step.result["table"] = [ln for ln in lines if ln.startswith(("|", "head loss,", "MFU against", "env: "))]
    if step.name == "env":
        step.result["output"] = lines
    if step.result["exit"] != 0:
        step.result["tail"] = lines[-15:]


def summary(steps: list[Step], meta: dict) -> str:
    out = [f"# GPU session: {meta.get('device') or 'no GPU'}", "",
           f"Started {meta['started']}, {meta.get('wall_s', 0):.0f} s of a {meta['budget_s']:.0f} s budget.", ""]
    for s in steps:
        r = s.result
        if not r:
            out += [f"## {s.name}: not reached", ""]
            continue
        state = r.get("skipped") or ("killed at its deadline" if r["killed"] else f"exit {r['exit']}")
        out += [f"## {s.name}: {state}, {r.get('seconds', 0):.0f} s", ""]
        out += r.get("table", []) or [f"    {ln}" for ln in r.get("tail", [])]
        out.append("")
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    meta = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "budget_s": args.budget_s, "argv": sys.argv}
    with open(out / "session.log", "w") as log:
        meta["install"] = install_wheels(log)
        # Without --device the env step (always first) says whether there is a GPU; the plan follows its answer.
        device = args.device or "cuda"
        steps = plan(out, args.tiny, device, args.bench_data, args.curve_data, args.budget_s)
        for i in range(len(steps)):
            step = steps[i]
            left = args.budget_s - (time.perf_counter() - t_start) - GRACE_S  # a step ended late still fits
            if step.needs_cuda and device != "cuda":
                step.result = {"skipped": "needs CUDA", "seconds": 0}
            elif left < 5:
                step.result = {"skipped": f"no time left of --budget-s {args.budget_s:.0f}", "seconds": 0}
            else:
                deadline = deadline_for(steps, i, left)
                if step.name == "speed":
                    # gpu_speed skips rows that would start past its own budget and gives a running row 60 s more
                    step.argv += ["--budget-s", f"{max(deadline - 75, 1):.0f}"]
                run_step(step, deadline, log)
                if step.name == "env":
                    meta["device"] = _env_cuda(step)
                    if args.device is None and meta["device"] is None:
                        device = "cpu"
                        steps[i + 1:] = plan(out, args.tiny, device, args.bench_data, args.curve_data,
                                             args.budget_s)[i + 1:]
                    meta["device_arg"] = device
            meta["wall_s"] = round(time.perf_counter() - t_start, 1)
            write(out, steps, meta)
    failed = [s.name for s in steps if s.result.get("exit") not in (0, None) or s.result.get("killed")]
    print(summary(steps, meta))
    if failed:
        print(f"error: steps that failed or were ended: {', '.join(failed)} (see {out / 'session.log'})",
              file=sys.stderr)
    return 1 if failed else 0


def deadline_for(steps: list[Step], i: int, left: float) -> float:
    """Seconds step i may run when `left` remain: what the later steps' shares leave, but at least its own share
    (or all that is left, if less), and never more than its cap."""
    reserved = sum(s.share_s for s in steps[i + 1:])
    step = steps[i]
    return min(step.cap_s, left, max(left - reserved, step.share_s))


def write(out: Path, steps: list[Step], meta: dict) -> None:
    (out / "session.json").write_text(json.dumps({**meta, "steps": {s.name: s.result for s in steps}}, indent=1))
    (out / "summary.md").write_text(summary(steps, meta) + "\n")


def _env_cuda(step: Step) -> str | None:
    """The GPU's name from the env step's JSON output (None on CPU)."""
    try:
        line = next(ln for ln in step.result.get("output", []) if ln.startswith("env: "))
        return json.loads(line.removeprefix("env: ")).get("cuda")
    except (StopIteration, json.JSONDecodeError):
        return None


def prepare(bench_data: Path, curve_data: Path) -> int:
    """On the CPU machine, before the device call: the wheels, both data folders, and a check that the curve data
    is the reference's and that everything carried fits the device tool's 64 MiB."""
    wheels_script = ROOT.parent / "shared" / "tools" / "gpu-wheels.sh"
    steps = [["bash", str(wheels_script)],
             [sys.executable, "-m", "bench.gpu_speed", "--prepare-only", "--data", str(bench_data)]]
    if not (curve_data / "manifest.json").is_file():
        steps.append([sys.executable, "-m", "bench.gpu_curve", "prepare", "--data", str(curve_data)])
    for cmd in steps:
        print(f"[session] {' '.join(cmd)}", flush=True)
        if subprocess.run(cmd, cwd=ROOT).returncode:
            print(f"error: {' '.join(cmd)} failed (output above)", file=sys.stderr)
            return 1
    from bench.gpu_curve import REFERENCE, data_fingerprint

    if json.loads(REFERENCE.read_text())["data_manifest_sha256"] != data_fingerprint(curve_data):
        print(f"error: {curve_data} is not the data {REFERENCE.name} was recorded on (another stdlib?); run "
              f"`python -m bench.gpu_curve reference --data {curve_data}` and commit the new reference",
              file=sys.stderr)
        return 1
    sizes = {p: sum(f.stat().st_size for f in Path(p).rglob("*") if f.is_file())
             for p in (WHEELS, bench_data, curve_data)}
    tree = int(subprocess.run(["bash", "-c", "git ls-files -co --exclude-standard -z | du -cb --files0-from=- "
                               "| tail -1 | cut -f1"], cwd=ROOT, capture_output=True, text=True).stdout or 0)
    total = sum(sizes.values()) + tree
    for p, n in sizes.items():
        print(f"[session] carry {p.relative_to(ROOT) if p.is_relative_to(ROOT) else p}: {n / 2**20:.1f} MiB")
    print(f"[session] working tree {tree / 2**20:.1f} MiB; {total / 2**20:.1f} MiB travel in all (limit 64)")
    if total > 64 * 2**20:
        print("error: more than the device tool's 64 MiB would travel", file=sys.stderr)
        return 1
    carry = ", ".join(f'"{p.relative_to(ROOT)}"' for p in sizes if p.is_relative_to(ROOT))
    print(f"[session] ready: device run with carry [{carry}] and the command `python3 -m bench.gpu_session --out "
          f"$OUT`")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_session", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="folder for the results (on the device: $OUT)")
    ap.add_argument("--budget-s", type=float, default=580.0,
                    help="wall seconds for every step together (default 580: inside the 10-minute command limit)")
    ap.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when torch sees one")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes: the whole plan in a minute on a CPU")
    ap.add_argument("--bench-data", type=Path, default=ROOT / "runs" / "bench-data",
                    help="bench.gpu_speed's prepared data (default runs/bench-data)")
    ap.add_argument("--curve-data", type=Path, default=ROOT / "runs" / "curve" / "data",
                    help="bench.gpu_curve's prepared data (default runs/curve/data)")
    ap.add_argument("--prepare", action="store_true",
                    help="on the CPU machine: fill .whl and both data folders, check what would travel, and exit")
    args = ap.parse_args(argv)
    if args.budget_s <= 0:
        ap.error("--budget-s must be positive")
    if args.prepare:
        return prepare(args.bench_data.resolve(), args.curve_data.resolve())
    if args.out is None:
        ap.error("--out DIR is required (on the device: --out $OUT)")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
