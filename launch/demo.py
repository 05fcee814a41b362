"""`python -m launch.demo`: the main job, end to end, on the embedded default corpus.

The corpus is the running interpreter's own standard-library source (its .py files: code, docstrings and comments;
about 30 MB of real text on every machine, nothing downloaded). The job runs the same commands a user runs on
their own data:

    python -m launch.prepare --input '<stdlib>/**/*.py' --out runs/demo/data
    python -m launch.train   --config launch/configs/demo.yaml --nproc 2
    python -m launch.export  --checkpoint runs/demo/train --out runs/demo/export
    python -m launch.downstream --export runs/demo/export --out runs/demo/downstream --card

The last stage is the proof that pretraining helped: a classifier fine-tuned from the export and one trained from
random initialisation of the same shape, side by side, on a task built from the same corpus (launch/downstream.py).
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
from launch.train.metrics import fmt_duration
from launch.train.runlock import check_free

DEMO_VOCAB_SIZE = 4000
"""Tokenizer pieces of the main job. Half of launch.prepare's default: in a few million training tokens each
embedding row is seen about twice as often, the MLM head costs half as much, and the stdlib still encodes at 3.1
bytes per token (3.6 with launch.prepare's 8000 pieces and sample)."""
DEMO_TOKENIZER_SAMPLE = 2000
"""Segments the main job's tokenizer trains on (about 2 MB). SentencePiece's training time grows with the sample:
launch.prepare's default 8000 costs about 65 CPU seconds on the stdlib, 2000 about 15, for about 5% more tokens
on the same text."""


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
    ap.add_argument("--config", default="launch/configs/demo.yaml", help="training config (default: the demo's)")
    ap.add_argument("--vocab-size", type=int, default=DEMO_VOCAB_SIZE,
                    help=f"tokenizer pieces (default {DEMO_VOCAB_SIZE}); a small --input needs fewer")
    ap.add_argument("--tokenizer-sample", type=int, default=DEMO_TOKENIZER_SAMPLE,
                    help=f"segments (<= 1024 characters) the tokenizer trains on (default {DEMO_TOKENIZER_SAMPLE})")
    ap.add_argument("--shard-bytes", type=int, default=4_000_000,
                    help="shard size (default 4 MB); training needs a shard per rank, so a small --input needs less")
    ap.add_argument("--reprepare", action="store_true", help="rebuild the shards even if a manifest exists")
    ap.add_argument("--setup-seconds", type=float, default=None,
                    help="time scripts/main.sh spent setting up before this job, shown in the stage table")
    ap.add_argument("--downstream-seeds", type=int, nargs="+", default=None,
                    help="fine-tuning seeds of the downstream stage (default: launch.downstream's, 0 1 2)")
    ap.add_argument("--downstream-rows", type=int, nargs=2, metavar=("TRAIN", "EVAL"), default=None,
                    help="downstream rows per keyword for training and evaluation (default: launch.downstream's)")
    ap.add_argument("overrides", nargs="*", help="training overrides, e.g. train.max_steps=100")
    args = ap.parse_args(argv)

    out = Path(args.out)
    data, heldout, train, export = out / "data", out / "heldout", out / "train", out / "export"
    downstream = out / "downstream"
    # Held-out evaluation text: the stdlib's own tests whose names start with test_a (about 0.5 MB), never trained on.
    heldout_glob = str(Path(sysconfig.get_paths()["stdlib"]) / "test" / "test_a*.py")
    use_heldout = not args.input and bool(glob.glob(heldout_glob))
    py = sys.executable
    t0 = time.perf_counter()
    timings = {} if args.setup_seconds is None else {"setup": args.setup_seconds}
    if (data / "manifest.json").is_file() and not args.reprepare:
        print(f"=== prepare: reusing {data} (pass --reprepare to rebuild)", file=sys.stderr)
    else:
        # The stdlib folder of a virtualenv-less interpreter also holds site-packages: keep only the stdlib.
        extra = ["--exclude", "*/site-packages/*", "--exclude", "*/dist-packages/*"] if not args.input else []
        extra += ["--vocab-size", str(args.vocab_size), "--max-tokenizer-sentences", str(args.tokenizer_sample)]
        if use_heldout:
            extra += ["--exclude", heldout_glob]
        inputs = args.input or [stdlib_glob()]
        timings["prepare"] = stage("prepare: train the tokenizer, write shards", [
            py, "-m", "launch.prepare", *[a for i in inputs for a in ("--input", i)], *extra,
            "--out", str(data), "--shard-bytes", str(args.shard_bytes), "--model-max-length", "1024"])
        if use_heldout:
            timings["prepare held-out"] = stage("prepare: held-out evaluation shards, same tokenizer", [
                py, "-m", "launch.prepare", "--input", heldout_glob, "--out", str(heldout),
                "--tokenizer", str(data / "tokenizer" / "spm.model"), "--shard-bytes", "100000"])
    eval_args = [f"eval.path={heldout}"] if use_heldout and (heldout / "manifest.json").is_file() else []
    if train.exists():
        # The demo always trains from scratch; real runs resume from `latest` instead. A run still holding the
        # folder (another demo in flight) is named and left alone.
        check_free(train)
        shutil.rmtree(train)
    timings["train"] = stage(f"train: {args.nproc} ranks, DeepSpeed", [
        py, "-m", "launch.train", "--config", args.config, "--nproc", str(args.nproc),
        f"out_dir={train}", f"data.path={data}", *eval_args, *args.overrides])
    timings["export"] = stage("export: encoder only, verified with transformers", [
        py, "-m", "launch.export", "--checkpoint", str(train), "--out", str(export), "--overwrite"])

    extra = ["--seeds", *map(str, args.downstream_seeds)] if args.downstream_seeds else []
    if args.downstream_rows:
        extra += ["--train-rows", str(args.downstream_rows[0]), "--eval-rows", str(args.downstream_rows[1])]
    timings["downstream"] = stage("downstream: fine-tune from the export and from random init, same seeds", [
        py, "-m", "launch.downstream", "--export", str(export), "--out", str(downstream), "--card", *extra])
    summary = json.loads((train / "summary.json").read_text())
    report = json.loads((downstream / "report.json").read_text())
    total = time.perf_counter() - t0 + (args.setup_seconds or 0.0)
    print(final_report(summary, report, timings, total, data, train, export, downstream),
          file=sys.stderr)
    return 0


def final_report(summary: dict, report: dict, timings: dict[str, float], total: float, data: Path, train: Path,
                 export: Path, downstream: Path) -> str:
    """What the job shows: how far pretraining got, whether it helped downstream, where everything is, stage times."""
    from launch.downstream import fmt

    final = summary.get("final", {})
    ev = summary.get("eval") or {}
    losses = ", ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in final.items() if k.startswith("loss/"))
    names = [k[5:-5] for k in ev if k.endswith("_loss")]
    held_out = "; ".join(f"{n} loss {ev[f'eval/{n}_loss']:.3f}, accuracy {ev.get(f'eval/{n}_accuracy', 0):.1%}"
                         for n in names) or "no held-out set (--input given)"
    stages = "\n".join(f"  {name:<20} {fmt_duration(took):>7}" for name, took in timings.items())
    return f"""
cloze main job finished in {fmt_duration(total)}

pretraining ({summary['steps']} steps, {summary['tokens_seen']:,} tokens)
  final training losses : {losses}
  held-out              : {held_out}
downstream: {report['task']}
  ({report['train_rows']} training rows, {report['eval_rows']} evaluation rows, chance {report['chance']:.3f})
  pretrained encoder    : {fmt(report['pretrained'])}
  random init, same size: {fmt(report['random_init'])}
  verdict               : {report['verdict']}

  shards + tokenizer : {data}  (manifest.json)
  training run       : {train}  (checkpoints/, summary.json)
  exported encoder   : {export}  (model card: README.md; load with transformers.AutoModel.from_pretrained('{export}'))
  downstream task    : {downstream}  (train.csv, eval.csv, report.json)
  TensorBoard        : .venv/bin/tensorboard --logdir {train / 'tensorboard'}

  stage                   time
{stages}
  {'total':<20} {fmt_duration(total):>7}
"""


if __name__ == "__main__":
    sys.exit(run_cli(main))
