"""Recipes: MLM only, GPT-BERT's causal:masked 1:15 hybrid and CLM-then-MLM, trained at equal tokens on the demo's
config and compared on the same held-out shards and the same downstream task.

    .venv/bin/python -m bench.recipes                      # the demo's scale: prepare, 3 x train + export
    .venv/bin/python -m bench.recipes --steps 600 --data runs/demo/data --heldout runs/demo/heldout --out r.json

Each recipe runs the real CLIs: `launch.train --config <demo.yaml> --nproc 2` with only the objectives section
overridden (mix, mix schedule, objective parameters, taken from the shipped recipe files), then `launch.export`.
Everything else (model, data order, optimizer, steps, seed, held-out set) is the demo's, so every recipe sees the
same number of tokens. Reported per recipe, from the run's summary.json (the held-out evaluation at the last step,
which launch.train computes for every objective whatever the training mix): MLM loss and accuracy, causal loss
and next-token accuracy; then launch.downstream's keyword task fine-tuned from the export, next to one random
initialisation of the same shape (the same for every recipe: same shape, tokenizer, rows and seeds). One table.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import yaml

from launch.demo import DEMO_TOKENIZER_SAMPLE, DEMO_VOCAB_SIZE

ROOT = Path(__file__).resolve().parent.parent
DEMO = "launch/configs/demo.yaml"
RECIPES = {
    "MLM only": None,
    "GPT-BERT 1:15 hybrid": "launch/configs/gpt-bert.yaml",
    "CLM then MLM": "launch/configs/clm-then-mlm.yaml",
}
"""Row name -> the shipped recipe whose objectives section the row trains with (None: MLM alone at 15%)."""
"""The main job's tokenizer (launch.demo prepares the stdlib with these pieces and sample segments)."""
MLM_ONLY = {"mix": {"mlm": 1}, "params": {"mlm": {"rate": 0.15}}}
OBJECTIVE_KEYS = ("mix", "schedule", "params")
"""The objectives keys a recipe sets; the demo's own values of these are replaced, never merged."""


def flow(value) -> str:
    """One-line YAML for a `key=value` override (launch.config refuses line breaks)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False).strip()


def recipe_overrides(recipe: str | None) -> list[str]:
    """The objectives overrides of one recipe: mix, schedule and params replace the demo's whole values, so no
    span parameters or mix shares of the demo leak into a recipe."""
    objectives = MLM_ONLY if recipe is None else yaml.safe_load((ROOT / recipe).read_text())["objectives"]
    out = [f"objectives.{key}={flow(objectives[key])}" for key in OBJECTIVE_KEYS if key in objectives]
    if "schedule" not in objectives:
        out.append("objectives.schedule=null")
    return out


def child_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def stage(title: str, cmd: list[str], log: Path) -> float:
    """Run one CLI with its output in `log`; exit with the log's tail when it fails. Returns seconds taken."""
    print(f"[recipes] {title}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.call(cmd, cwd=ROOT, env=child_env(), stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"error: {title} failed with exit code {rc}; its log {log} ends with:\n{tail}")
    took = time.perf_counter() - t0
    print(f"[recipes] {title}: done in {took:.0f} s", file=sys.stderr, flush=True)
    return took


def heldout_glob() -> str:
    return str(Path(sysconfig.get_paths()["stdlib"]) / "test" / "test_a*.py")


def prepare(work: Path, data: Path | None, heldout: Path | None, vocab_size: int,
            tokenizer_sample: int) -> tuple[Path, Path]:
    """The demo's shards (the stdlib without test_a*.py) and held-out shards (test_a*.py, the same tokenizer),
    prepared once, unless given."""
    py = sys.executable
    if data is None:
        data = work / "data"
        if not (data / "manifest.json").is_file():
            std = sysconfig.get_paths()["stdlib"]
            stage("prepare", [py, "-m", "launch.prepare", "--input", str(Path(std) / "**" / "*.py"),
                              "--exclude", "*/site-packages/*", "--exclude", "*/dist-packages/*",
                              "--exclude", heldout_glob(), "--out", str(data), "--shard-bytes", "4000000",
                              "--model-max-length", "1024", "--vocab-size", str(vocab_size),
                              "--max-tokenizer-sentences", str(tokenizer_sample)], work / "prepare.log")
    if heldout is None:
        heldout = work / "heldout"
        if not (heldout / "manifest.json").is_file():
            stage("prepare held-out", [py, "-m", "launch.prepare", "--input", heldout_glob(), "--out", str(heldout),
                                       "--tokenizer", str(data / "tokenizer" / "spm.model"),
                                       "--shard-bytes", "100000"], work / "prepare-heldout.log")
    return data, heldout


def train_and_export(name: str, recipe: str | None, run: Path, args, data: Path, heldout: Path) -> dict:
    """Train one recipe on top of the config, export it; return its summary.json plus the training seconds."""
    py = sys.executable
    run.mkdir(parents=True, exist_ok=True)
    train, export = run / "train", run / "export"
    if train.exists():
        import shutil

        shutil.rmtree(train)  # every row trains from scratch
    steps = [f"train.max_steps={args.steps}"] if args.steps else []
    seconds = stage(f"train {name}", [
        py, "-m", "launch.train", "--config", args.config, "--nproc", str(args.nproc), f"out_dir={train}",
        f"data.path={data}", f"eval.path={heldout}", *steps, *recipe_overrides(recipe), *args.overrides],
        run / "train.log")
    stage(f"export {name}", [py, "-m", "launch.export", "--checkpoint", str(train), "--out", str(export),
                             "--overwrite"], run / "export.log")
    return {**json.loads((train / "summary.json").read_text()), "train_seconds": seconds}


def downstream(exports: dict[str, Path], work: Path, args) -> dict[str, dict]:
    """launch.downstream's task: each export fine-tuned per seed, and random initialisation once per seed (it is
    the same model for every recipe). Row name (and "random init") -> launch.downstream.summarise's dict."""
    from transformers.utils import logging as hf_logging

    from launch.downstream import TaskConfig, build_task, summarise
    from launch.finetune import FinetuneConfig, finetune

    hf_logging.set_verbosity_error()
    cfg = TaskConfig(train_rows=args.downstream_rows[0], eval_rows=args.downstream_rows[1],
                     seeds=tuple(args.downstream_seeds), epochs=args.downstream_epochs)
    task = work / "downstream"
    build_task(sysconfig.get_paths()["stdlib"], task, cfg)
    arms = [(name, export, False) for name, export in exports.items()]
    arms.append(("random init", next(iter(exports.values())), True))
    result = {}
    for name, export, random_init in arms:
        accuracies = []
        for seed in cfg.seeds:
            ft = FinetuneConfig(epochs=cfg.epochs, lr=cfg.lr, max_length=cfg.max_length, seed=seed,
                                random_init=random_init)
            with contextlib.redirect_stderr(io.StringIO()):  # per-epoch lines
                report = finetune(export, task / "train.csv", task / "eval.csv", ft)
            accuracies.append(report["accuracy"])
            print(f"[recipes] downstream {name}, seed {seed}: accuracy {report['accuracy']:.3f} in "
                  f"{report['seconds']:.0f} s", file=sys.stderr, flush=True)
        result[name] = summarise(accuracies)
    return result


def row(name: str, summary: dict, down: dict, random_init: dict) -> dict:
    ev = summary.get("eval") or {}
    return {"recipe": name, "steps": summary["steps"], "tokens": summary["tokens_seen"],
            "train_seconds": round(summary["train_seconds"], 1), "objectives": summary.get("objectives", {}),
            "mlm_loss": ev.get("eval/mlm_loss", math.nan), "mlm_accuracy": ev.get("eval/mlm_accuracy", math.nan),
            "causal_loss": ev.get("eval/causal_loss", math.nan),
            "causal_accuracy": ev.get("eval/causal_accuracy", math.nan),
            "downstream": down["mean"], "downstream_std": down["std"], "downstream_seeds": down["values"],
            "random_init": random_init["mean"], "random_init_std": random_init["std"]}


def table(rows: list[dict]) -> str:
    head = ("| recipe | steps | tokens | train time | MLM loss | MLM acc | causal loss | causal acc | "
            "downstream (pretrained) | downstream (random init) |")
    lines = [head, "| " + " | ".join(["---"] * (head.count("|") - 1)) + " |"]
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['steps']} | {r['tokens']:,} | {r['train_seconds']:.0f} s | "
                     f"{r['mlm_loss']:.3f} | {r['mlm_accuracy']:.1%} | {r['causal_loss']:.3f} | "
                     f"{r['causal_accuracy']:.1%} | {r['downstream']:.3f} ± {r['downstream_std']:.3f} | "
                     f"{r['random_init']:.3f} ± {r['random_init_std']:.3f} |")
    return "\n".join(lines)


def comparison(rows: list[dict]) -> str:
    """Each recipe against MLM only, as differences: what the table says about the hybrid, without a threshold."""
    base = rows[0]
    out = []
    for r in rows[1:]:
        out.append(f"{r['recipe']} vs {base['recipe']}: MLM loss {r['mlm_loss'] - base['mlm_loss']:+.3f}, "
                   f"MLM acc {100 * (r['mlm_accuracy'] - base['mlm_accuracy']):+.1f} points, causal loss "
                   f"{r['causal_loss'] - base['causal_loss']:+.3f}, downstream "
                   f"{100 * (r['downstream'] - base['downstream']):+.1f} points (std over fine-tuning seeds up "
                   f"to {100 * max(r['downstream_std'], base['downstream_std']):.1f} points)")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    from launch.downstream import TaskConfig

    d = TaskConfig()
    ap = argparse.ArgumentParser(prog="python -m bench.recipes", description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=0, help="optimizer steps per recipe (default: the config's)")
    ap.add_argument("--data", default="", help="prepared training shards to reuse (default: prepare the demo's "
                                               "corpus under --work)")
    ap.add_argument("--heldout", default="", help="prepared held-out shards, same tokenizer (default: the stdlib's "
                                                  "test_a*.py prepared with --data's tokenizer)")
    ap.add_argument("--out", default="", help="also write the rows as JSON here")
    ap.add_argument("--work", default="runs/recipes", help="runs, exports and logs (default runs/recipes)")
    ap.add_argument("--config", default=DEMO, help=f"the config every recipe starts from (default {DEMO})")
    ap.add_argument("--vocab-size", type=int, default=DEMO_VOCAB_SIZE,
                    help=f"tokenizer pieces when preparing (default {DEMO_VOCAB_SIZE}, the main job's)")
    ap.add_argument("--tokenizer-sample", type=int, default=DEMO_TOKENIZER_SAMPLE,
                    help=f"segments the tokenizer trains on when preparing (default {DEMO_TOKENIZER_SAMPLE})")
    ap.add_argument("--nproc", type=int, default=2, help="local ranks per training run (default 2)")
    ap.add_argument("--downstream-seeds", type=int, nargs="+", default=list(d.seeds),
                    help="fine-tuning seeds (default: launch.downstream's)")
    ap.add_argument("--downstream-rows", type=int, nargs=2, metavar=("TRAIN", "EVAL"),
                    default=[d.train_rows, d.eval_rows], help="rows per keyword (default: launch.downstream's)")
    ap.add_argument("--downstream-epochs", type=int, default=d.epochs, help=f"default {d.epochs}")
    ap.add_argument("overrides", nargs="*", help="training overrides applied to every recipe, e.g. train.log_every=5")
    args = ap.parse_args(argv)
    if any(o.split("=", 1)[0].strip().startswith("objectives") for o in args.overrides):
        print("error: overrides: objectives.* is what the recipes set; leave it out", file=sys.stderr)
        return 2
    work = (ROOT / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data, heldout = prepare(work, Path(args.data).resolve() if args.data else None,
                            Path(args.heldout).resolve() if args.heldout else None, args.vocab_size,
                            args.tokenizer_sample)
    summaries, exports = {}, {}
    for i, (name, recipe) in enumerate(RECIPES.items()):
        run = work / f"recipe{i}"
        summaries[name] = train_and_export(name, recipe, run, args, data, heldout)
        exports[name] = run / "export"
    down = downstream(exports, work, args)
    rows = [row(name, summaries[name], down[name], down["random init"]) for name in RECIPES]
    if args.out:
        Path(args.out).write_text(json.dumps({"config": args.config, "overrides": args.overrides,
                                              "downstream_seeds": args.downstream_seeds, "rows": rows}, indent=1))
    print(table(rows))
    print(comparison(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
