"""`python -m launch.downstream --export DIR --out DIR`: does pretraining help a real task? The main job's proof.

The task is built from the default corpus itself, nothing downloaded: which standard-library package (asyncio,
email, importlib, xml) a function's source comes from. Train and evaluation rows come from different modules (files)
of each package, so remembering names seen in training does not help. The same classifier is fine-tuned
(launch.finetune) from the export and from random initialisation of the same shape, with the same budget and the
same seeds; both accuracies are reported as mean and spread over the seeds, and the verdict says whether the
pretrained encoder won by more than that spread.
"""

from __future__ import annotations

import argparse
import ast
import csv
import hashlib
import json
import random
import statistics
import sys
import sysconfig
import textwrap
from dataclasses import dataclass
from pathlib import Path

from launch.cli import run_cli

PACKAGES = ("asyncio", "email", "importlib", "xml")
"""Standard-library packages used as labels: each has 20+ modules and 400+ functions in Python 3.11."""
MAX_CHARS = 600
"""A row is the first MAX_CHARS characters of a function's source, about the 128 tokens fine-tuning keeps."""
MIN_CHARS = 80
"""Shorter functions (one-line properties, `pass` stubs) say too little about their package."""
EVAL_SHARE = 0.3
"""About this share of each package's functions (whole modules) is held out for evaluation."""


@dataclass
class TaskConfig:
    """What the task holds and how each classifier is trained (the defaults take about a minute on 2 cores)."""

    train_rows: int = 96
    """Training rows per package (few, on purpose: pretraining matters most when labelled data is scarce)."""
    eval_rows: int = 150
    """Evaluation rows per package."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Fine-tuning seeds; each runs once from the export and once from random initialisation."""
    epochs: int = 4
    lr: float = 1e-3
    max_length: int = 128

    def __post_init__(self) -> None:
        if self.train_rows < 1 or self.eval_rows < 1:
            raise ValueError(f"--train-rows {self.train_rows} and --eval-rows {self.eval_rows} must be >= 1")
        if not self.seeds:
            raise ValueError("--seeds: give at least one seed")


def function_texts(path: Path) -> list[str]:
    """Sources of the module's top-level functions and of its classes' methods, dedented and cut to MAX_CHARS;
    [] for a file that is not valid UTF-8 Python."""
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (UnicodeDecodeError, SyntaxError, ValueError):
        return []
    nodes = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        nodes += [n for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    lines = source.splitlines(keepends=True)
    texts = []
    for node in nodes:
        # whole lines of the def (decorators excluded), dedented; ast.get_source_segment re-splits the file per call
        text = textwrap.dedent("".join(lines[node.lineno - 1 : node.end_lineno])).rstrip()
        if len(text) >= MIN_CHARS:
            texts.append(text[:MAX_CHARS])
    return texts


def package_modules(root: Path, package: str) -> dict[str, list[str]]:
    """Module path (relative to root) -> its function texts, for every non-test module of the package."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in ("test", "tests", "idle_test") for part in rel.parts):
            continue
        texts = function_texts(path)
        if texts:
            modules[rel.as_posix()] = texts
    return modules


def split_modules(modules: dict[str, list[str]], share: float = EVAL_SHARE) -> tuple[list[str], list[str]]:
    """(train modules, eval modules): modules in a fixed pseudo-random order (by name hash) go to evaluation until
    it holds about `share` of the functions. Deterministic for a given set of module names."""
    order = sorted(modules, key=lambda m: hashlib.sha256(m.encode()).hexdigest())
    total = sum(len(t) for t in modules.values())
    held, count = [], 0
    for name in order:
        if count >= share * total or len(held) == len(order) - 1:
            break
        held.append(name)
        count += len(modules[name])
    return [m for m in sorted(modules) if m not in held], sorted(held)


def build_task(root: str | Path, out: str | Path, cfg: TaskConfig, packages: tuple[str, ...] = PACKAGES) -> dict:
    """Write out/train.csv and out/eval.csv (columns text,label,module); return the row counts per package."""
    root, out = Path(root), Path(out)
    rows: dict[str, list[tuple[str, str, str]]] = {"train": [], "eval": []}
    counts = {}
    rng = random.Random(0)
    for package in packages:
        modules = package_modules(root, package)
        if len(modules) < 2:
            raise ValueError(f"{root / package}: {len(modules)} module(s) with functions; the task needs at least "
                             "two per package (one for training, one for evaluation)")
        splits = dict(zip(("train", "eval"), split_modules(modules)))
        counts[package] = {}
        for split, names in splits.items():
            pool = [(text, package, name) for name in names for text in modules[name]]
            want = cfg.train_rows if split == "train" else cfg.eval_rows
            picked = rng.sample(pool, min(want, len(pool)))
            rows[split] += picked
            counts[package][split] = {"rows": len(picked), "modules": len(names)}
    out.mkdir(parents=True, exist_ok=True)
    for split, split_rows in rows.items():
        rng.shuffle(split_rows)
        with open(out / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label", "module"])
            writer.writerows(split_rows)
    return counts


def summarise(accuracies: list[float]) -> dict:
    """Mean, sample standard deviation, range (max - min) and the values, over seeds."""
    return {"mean": statistics.fmean(accuracies),
            "std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "spread": max(accuracies) - min(accuracies), "values": accuracies}


def verdict(pretrained: dict, random_init: dict) -> tuple[bool, str]:
    """The pretrained encoder wins when its mean accuracy beats random initialisation's by more than the larger
    of the two spreads over seeds (one seed: by any margin, which says little)."""
    margin = pretrained["mean"] - random_init["mean"]
    spread = max(pretrained["spread"], random_init["spread"])
    if margin > spread:
        return True, (f"the pretrained encoder wins by {margin * 100:+.1f} points, more than the spread over seeds "
                      f"({spread * 100:.1f} points)")
    return False, (f"the pretrained encoder did NOT win: margin {margin * 100:+.1f} points, spread over seeds "
                   f"{spread * 100:.1f} points; pretrain longer, or check the export")


def fmt(summary: dict) -> str:
    return (f"{summary['mean']:.3f} ± {summary['std']:.3f} (seeds: "
            f"{', '.join(f'{a:.3f}' for a in summary['values'])})")


def run_task(export: str | Path, task_dir: str | Path, cfg: TaskConfig) -> dict:
    """Fine-tune from the export and from random initialisation for every seed; return the report."""
    from launch.finetune import FinetuneConfig, finetune

    task_dir = Path(task_dir)
    runs: dict[str, list[dict]] = {"pretrained": [], "random_init": []}
    for seed in cfg.seeds:
        for arm in runs:
            ft = FinetuneConfig(epochs=cfg.epochs, lr=cfg.lr, max_length=cfg.max_length, seed=seed,
                                random_init=arm == "random_init")
            print(f"[downstream] seed {seed}, {arm.replace('_', ' ')}", file=sys.stderr, flush=True)
            runs[arm].append(finetune(export, task_dir / "train.csv", task_dir / "eval.csv", ft))
    result = {arm: summarise([r["accuracy"] for r in reports]) for arm, reports in runs.items()}
    won, says = verdict(result["pretrained"], result["random_init"])
    first = runs["pretrained"][0]
    return {"task": f"which standard-library package ({', '.join(first['labels'])}) a function comes from; "
                    "evaluation functions come from modules never seen in fine-tuning",
            "labels": first["labels"], "train_rows": first["train_rows"], "eval_rows": first["rows"],
            "chance": 1 / len(first["labels"]), "seeds": list(cfg.seeds), "epochs": cfg.epochs, "lr": cfg.lr,
            "max_length": cfg.max_length, **result, "pretrained_won": won, "verdict": says,
            "seconds": sum(r["seconds"] for rs in runs.values() for r in rs)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.downstream", description=__doc__.splitlines()[0])
    ap.add_argument("--export", required=True, help="folder written by `python -m launch.export`")
    ap.add_argument("--out", required=True, help="folder for train.csv, eval.csv and report.json")
    ap.add_argument("--source", default=sysconfig.get_paths()["stdlib"],
                    help="folder holding the packages (default: this interpreter's standard library)")
    d = TaskConfig()
    ap.add_argument("--train-rows", type=int, default=d.train_rows, help=f"per package (default {d.train_rows})")
    ap.add_argument("--eval-rows", type=int, default=d.eval_rows, help=f"per package (default {d.eval_rows})")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(d.seeds), help="fine-tuning seeds (default 0 1 2)")
    ap.add_argument("--epochs", type=int, default=d.epochs, help=f"default {d.epochs}")
    ap.add_argument("--card", action="store_true", help="add the result to the export's model card (README.md)")
    args = ap.parse_args(argv)
    cfg = TaskConfig(train_rows=args.train_rows, eval_rows=args.eval_rows, seeds=tuple(args.seeds),
                     epochs=args.epochs)
    out = Path(args.out)
    counts = build_task(args.source, out, cfg)
    report = {**run_task(args.export, out, cfg), "packages": counts}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if args.card:
        from launch.modelcard import add_downstream

        add_downstream(Path(args.export), report)
    print(f"pretrained encoder  : {fmt(report['pretrained'])}\n"
          f"random init (same)  : {fmt(report['random_init'])}\n"
          f"chance {report['chance']:.3f}; {report['verdict']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
