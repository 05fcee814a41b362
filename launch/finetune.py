"""`python -m launch.finetune --export DIR --train T.csv --eval E.csv`: fine-tune a sequence classifier on an export.

The downstream check of a pretrained encoder: transformers' AutoModelForSequenceClassification on the export
(a ModernBERT classifier: the encoder, a dense + norm head and a linear layer), trained with AdamW on the rows of
T.csv (columns `text,label`; labels are any strings) and scored by accuracy on E.csv. `--random-init` trains the
same architecture from random weights instead, the baseline that shows what pretraining bought.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from launch.cli import run_cli


@dataclass
class FinetuneConfig:
    """Hyper-parameters of one fine-tuning run (the defaults suit small models and a few thousand rows)."""

    epochs: int = 5
    """Passes over the training rows."""
    batch_size: int = 16
    """Rows per optimizer step."""
    lr: float = 5e-4
    """Peak AdamW learning rate (linear warm-up over the first 10% of steps, then linear decay to 0)."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay."""
    max_length: int = 128
    """Tokens per row after truncation ([CLS] and [SEP] included)."""
    pooling: str = "mean"
    """How the classifier pools the encoder's output: 'mean' over real tokens or the 'cls' token. Mean suits MLM
    pretraining, which never trains [CLS]'s output."""
    seed: int = 0
    """Seeds the classifier's initialisation (all of it with random_init) and the batch order."""
    random_init: bool = False
    """Ignore the export's weights: the same architecture from random initialisation (the baseline)."""

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "max_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ValueError(f"--lr {self.lr} must be > 0 and --weight-decay {self.weight_decay} >= 0")
        if self.pooling not in ("mean", "cls"):
            raise ValueError(f"--pooling {self.pooling!r}: choose 'mean' or 'cls'")


def read_csv(path: str | Path) -> tuple[list[str], list[str]]:
    """(texts, labels) from a CSV with a header naming `text` and `label` (other columns are ignored)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (expected a CSV with columns text,label)")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"text", "label"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: header {reader.fieldnames} lacks {sorted(missing)}; the first line must name "
                             "the columns, e.g. text,label")
        rows = [(r["text"] or "", (r["label"] or "").strip()) for r in reader]
    if not rows:
        raise ValueError(f"{path}: no rows after the header")
    empty = [i + 2 for i, (_, label) in enumerate(rows) if not label]
    if empty:
        raise ValueError(f"{path}: line(s) {empty[:5]} have an empty label")
    return [t for t, _ in rows], [label for _, label in rows]


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
"""Weight formats that are pickles: loading one may run code, so an export folder holding one is refused."""


def check_export_files(export: Path, need_weights: bool) -> None:
    """Refuse an export folder with pickle-format files in it, and check every safetensors header, before
    transformers reads anything: cloze writes weights only as safetensors, so a pickle there was put there by
    someone else, and a damaged safetensors file should be named, not surface as a parser traceback."""
    from safetensors import safe_open

    pickled = sorted(p.name for p in export.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickled:
        raise ValueError(f"{export}: pickle-format file(s) {', '.join(pickled)}; cloze exports weights only as "
                         f"safetensors and never loads a pickle it did not write. Remove them, or export again with "
                         f"`python -m launch.export`")
    weights = sorted(export.glob("*.safetensors"))
    if need_weights and not weights:
        raise FileNotFoundError(f"{export}: no *.safetensors weights; pass a folder written by "
                                f"`python -m launch.export`")
    for path in weights:
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except Exception as e:  # safetensors raises its own error types for a bad header
            raise ValueError(f"{path}: not a readable safetensors file ({str(e)[:120]}); export again with "
                             f"`python -m launch.export`") from None


def check_export_folder(export: Path, need_weights: bool) -> None:
    """--export is a folder holding config.json (and, with need_weights, safetensors weights) and no pickles;
    otherwise one error naming it and how to write one. Runs before transformers reads anything: given a path
    that is not a folder, transformers would look for a model of that name online."""
    write_one = f"write one with `python -m launch.export --checkpoint RUN_DIR --out {export}`"
    if not export.exists():
        raise FileNotFoundError(f"--export {export}: no such folder; {write_one}")
    if not export.is_dir():
        raise NotADirectoryError(f"--export {export}: not a folder; pass the folder launch.export wrote, or "
                                 f"{write_one}")
    for name, what in (("config.json", "model config"), ("tokenizer.json", "tokenizer")):
        if not (export / name).is_file():
            raise FileNotFoundError(f"--export {export}: not an export (no {name}, the {what}); {write_one}")
    check_export_files(export, need_weights)


def _hf_error(export: Path, what: str, e: Exception) -> ValueError:
    """transformers' error on loading from an export folder, as one line naming the folder."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    return ValueError(f"--export {export}: transformers could not load its {what} ({first}); export again with "
                      f"`python -m launch.export`")


def build_model(export: Path, labels: list[str], cfg: FinetuneConfig):
    """The classifier on the export's encoder (or on random weights of the same shape), and what it did not load."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    check_export_folder(export, need_weights=not cfg.random_init)
    extra = dict(num_labels=len(labels), id2label=dict(enumerate(labels)),
                 label2id={label: i for i, label in enumerate(labels)}, classifier_pooling=cfg.pooling)
    torch.manual_seed(cfg.seed)
    try:
        if cfg.random_init:
            config = AutoConfig.from_pretrained(export, local_files_only=True, **extra)
            config.architectures = None
            return AutoModelForSequenceClassification.from_config(config), ["all weights (--random-init)"]
        model, info = AutoModelForSequenceClassification.from_pretrained(
            export, output_loading_info=True, use_safetensors=True, local_files_only=True, **extra)
    except (OSError, ValueError, KeyError, TypeError) as e:  # a damaged or foreign config.json
        raise _hf_error(export, "model", e) from None
    return model, sorted(info["missing_keys"])


def batches(tok, texts: list[str], labels: list[int], size: int, max_length: int, order: list[int]):
    for i in range(0, len(order), size):
        idx = order[i : i + size]
        enc = tok([texts[j] for j in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        yield enc, torch.tensor([labels[j] for j in idx])


@torch.no_grad()
def predict(model, tok, texts: list[str], cfg: FinetuneConfig) -> list[int]:
    model.eval()
    out: list[int] = []
    for enc, _ in batches(tok, texts, [0] * len(texts), 64, cfg.max_length, list(range(len(texts)))):
        out += model(**enc).logits.argmax(-1).tolist()
    return out


def finetune(export: str | Path, train_csv: str | Path, eval_csv: str | Path, cfg: FinetuneConfig,
             out: str | Path | None = None) -> dict:
    """Fine-tune, evaluate and (with `out`) save the classifier; return the report."""
    from transformers import AutoTokenizer

    export = Path(export)
    texts, label_names = read_csv(train_csv)
    eval_texts, eval_names = read_csv(eval_csv)
    labels = sorted(set(label_names))
    unknown = sorted(set(eval_names) - set(labels))
    if unknown:
        raise ValueError(f"{eval_csv}: labels {unknown} never occur in {train_csv}; the classifier cannot predict them")
    if len(labels) < 2:
        raise ValueError(f"{train_csv}: only one label ({labels[0]!r}); a classifier needs at least two")
    if out is not None and Path(out).exists():
        raise ValueError(f"--out {out} already exists; choose a new folder")
    check_export_folder(export, need_weights=not cfg.random_init)
    try:
        tok = AutoTokenizer.from_pretrained(export, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:  # no or damaged tokenizer files
        raise _hf_error(export, "tokenizer", e) from None
    model, fresh = build_model(export, labels, cfg)
    y = [labels.index(n) for n in label_names]
    y_eval = [labels.index(n) for n in eval_names]

    steps = cfg.epochs * math.ceil(len(texts) / cfg.batch_size)
    warmup = max(1, steps // 10)
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        (decay if p.ndim >= 2 else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else max(0.0, (steps - s) / max(1, steps - warmup)))
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    losses = []
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(texts), generator=gen).tolist()
        total, n = 0.0, 0
        for enc, target in batches(tok, texts, y, cfg.batch_size, cfg.max_length, order):
            loss = torch.nn.functional.cross_entropy(model(**enc).logits, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total, n = total + loss.item() * len(target), n + len(target)
        losses.append(total / n)
        print(f"[finetune] epoch {epoch + 1}/{cfg.epochs}: train loss {losses[-1]:.4f}", file=sys.stderr, flush=True)
    pred = predict(model, tok, eval_texts, cfg)
    correct = sum(int(p == t) for p, t in zip(pred, y_eval))
    per_label = {name: {"rows": y_eval.count(i), "correct": sum(int(p == t == i) for p, t in zip(pred, y_eval))}
                 for i, name in enumerate(labels)}
    report = {"accuracy": correct / len(y_eval), "correct": correct, "rows": len(y_eval), "labels": labels,
              "per_label": per_label, "train_rows": len(texts), "train_loss": losses,
              "train_accuracy": sum(int(p == t) for p, t in zip(predict(model, tok, texts, cfg), y)) / len(y),
              "newly_initialised": fresh, "export": str(export), "seconds": time.perf_counter() - t0,
              "config": asdict(cfg)}
    if out is not None:
        model.save_pretrained(out)
        tok.save_pretrained(out)
        (Path(out) / "finetune_report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.finetune", description=__doc__.splitlines()[0])
    ap.add_argument("--export", required=True, help="folder written by `python -m launch.export`")
    ap.add_argument("--train", required=True, help="CSV with columns text,label")
    ap.add_argument("--eval", required=True, help="CSV with columns text,label (labels seen in --train)")
    ap.add_argument("--out", help="save the fine-tuned classifier here (a new folder)")
    ap.add_argument("--report", help="also write the report as JSON to this file")
    d = FinetuneConfig()
    ap.add_argument("--epochs", type=int, default=d.epochs, help=f"passes over --train (default {d.epochs})")
    ap.add_argument("--batch-size", type=int, default=d.batch_size, help=f"default {d.batch_size}")
    ap.add_argument("--lr", type=float, default=d.lr, help=f"peak AdamW learning rate (default {d.lr})")
    ap.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"default {d.weight_decay}")
    ap.add_argument("--max-length", type=int, default=d.max_length, help=f"tokens per row (default {d.max_length})")
    ap.add_argument("--pooling", choices=["mean", "cls"], default=d.pooling, help=f"default {d.pooling}")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--random-init", action="store_true",
                    help="train the same architecture from random weights instead (the baseline)")
    args = ap.parse_args(argv)
    cfg = FinetuneConfig(**{k: getattr(args, k) for k in asdict(d)})
    report = finetune(args.export, args.train, args.eval, cfg, out=args.out)
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    what = "random initialisation (same shape)" if cfg.random_init else f"pretrained encoder {args.export}"
    per = ", ".join(f"{k} {v['correct']}/{v['rows']}" for k, v in report["per_label"].items())
    print(f"accuracy {report['accuracy']:.4f} ({report['correct']}/{report['rows']} correct; {per}) on {args.eval} "
          f"after {cfg.epochs} epochs on {report['train_rows']} rows from {what}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
