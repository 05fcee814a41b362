"""The export's model card: README.md (Hugging Face metadata, how to load with transformers and sentence-transformers,
data, objectives and schedule, the mode tokens and how to select a mode when the run trained with them, steps,
tokens, training and held-out metrics per objective, hardware and wall time, intended use and limits) and
loss_curves.png (training and evaluation loss per objective). launch.downstream adds its fine-tuning result
(add_downstream).

Everything comes from files the run already wrote: run.json in the checkpoint (resolved config, encoder shape,
step, tokens), the manifests of the training and evaluation data, the TensorBoard event files (metrics.jsonl when
there are none) and summary.json. Numbers are read up to the exported checkpoint's step, so exporting an earlier
checkpoint documents that checkpoint, not the end of the run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from data.manifest import load_manifest
from data.tokenizer import MODE_TOKENS, SPECIAL_TOKENS

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
    names = sorted({t.removeprefix("loss/").removeprefix("eval/").removesuffix("_loss") for t in train + evals})
    colour = {n: f"C{i % 10}" for i, n in enumerate(names)}  # one colour per objective in both panels
    panels = [("training loss (per objective, logged windows)", train)]
    if evals:
        panels.append(("evaluation loss (fixed held-out set)", evals))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    for ax, (name, tags) in zip(axes[0], panels):
        for tag in tags:
            steps = [s for s, _, _ in scalars[tag]]
            values = [v for _, v, _ in scalars[tag]]
            label = tag.removeprefix("loss/").removeprefix("eval/").removesuffix("_loss")
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=label,
                    color=colour[label])
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
    """The manifest's totals (without re-checking shards: the data may have moved since training). The manifest is
    read like any other (bounded, every field checked), since it is not trusted; one that is gone or no longer
    valid is named as such in the card."""
    if not data_dir:
        return None
    try:
        m = load_manifest(data_dir, check_files=False)
    except ValueError:
        return {"path": str(data_dir), "missing": True}
    return {"path": str(data_dir), "documents": m.documents, "tokens": m.tokens, "shards": len(m.shards),
            "vocab_size": m.vocab_size, "tokenizer_sha256": m.tokenizer_sha256}


def _last(scalars: dict[str, Series], tag: str) -> float | None:
    s = scalars.get(tag)
    return s[-1][1] if s else None


def _num(x: Any, fmt: str = ",") -> str:
    return "n/a" if x is None else format(x, fmt)


def _duration(seconds: float) -> str:
    h, rem = divmod(int(round(seconds)), 3600)
    m, s = divmod(rem, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s"


def _how_to_load(with_head: bool) -> list[str]:
    """Three lines for transformers and three for sentence-transformers (or fill-mask), runnable as written from
    inside this folder."""
    text = 'def add(a, b):\\n    return a + b\\n'
    lines = ["## How to load", "",
             'Run the snippets from inside this folder, or replace `"."` with its path. The tokenizer is '
             "`AutoTokenizer` on this folder (`tokenizer.json`): it gives exactly the ids the model was trained on.",
             "", "With transformers (hidden states; mean-pool them over the attention mask for one vector per text):",
             "", "```python", "from transformers import AutoModel, AutoTokenizer",
             'tok, model = AutoTokenizer.from_pretrained("."), AutoModel.from_pretrained(".")',
             f'hidden = model(**tok(["{text}"], return_tensors="pt")).last_hidden_state  # [1, tokens, hidden]',
             "```", ""]
    if with_head:
        lines += ["Fill-mask (this export keeps the MLM head):", "", "```python", "from transformers import pipeline",
                  'fill = pipeline("fill-mask", model=".")',
                  'print(fill(f"def add(a, b):\\n    return a {fill.tokenizer.mask_token} b\\n"))', "```", ""]
    else:
        lines += ["With sentence-transformers (mean pooling, configured in `modules.json`):", "", "```python",
                  "from sentence_transformers import SentenceTransformer", 'model = SentenceTransformer(".")',
                  f'vectors = model.encode(["{text}"])  # [1, hidden]', "```", ""]
    return lines + ["Fine-tuning a classifier: `AutoModelForSequenceClassification.from_pretrained(path, "
                    "num_labels=3)`, or with cloze: `python -m launch.finetune --export PATH --train train.csv "
                    "--eval eval.csv` (columns `text,label`).", ""]


def _data(train: dict | None, evaluation: dict | None) -> list[str]:
    lines = ["## Training data", "", "| split | documents | tokens | shards | prepared data |",
             "| --- | --- | --- | --- | --- |"]
    for name, m in (("train", train), ("eval", evaluation)):
        if m is None:
            continue
        if m.get("missing"):
            lines.append(f"| {name} | n/a | n/a | n/a | `{m['path']}` (its manifest is no longer there, or no longer "
                         "valid) |")
        else:
            lines.append(f"| {name} | {_num(m['documents'])} | {_num(m['tokens'])} | {_num(m['shards'])} "
                         f"| `{m['path']}` |")
    if train and not train.get("missing"):
        lines += ["", f"Tokenizer: SentencePiece unigram, {_num(train['vocab_size'])} pieces (sha256 "
                      f"`{train['tokenizer_sha256'][:16]}`), shipped as its `tokenizers` conversion "
                      "(`tokenizer.json`), which cuts text into the same whole-line segments as training did; ids 0-8 "
                      "are [PAD] [UNK] [CLS] [SEP] [MASK] and four objective mode tokens. The SentencePiece model "
                      "itself is not shipped: plain SentencePiece encodes multi-line text differently from the ids the "
                      "model was trained on."]
    return lines


OBJECTIVE_WORDS = {"mlm": "masked", "span": "span", "causal": "causal", "prefix": "prefix"}
"""How the card names each objective's kind of language modelling."""

BIDIRECTIONAL_MODES = ("mlm", "span")
"""Modes trained under bidirectional attention: the attention stock transformers' ModernBERT applies."""


def objectives_phrase(mix: dict) -> str:
    """'masked, span and causal language modelling' for the objectives of a mix, in the mix's order."""
    words = [OBJECTIVE_WORDS.get(n, n) for n in mix] or ["masked"]
    return (", ".join(words[:-1]) + " and " if len(words) > 1 else "") + words[-1] + " language modelling"


def mode_token_ids() -> dict[str, tuple[str, int]]:
    """Objective -> (mode token, id): the ids every cloze tokenizer gives them (data/tokenizer.py fixes the special
    tokens' ids, and the trainer's TokenInfo.mode_ids come from the same table)."""
    return {name: (token, SPECIAL_TOKENS.index(token)) for name, token in MODE_TOKENS.items()}


def _mode_tokens(cfg: dict) -> list[str]:
    """With mode tokens on: which token and id announces each objective, how to select a mode from transformers
    (prepend its id), and which modes a stock forward reproduces. Off: a warning not to use the ids."""
    o = cfg.get("objectives", {})
    mix = o.get("mix", {})
    modes = mode_token_ids()
    if not o.get("mode_tokens"):
        listed = ", ".join(f"{tok} ({i})" for tok, i in modes.values())
        return ["", f"Mode tokens were off in this run: the ids {listed} are in the vocabulary but the model never saw "
                    "them; do not add them to inputs."]
    total = sum(mix.values()) or 1.0
    lines = ["", "## Mode tokens", "",
             "This model was trained with UL2-style mode tokens: position 0 of every training row held the mode "
             "token of the objective that built the row, and the held-out evaluation below did the same. The ids are "
             "those of this folder's tokenizer (`tokenizer.json`; `special_tokens_map.json` lists the tokens as "
             "additional special tokens):", "",
             "| objective | mode token | id | trained under | share of training micro-batches |",
             "| --- | --- | --- | --- | --- |"]
    attention = {"mlm": "bidirectional attention", "span": "bidirectional attention", "causal": "causal attention",
                 "prefix": "prefix attention (bidirectional prefix, causal after it)"}
    for name, (token, i) in modes.items():
        share = f"{mix[name] / total:.0%}" if mix.get(name) else "0% (never seen in training)"
        lines.append(f"| {name} | `{token}` | {i} | {attention.get(name, 'n/a')} | {share} |")
    chosen = next((n for n in (*BIDIRECTIONAL_MODES, *mix) if mix.get(n)), "mlm")
    token, i = modes[chosen]
    text = 'def add(a, b):\\n    return a + b\\n'
    lines += ["", "To select a mode, put its id first in `input_ids`, in front of the [CLS] the tokenizer adds (the "
                  f"tokenizer never adds a mode token itself). Here the {chosen} mode, `{token}` = {i}:", "",
              "```python", "import torch", "from transformers import AutoModel, AutoTokenizer",
              'tok, model = AutoTokenizer.from_pretrained("."), AutoModel.from_pretrained(".")',
              f'ids = torch.tensor([[tok.convert_tokens_to_ids("{token}"), *tok("{text}")["input_ids"]]])'
              "  # mode, [CLS], text, [SEP]",
              "hidden = model(input_ids=ids).last_hidden_state  # [1, tokens, hidden]", "```", "",
              "Stock transformers' ModernBERT attends bidirectionally everywhere, as the mlm and span modes were "
              "trained. The causal and prefix modes were trained under causal and prefix attention masks, which a "
              "plain forward does not apply: use `[MODE_MLM]` (or `[MODE_SPAN]`) for fill-mask, embeddings and "
              "fine-tuning. The causal and prefix modes are reproduced only under their masks, in cloze's own "
              "encoder (`Encoder.forward(ids, attention=\"prefix\", prefix_len=...)`)."]
    return lines


def _objectives(cfg: dict, world: Any) -> list[str]:
    t, o = cfg.get("train", {}), cfg.get("objectives", {})
    mix, params = o.get("mix", {}), o.get("params") or {}
    total = sum(mix.values()) or 1.0
    lines = ["", "## Objectives and schedule", "", "| objective | share of micro-batches | parameters |",
             "| --- | --- | --- |"]
    lines += [f"| {n} | {w / total:.0%} | {json.dumps(params[n]) if params.get(n) else 'defaults'} |"
              for n, w in mix.items()]
    micro, accum, seq_len = t.get("micro_batch_size"), t.get("grad_accum"), cfg.get("data", {}).get("seq_len")
    rows = micro * accum * world if None not in (micro, accum, world) else "n/a"
    wsd = f", decaying over the last {t.get('decay_frac')} of the steps" if t.get("schedule") == "wsd" else ""
    modes = "on (see Mode tokens below)" if o.get("mode_tokens") else "off"
    lines += ["", f"Mode tokens: {modes}. AdamW, peak learning rate {t.get('lr')}, "
                  f"schedule `{t.get('schedule')}` ({t.get('warmup_steps')} warm-up steps, ending at "
                  f"{t.get('min_lr_ratio')} x peak{wsd}), weight decay {t.get('weight_decay')}, betas "
                  f"{t.get('betas')}, gradient clip {t.get('grad_clip')}. Batch: {micro} rows x {accum} accumulation "
                  f"x {world} ranks = {rows} rows of {seq_len} tokens per step. Seed {t.get('seed')}. The whole "
                  "resolved config is in `training_config.json`."]
    return lines


def _run(info: dict, scalars: dict[str, Series], summary: dict | None, precision: str | None) -> list[str]:
    step, world = int(info.get("step", 0)), info.get("world_size")
    cfg = info.get("config", {})
    wall = None
    if summary and int(summary.get("steps", -1)) == step and summary.get("wall_s") is not None:
        wall = f"{_duration(float(summary['wall_s']))} (training loop of the run's last session)"
    else:
        times = [w for s in scalars.values() for _, _, w in s if w]
        if len(times) > 1:
            wall = f"about {_duration(max(times) - min(times))} (first to last logged point up to step {step})"
    hw = info.get("hardware") or (summary or {}).get("hardware")
    if isinstance(hw, dict):
        hw = ", ".join(f"{k} {v}" for k, v in hw.items())
    hardware = hw or f"{world} data-parallel ranks (the checkpoint does not record the device type)"
    return ["", "## Training run", "", "| | |", "| --- | --- |", f"| steps | {step:,} |",
            f"| tokens seen | {int(info.get('tokens_seen', 0)):,} |", f"| wall time | {wall or 'not recorded'} |",
            f"| hardware | {hardware} |", f"| precision | {precision or cfg.get('train', {}).get('precision')} |",
            f"| DeepSpeed ZeRO stage | {info.get('zero_stage')} |",
            f"| sequence length | {_lengths(cfg)} |"]


def trained_seq_len(info: dict) -> int | None:
    """The row length of the checkpoint's last training step (run.json's seq_len; older runs: data.seq_len), or
    None when neither is a whole number within the encoder's positions (run.json is read, not trusted)."""
    limit = (info.get("encoder") or {}).get("max_position_embeddings")
    for value in (info.get("seq_len"), (info.get("config") or {}).get("data", {}).get("seq_len")):
        if isinstance(value, int) and not isinstance(value, bool) and isinstance(limit, int) and 0 < value <= limit:
            return value
    return None


def _lengths(cfg: dict) -> str:
    """data.seq_len, then each phase of data.seq_len_phases as the config wrote it (validated when it ran)."""
    d = cfg.get("data", {})
    phases = d.get("seq_len_phases") or []
    later = [f"{p.get('seq_len')} from {p.get('at')}" for p in phases if isinstance(p, dict)]
    return ", then ".join([str(d.get("seq_len")), *later])


def _results(scalars: dict[str, Series], step: int) -> list[str]:
    """One row per objective: the last training window and the last held-out evaluation, side by side."""
    train_tags, eval_tags = loss_tags(scalars)
    names = sorted({t.removeprefix("loss/") for t in train_tags} | {t[5:-5] for t in eval_tags})
    evals = {tg: s[-1] for tg, s in scalars.items() if tg.startswith("eval/") and s}
    at = max((p[0] for p in evals.values()), default=None)

    def cell(tag: str) -> str:
        value = _last(scalars, tag)
        return "n/a" if value is None else f"{value:.4f}"

    lines = ["", "## Results", "", f"Training: the last logged window at or before step {step}. "
             + (f"Held-out: the fixed evaluation set at step {at} (the same rows and masks at every evaluation: "
                "MLM and span masking at 15%, causal LM, and prefix LM split uniformly within 20-80% of each row)."
                if at is not None else "This run had no evaluation set (`eval.path`), so there are no held-out "
                "metrics."), "",
             "| objective | training loss | training accuracy | held-out loss | held-out accuracy |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {n} | {cell(f'loss/{n}')} | {cell(f'accuracy/{n}')} | {cell(f'eval/{n}_loss')} "
              f"| {cell(f'eval/{n}_accuracy')} |" for n in names]
    perplexities = [f"{n} {evals[f'eval/{n}_perplexity'][1]:.1f}" for n in ("causal", "prefix")
                    if f"eval/{n}_perplexity" in evals]
    if perplexities:
        lines += ["", f"Held-out perplexity: {', '.join(perplexities)}."]
    return lines + ["", f"![Training and evaluation loss per objective]({PNG_NAME})", ""]


def _use_and_limits(enc: dict, seq_len: Any, step: int, verification: dict | None, mix: dict) -> list[str]:
    lines = []
    if verification:
        lines += ["## Verification", "", f"At export, `transformers.{verification['architecture']}` loaded this "
                  "folder with no missing or unexpected weights; its outputs matched cloze's own model on the "
                  f"checkpoint's weights within {verification['max_abs_diff']:.1e} (bound "
                  f"{verification['tolerance']:.0e}, {verification['dtype']}), and `AutoTokenizer` gave the same ids "
                  "as cloze's training tokenizer.", ""]
    return lines + [
        "## Intended use", "",
        "A starting point for fine-tuning on tasks in the domain of the training data (classification, retrieval, "
        "token tagging), and for sentence embeddings after such fine-tuning. It was pretrained with "
        f"{objectives_phrase(mix)} only: its raw embeddings were not trained for similarity.", "",
        "## Limitations", "",
        "- It knows the training data listed above only; expect little transfer to other languages or domains.",
        f"- Trained on rows of {seq_len} tokens: longer inputs run (RoPE, up to {enc.get('max_position_embeddings')} "
        "positions) but were never seen in training.",
        "- cloze does not filter training text for personal data or toxicity; the model can reproduce what the "
        "corpus contains.",
        f"- {'This was a short run. ' if step < 1000 else ''}Check the numbers above against your own held-out task "
        "before relying on it.", ""]


def metadata(info: dict, scalars: dict[str, Series], with_head: bool, n_params: int) -> dict[str, Any]:
    """The card's Hugging Face metadata: library, pipeline, language and tags, the encoder's shape (under `cloze`)
    and the held-out evaluation as a model-index entry."""
    enc = info["encoder"]
    meta: dict[str, Any] = {
        "library_name": "transformers", "pipeline_tag": "fill-mask" if with_head else "feature-extraction",
        "language": ["en"], "tags": ["cloze", "modernbert", "encoder", "code", "python"],
        "cloze": {"architecture": "ModernBertForMaskedLM" if with_head else "ModernBertModel",
                  "parameters": n_params, **{k: enc.get(k) for k in SHAPE_KEYS},
                  "steps": int(info.get("step", 0)), "tokens_seen": int(info.get("tokens_seen", 0))}}
    metrics = [{"type": kind, "name": f"held-out {tag[5:]}", "value": round(_last(scalars, tag), 4)}
               for tag in sorted(scalars) for kind in ("accuracy", "loss")
               if tag.startswith("eval/") and tag.endswith(f"_{kind}") and scalars[tag]]
    evaluated = {n: 1 for n in OBJECTIVE_WORDS if scalars.get(f"eval/{n}_loss")}
    if metrics:
        meta["model-index"] = [{"name": "cloze-encoder", "results": [{
            "task": {"type": "fill-mask", "name": objectives_phrase(evaluated)},
            "dataset": {"type": "held-out", "name": "cloze held-out evaluation set"}, "metrics": metrics}]}]
    return meta


SHAPE_KEYS = ("hidden_size", "num_layers", "num_heads", "intermediate_size", "vocab_size", "max_position_embeddings")


def front_matter(meta: dict[str, Any]) -> list[str]:
    import yaml

    return ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(), "---"]


def split_front_matter(text: str) -> tuple[dict[str, Any], str]:
    """(metadata, the rest) of a card this module wrote."""
    import yaml

    _, head, body = text.split("---\n", 2)
    return yaml.safe_load(head) or {}, body


DOWNSTREAM_TITLE = "## Downstream evaluation"


def downstream_section(report: dict) -> list[str]:
    """The downstream task's result (launch.downstream's report): both arms side by side and the verdict."""
    def row(name: str, arm: dict) -> str:
        seeds = ", ".join(f"{a:.3f}" for a in arm["values"])
        return f"| {name} | {arm['mean']:.3f} ± {arm['std']:.3f} | {seeds} |"

    seeds = ", ".join(map(str, report["seeds"]))
    return [DOWNSTREAM_TITLE, "",
            f"Task: {report['task']}. {report['train_rows']} training rows, {report['eval_rows']} evaluation rows "
            f"(chance {report['chance']:.2f}). The same classifier (`launch.finetune`: mean pooling, "
            f"{report['epochs']} epochs, peak learning rate {report['lr']}, {report['max_length']} tokens) fine-tuned "
            f"from this encoder and from random initialisation of the same shape, with the same seeds ({seeds}):",
            "", "| initialisation | accuracy (mean ± sd over seeds) | per seed |", "| --- | --- | --- |",
            row("this encoder", report["pretrained"]), row("random, same shape", report["random_init"]), "",
            f"Verdict: {report['verdict']}.", ""]


def add_downstream(export: Path, report: dict) -> Path:
    """Put the downstream result into export/README.md: a section before "## Intended use" (replacing an earlier
    one) and a text-classification entry in the metadata's model-index."""
    card = Path(export) / CARD_NAME
    meta, body = split_front_matter(card.read_text(encoding="utf-8"))
    if DOWNSTREAM_TITLE in body:  # replace the section written by an earlier run
        start = body.index(DOWNSTREAM_TITLE)
        end = body.find("\n## ", start + 1)
        body = body[:start] + (body[end + 1:] if end >= 0 else "")
    section = "\n".join(downstream_section(report)) + "\n"
    at = body.find("## Intended use")
    body = body[:at] + section + body[at:] if at >= 0 else body + "\n" + section
    index = meta.setdefault("model-index", [{"name": "cloze-encoder", "results": []}])
    results = [r for r in index[0]["results"] if r.get("task", {}).get("type") != "text-classification"]
    results.append({"task": {"type": "text-classification", "name": report.get("name", "downstream task")},
                    "dataset": {"type": "python-stdlib", "name": "rows from modules unseen in fine-tuning"},
                    "metrics": [{"type": "accuracy", "name": "fine-tuned, mean over seeds",
                                 "value": round(report["pretrained"]["mean"], 4)}]})
    index[0]["results"] = results
    card.write_text("\n".join(front_matter(meta)) + "\n" + body, encoding="utf-8")
    return card


def render_card(info: dict, tag: str, scalars: dict[str, Series], summary: dict | None, train_data: dict | None,
                eval_data: dict | None, with_head: bool, dtype: str, files: list[str], verification: dict | None,
                precision: str | None, n_params: int) -> str:
    """README.md text; every number comes from the arguments (see write_model_card for where they come from)."""
    enc, cfg = info["encoder"], info.get("config", {})
    step, tokens = int(info.get("step", 0)), int(info.get("tokens_seen", 0))
    arch = "ModernBertForMaskedLM" if with_head else "ModernBertModel"
    head = " with its MLM prediction head" if with_head else " (prediction head dropped)"
    lines = [*front_matter(metadata(info, scalars, with_head, n_params)), "",
             f"# cloze encoder: {enc['num_layers']} layers, hidden {enc['hidden_size']}, {n_params / 1e6:.2f}M "
             "parameters", "",
             f"A ModernBERT-layout encoder pretrained by cloze for {step:,} optimizer steps on {tokens:,} tokens, "
             f"exported from checkpoint `{tag}` as `{arch}` in {dtype}{head}. It loads with stock `transformers`; "
             "no cloze code is needed.", ""]
    lines += _how_to_load(with_head)
    lines += _data(train_data, eval_data)
    lines += _objectives(cfg, info.get("world_size"))
    lines += _mode_tokens(cfg)
    lines += _run(info, scalars, summary, precision)
    lines += _results(scalars, step)
    lines += _use_and_limits(enc, trained_seq_len(info), step, verification,
                             cfg.get("objectives", {}).get("mix", {}))
    lines += ["## Files", "", ", ".join(f"`{f}`" for f in dict.fromkeys([*files, CARD_NAME, PNG_NAME])), ""]
    return "\n".join(lines)


def write_model_card(out: Path, ckpt_dir: Path, tag: str, info: dict, with_head: bool, dtype: str,
                     verification: dict | None = None, precision: str | None = None) -> Path:
    """Write out/README.md and out/loss_curves.png for the checkpoint ckpt_dir/tag (whose run.json is `info`) into
    the export folder `out`, which already holds the weights and tokenizer; return the README path."""
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
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    text = render_card(info, tag, scalars, summary, train_data, eval_data, with_head, dtype, files, verification,
                       precision, enc.num_params(include_head=with_head))
    (out / CARD_NAME).write_text(text, encoding="utf-8")
    return out / CARD_NAME
