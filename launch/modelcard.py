"""The export's model card: README.md (data, objectives and schedule, steps, tokens, final metrics, hardware and wall
time, how to load, intended use and limits) and loss_curves.png (training and evaluation loss per objective).

Everything comes from files the run already wrote: run.json in the checkpoint (resolved config, encoder shape,
step, tokens), the manifests of the training and evaluation data, the TensorBoard event files (metrics.jsonl when
there are none) and summary.json. Numbers are read up to the exported checkpoint's step, so exporting an earlier
checkpoint documents that checkpoint, not the end of the run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PNG_NAME = "loss_curves.png"
CARD_NAME = "README.md"

Series = list[tuple[int, float, float]]
"""(step, value, wall time in seconds since the epoch; 0 when unknown), sorted by step, one point per step."""


def read_scalars(run_dir: Path, max_step: int | None = None) -> dict[str, Series]:
    """Scalar tag -> series from <run_dir>/tensorboard, else from <run_dir>/metrics.jsonl; steps > max_step are
    left out. A step logged twice (a run resumed from an earlier checkpoint re-trains it) keeps its latest value."""
    points: dict[str, dict[int, tuple[float, float]]] = {}
    tb = run_dir / "tensorboard"
    if tb.is_dir() and any(tb.glob("events.out.tfevents.*")):
        from tensorboard.backend.event_processing import event_accumulator as ea

        # One accumulator per file, oldest first: a resumed run writes a new file, and later values must win.
        for f in sorted(tb.glob("events.out.tfevents.*"), key=lambda p: (p.stat().st_mtime, p.name)):
            acc = ea.EventAccumulator(str(f), size_guidance={ea.SCALARS: 0})
            acc.Reload()
            for tag in acc.Tags()["scalars"]:
                for e in acc.Scalars(tag):
                    points.setdefault(tag, {})[e.step] = (e.value, e.wall_time)
    elif (run_dir / "metrics.jsonl").is_file():
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            if not line.strip():
                continue
            rec = json.loads(line)
            step = int(rec["step"])
            flat = {f"loss/{k}": v for k, v in (rec.get("loss") or {}).items()}
            flat.update({k: v for k, v in rec.items() if k.startswith("eval/") or k == "lr"})
            for tag, value in flat.items():
                points.setdefault(tag, {})[step] = (float(value), 0.0)
    return {tag: [(s, v, w) for s, (v, w) in sorted(p.items()) if max_step is None or s <= max_step]
            for tag, p in points.items()}


def loss_tags(scalars: dict[str, Series]) -> tuple[list[str], list[str]]:
    """(training loss tags 'loss/<objective>', evaluation loss tags 'eval/<objective>_loss') that have points."""
    train = sorted(t for t, s in scalars.items() if t.startswith("loss/") and s)
    evals = sorted(t for t, s in scalars.items() if t.startswith("eval/") and t.endswith("_loss") and s)
    return train, evals


def plot_losses(scalars: dict[str, Series], path: Path, title: str) -> Path:
    """Training loss per objective (left) and evaluation loss per objective (right, when the run evaluated)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on clusters and CI
    import matplotlib.pyplot as plt

    train, evals = loss_tags(scalars)
    panels = [("training loss (per objective, logged windows)", train)]
    if evals:
        panels.append(("evaluation loss (fixed held-out set)", evals))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    for ax, (name, tags) in zip(axes[0], panels):
        for tag in tags:
            steps = [s for s, _, _ in scalars[tag]]
            values = [v for _, v, _ in scalars[tag]]
            label = tag.removeprefix("loss/").removeprefix("eval/").removesuffix("_loss")
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=label)
        ax.set_title(name)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("cross-entropy (nats per predicted token)")
        ax.grid(alpha=0.3)
        if tags:
            ax.legend(title="objective")
        else:
            ax.text(0.5, 0.5, "no points logged", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def read_manifest(data_dir: str | None) -> dict[str, Any] | None:
    """The manifest's totals (without re-checking shards: the data may have moved since training)."""
    if not data_dir:
        return None
    f = Path(data_dir) / "manifest.json"
    if not f.is_file():
        return {"path": str(data_dir), "missing": True}
    raw = json.loads(f.read_text())
    totals = raw.get("totals", {})
    return {"path": str(data_dir), "documents": totals.get("documents"), "tokens": totals.get("tokens"),
            "shards": totals.get("shards"), "vocab_size": raw.get("vocab_size"),
            "tokenizer_sha256": (raw.get("tokenizer") or {}).get("sha256", ""),
            "sources": raw.get("sources") or raw.get("inputs")}


def _last(scalars: dict[str, Series], tag: str) -> float | None:
    s = scalars.get(tag)
    return s[-1][1] if s else None


def _num(x: Any, fmt: str = ",") -> str:
    return "n/a" if x is None else format(x, fmt)


def _duration(seconds: float) -> str:
    h, rem = divmod(int(round(seconds)), 3600)
    m, s = divmod(rem, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s"


def render_card(info: dict, tag: str, scalars: dict[str, Series], summary: dict | None, train_data: dict | None,
                eval_data: dict | None, with_head: bool, dtype: str, weight_files: list[str],
                verification: dict | None, precision: str | None, n_params: int) -> str:
    cfg, enc = info.get("config", {}), info["encoder"]
    t, objectives = cfg.get("train", {}), cfg.get("objectives", {})
    step, tokens = int(info.get("step", 0)), int(info.get("tokens_seen", 0))
    world, stage = info.get("world_size"), info.get("zero_stage")
    seq_len = cfg.get("data", {}).get("seq_len")
    arch = "ModernBertForMaskedLM" if with_head else "ModernBertModel"
    lines = ["---", "library_name: transformers", f"pipeline_tag: {'fill-mask' if with_head else 'feature-extraction'}",
             "tags: [cloze, modernbert, encoder, sentence-transformers]", "---", "",
             f"# cloze encoder ({enc['num_layers']} layers, hidden {enc['hidden_size']}, {n_params / 1e6:.2f}M "
             f"parameters)", "",
             f"A ModernBERT-layout encoder pretrained by cloze for {step:,} optimizer steps on {tokens:,} tokens, "
             f"exported from checkpoint `{tag}` as `{arch}` in {dtype}"
             f"{' with its MLM prediction head' if with_head else ' (prediction head dropped)'}. "
             f"It loads with stock `transformers`; no cloze code is needed.", "",
             "## How to load", "", "```python", "import torch",
             "from transformers import AutoModel, AutoTokenizer", "",
             'path = "."  # this folder', "tok = AutoTokenizer.from_pretrained(path)",
             "model = AutoModel.from_pretrained(path).eval()",
             'batch = tok(["an example sentence", "another one"], padding=True, return_tensors="pt")',
             "with torch.no_grad():", "    hidden = model(**batch).last_hidden_state  # [batch, tokens, hidden]",
             'mask = batch["attention_mask"].unsqueeze(-1)',
             "embeddings = (hidden * mask).sum(1) / mask.sum(1)  # mean pooling", "```", ""]
    if with_head:
        lines += ["Fill-mask (this export keeps the MLM head):", "", "```python", "from transformers import pipeline",
                  'fill = pipeline("fill-mask", model=path)', 'fill(f"def add(a, b):\\n    return a {fill.tokenizer.mask_token} b")',
                  "```", ""]
    else:
        lines += ["Sentence embeddings with sentence-transformers (mean pooling is configured in `modules.json`):", "",
                  "```python", "from sentence_transformers import SentenceTransformer",
                  'vectors = SentenceTransformer(path).encode(["an example sentence"])', "```", ""]
    lines += ["Fine-tuning a classifier (e.g. support e-mails into billing / technical / feedback): "
              "`AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)`, or with cloze: "
              "`python -m launch.finetune --export PATH --train train.csv --eval eval.csv` (columns `text,label`).", ""]

    lines += ["## Training data", "", "| split | documents | tokens | shards | prepared data |",
              "| --- | --- | --- | --- | --- |"]
    for name, m in (("train", train_data), ("eval", eval_data)):
        if m is None:
            continue
        if m.get("missing"):
            lines.append(f"| {name} | n/a | n/a | n/a | `{m['path']}` (manifest no longer there) |")
        else:
            lines.append(f"| {name} | {_num(m['documents'])} | {_num(m['tokens'])} | {_num(m['shards'])} "
                         f"| `{m['path']}` |")
    for name, m in (("train", train_data), ("eval", eval_data)):
        if m and m.get("sources"):
            lines.append(f"\nSources ({name}): " + ", ".join(f"`{s}`" for s in m["sources"]))
    if train_data and not train_data.get("missing"):
        lines += ["", f"Tokenizer: SentencePiece unigram, {_num(train_data['vocab_size'])} pieces (sha256 "
                      f"`{train_data['tokenizer_sha256'][:16]}`), converted to `tokenizer.json`; ids 0-8 are "
                      "[PAD] [UNK] [CLS] [SEP] [MASK] and four mode tokens."]
    elif not eval_data:
        lines += ["", "The training data's manifest is no longer at the path recorded in the checkpoint."]

    mix = objectives.get("mix", {})
    total = sum(mix.values()) or 1.0
    lines += ["", "## Objectives and schedule", "", "| objective | share of micro-batches | parameters |",
              "| --- | --- | --- |"]
    params = objectives.get("params") or {}
    for name, w in mix.items():
        lines.append(f"| {name} | {w / total:.0%} | {json.dumps(params.get(name) or {}) if params.get(name) else 'defaults'} |")
    micro, accum = t.get("micro_batch_size"), t.get("grad_accum")
    rows = micro * accum * world if None not in (micro, accum, world) else None
    lines += ["", f"Mode tokens: {'on' if objectives.get('mode_tokens') else 'off'}. "
                  f"AdamW, peak learning rate {t.get('lr')}, schedule `{t.get('schedule')}` "
                  f"({t.get('warmup_steps')} warm-up steps, decaying to {t.get('min_lr_ratio')} x peak"
                  f"{', decay over the last ' + str(t.get('decay_frac')) + ' of the steps' if t.get('schedule') == 'wsd' else ''}), "
                  f"weight decay {t.get('weight_decay')}, betas {t.get('betas')}, gradient clip {t.get('grad_clip')}. "
                  f"Batch: {micro} rows x {accum} accumulation x {world} ranks = {rows} rows of {seq_len} tokens "
                  f"per step. Seed {t.get('seed')}. The full resolved config is in `training_config.json`."]

    wall = None
    if summary and int(summary.get("steps", -1)) == step and summary.get("wall_s") is not None:
        wall = f"{_duration(float(summary['wall_s']))} (training loop, last session of the run)"
    else:
        times = [w for s in scalars.values() for _, _, w in s if w]
        if len(times) > 1:
            wall = f"about {_duration(max(times) - min(times))} (first to last logged point up to step {step})"
    hw = info.get("hardware") or (summary or {}).get("hardware")
    hardware = (", ".join(f"{k} {v}" for k, v in hw.items()) if isinstance(hw, dict) else str(hw)) if hw else \
        f"{world} data-parallel ranks (the checkpoint does not record the device type)"
    lines += ["", "## Training run", "", "| | |", "| --- | --- |", f"| steps | {step:,} |",
              f"| tokens seen | {tokens:,} |", f"| wall time | {wall or 'not recorded'} |",
              f"| hardware | {hardware} |", f"| precision | {precision or t.get('precision')} |",
              f"| DeepSpeed ZeRO stage | {stage} |", f"| sequence length | {seq_len} |"]

    train_tags, _ = loss_tags(scalars)
    lines += ["", "## Results", "", f"Last logged training window at or before step {step}:", "",
              "| objective | loss | accuracy |", "| --- | --- | --- |"]
    for tag in train_tags:
        name = tag.removeprefix("loss/")
        acc = _last(scalars, f"accuracy/{name}")
        lines.append(f"| {name} | {_last(scalars, tag):.4f} | {'n/a' if acc is None else f'{acc:.4f}'} |")
    evals = {tg: s[-1] for tg, s in scalars.items() if tg.startswith("eval/") and s}
    if evals:
        at = max(p[0] for p in evals.values())
        lines += ["", f"Evaluation on the fixed held-out set (step {at}):", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {tg.removeprefix('eval/')} | {p[1]:.4f} |" for tg, p in sorted(evals.items())]
    else:
        lines += ["", "No evaluation set was configured for this run (`eval.path`), so there are no held-out metrics."]
    lines += ["", f"![Training and evaluation loss per objective]({PNG_NAME})", ""]

    if verification:
        lines += ["## Verification", "", f"At export, `transformers.{verification['architecture']}` loaded this "
                  f"folder with no missing or unexpected weights; its outputs matched cloze's own model on the "
                  f"checkpoint's weights within {verification['max_abs_diff']:.1e} (bound "
                  f"{verification['tolerance']:.0e}, {verification['dtype']}), and `AutoTokenizer` gave the same ids "
                  "as the SentencePiece model.", ""]
    lines += ["## Intended use", "",
              "A starting point for fine-tuning on downstream tasks in the domain of the training data "
              "(classification, retrieval, token tagging) and for sentence embeddings after fine-tuning. The "
              "pretraining objectives were masked / span / causal language modelling; the raw embeddings are not "
              "trained for similarity.", "",
              "## Limitations", "",
              f"- Trained on the data listed above only; expect little transfer to other languages or domains.",
              f"- Trained on rows of {seq_len} tokens: longer inputs run (RoPE, up to "
              f"{enc.get('max_position_embeddings')} positions) but were never seen in training.",
              "- The training text was not filtered for personal data or toxicity by cloze; the model can reproduce "
              "what the corpus contains.",
              f"- {'A short run: ' if step < 1000 else ''}check the evaluation numbers above against your own held-out "
              "task before relying on it.", "",
              "## Files", "", ", ".join(f"`{f}`" for f in [*weight_files, "config.json", "tokenizer.json",
                                                             "tokenizer_config.json", "special_tokens_map.json",
                                                             "spm.model", "training_config.json", PNG_NAME]), ""]
    return "\n".join(lines)


def write_model_card(out: Path, ckpt_dir: Path, tag: str, info: dict, with_head: bool, dtype: str,
                     weight_files: list[str], verification: dict | None = None, precision: str | None = None) -> Path:
    """Write out/README.md and out/loss_curves.png for the checkpoint ckpt_dir/tag; return the README path."""
    from model.config import EncoderConfig

    run_dir = Path(ckpt_dir).parent
    step = int(info.get("step", 0))
    scalars = read_scalars(run_dir, max_step=step)
    summary_file = run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else None
    cfg = info.get("config", {})
    train_data = read_manifest(info.get("manifest") or cfg.get("data", {}).get("path"))
    eval_data = read_manifest(cfg.get("eval", {}).get("path"))
    enc = EncoderConfig.from_dict(info["encoder"])
    plot_losses(scalars, out / PNG_NAME, f"{run_dir.name}: loss per objective up to step {step}")
    text = render_card(info, tag, scalars, summary, train_data, eval_data, with_head, dtype, weight_files,
                       verification, precision, enc.num_params(include_head=with_head))
    (out / CARD_NAME).write_text(text, encoding="utf-8")
    return out / CARD_NAME
