"""`python -m launch.demo`: the main job, end to end, on the embedded default corpus.

The corpus is the running interpreter's own standard-library source (its .py files: code, docstrings and comments;
about 30 MB of real text on every machine, nothing downloaded). The job runs the same commands a user runs on
their own data:

    python -m launch.prepare --input '<stdlib>/**/*.py' --out runs/demo/data
    python -m launch.train   --config launch/configs/demo.yaml --nproc 2
    python -m launch.export  --checkpoint runs/demo/train --out runs/demo/export
"""

from __future__ import annotations

import argparse
import glob
import json
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from launch.cli import run_cli
from launch.metrics import fmt_duration


def stdlib_glob() -> str:
    return str(Path(sysconfig.get_paths()["stdlib"]) / "**" / "*.py")


def stage(title: str, cmd: list[str]) -> float:
    print(f"\n=== {title}\n$ {' '.join(cmd)}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    rc = subprocess.call(cmd)
    if rc != 0:
        raise SystemExit(f"error: stage '{title}' failed with exit code {rc} (see the output above)")
    took = time.perf_counter() - t0
    print(f"=== {title}: done in {fmt_duration(took)}", file=sys.stderr, flush=True)
    return took


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/demo", help="everything goes under this folder (default runs/demo)")
    ap.add_argument("--nproc", type=int, default=2, help="local ranks for training (default 2)")
    ap.add_argument("--input", nargs="*", default=None, help="corpus paths or globs (default: the Python stdlib)")
    ap.add_argument("--reprepare", action="store_true", help="rebuild the shards even if a manifest exists")
    ap.add_argument("overrides", nargs="*", help="training overrides, e.g. train.max_steps=100")
    args = ap.parse_args(argv)

    out = Path(args.out)
    data, heldout, train, export = out / "data", out / "heldout", out / "train", out / "export"
    # Held-out evaluation text: the stdlib's own tests whose names start with test_a (about 0.5 MB), never trained on.
    heldout_glob = str(Path(sysconfig.get_paths()["stdlib"]) / "test" / "test_a*.py")
    use_heldout = not args.input and bool(glob.glob(heldout_glob))
    py = sys.executable
    t0 = time.perf_counter()
    timings = {}
    if (data / "manifest.json").is_file() and not args.reprepare:
        print(f"=== prepare: reusing {data} (pass --reprepare to rebuild)", file=sys.stderr)
    else:
        # The stdlib folder of a virtualenv-less interpreter also holds site-packages: keep only the stdlib.
        extra = ["--exclude", "*/site-packages/*", "--exclude", "*/dist-packages/*"] if not args.input else []
        if use_heldout:
            extra += ["--exclude", heldout_glob]
        inputs = args.input or [stdlib_glob()]
        timings["prepare"] = stage("prepare: train the tokenizer, write shards", [
            py, "-m", "launch.prepare", *[a for i in inputs for a in ("--input", i)], *extra,
            "--out", str(data), "--shard-bytes", "4000000", "--model-max-length", "1024"])
        if use_heldout:
            timings["prepare held-out"] = stage("prepare: held-out evaluation shards, same tokenizer", [
                py, "-m", "launch.prepare", "--input", heldout_glob, "--out", str(heldout),
                "--tokenizer", str(data / "tokenizer" / "spm.model"), "--shard-bytes", "100000"])
    eval_args = [f"eval.path={heldout}"] if use_heldout and (heldout / "manifest.json").is_file() else []
    if train.exists():
        # The demo always trains from scratch; real runs resume from `latest` instead.
        shutil.rmtree(train)
    timings["train"] = stage(f"train: {args.nproc} ranks, DeepSpeed", [
        py, "-m", "launch.train", "--config", "launch/configs/demo.yaml", "--nproc", str(args.nproc),
        f"out_dir={train}", f"data.path={data}", *eval_args, *args.overrides])
    timings["export"] = stage("export: encoder only, verified with transformers", [
        py, "-m", "launch.export", "--checkpoint", str(train), "--out", str(export), "--overwrite"])

    summary = json.loads((train / "summary.json").read_text())
    final = summary.get("final", {})
    losses = ", ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in final.items() if k.startswith("loss/"))
    ev = summary.get("eval") or {}
    if ev:
        losses += "; held-out: " + ", ".join(f"{k.removeprefix('eval/')} {v:.3f}" for k, v in ev.items()
                                              if k.endswith("_loss") or k.endswith("perplexity"))
    print(f"""
cloze main job finished in {fmt_duration(time.perf_counter() - t0)}
  ({", ".join(f"{k} {fmt_duration(v)}" for k, v in timings.items())})
  shards + tokenizer : {data}  (manifest.json)
  training run       : {train}  ({summary['steps']} steps, {summary['tokens_seen']:,} tokens; final losses: {losses})
  checkpoints        : {train / 'checkpoints'}
  exported encoder   : {export}  (load with transformers.AutoModel.from_pretrained('{export}'))
  TensorBoard        : .venv/bin/tensorboard --logdir {train / 'tensorboard'}
""", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
