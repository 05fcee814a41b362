"""Training speed: cloze's training path against transformers' BertForMaskedLM and ModernBertForMaskedLM, in one run
on one device, with the same tokenizer, shapes and tokens per step.

    python -m bench.gpu_speed --data DIR [--shapes bert-512,modernbert-1024] [--out speed.json]
    python -m bench.gpu_speed --data DIR --variant 'cloze+flex=train.attention_backend=flex,train.compile=true'
    python -m bench.gpu_speed --data DIR --tiny --device cpu          # tiny shapes: every row in a minute on a CPU

DIR is a folder `python -m launch.prepare` wrote (the full shapes are sized for a 32768-piece tokenizer).

cloze: `python -m launch.train` as one rank in a subprocess: shards through the stream, the objective mix of
launch/configs/tiny.yaml (MLM 0.8, span 0.1, causal 0.1) with the shape's model, DeepSpeed ZeRO-2, bf16 on a GPU.
Its tokens/s is the harmonic mean of the trainer's own log windows after the warm-up (TensorBoard scalars), so
DeepSpeed's set-up and the first compilations are not timed; seed 26 runs every objective within the first 4
steps, inside the warm-up. Each --variant adds a cloze row per shape with its launch.train overrides.

Peers: trained in this process by a plain loop, each choice in their favour: SDPA, bf16 autocast, fused AdamW on
CUDA, full rows (no padding), batches made on the device, no host synchronisation inside the timed steps, and
ModernBERT with sparse_prediction (its head on labelled positions only); 15% of the positions labelled, 80/10/10.

MFU divides useful FLOPs/s by a matmul peak measured in the same run (bf16 8192^3 on a GPU, fp32 256^3 on a CPU).
Useful FLOPs count what training needs: attention pairs that may meet and the head on labelled positions (cloze's
trainer counts them per micro-batch; the peers train on whole rows, where the full square is useful).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MASK_RATE = 0.15
PEER_NAMES = {"bert": "BertForMaskedLM", "modernbert": "ModernBertForMaskedLM"}


@dataclass(frozen=True)
class Shape:
    """One comparison: cloze's encoder and the transformers peer of the same depth, width and row length."""

    peer: str
    """'bert' or 'modernbert'."""
    seq_len: int
    layers: int
    hidden: int
    heads: int
    intermediate: int
    """cloze's GeGLU width."""
    peer_intermediate: int
    """The peer's MLP width: BERT's dense 3072 has the parameters of a GeGLU 2048 (2 h 3072 = 3 h 2048)."""


SHAPES = {
    "bert-512": Shape("bert", 512, 12, 768, 12, 2048, 3072),
    "modernbert-512": Shape("modernbert", 512, 22, 768, 12, 1152, 1152),
    "modernbert-1024": Shape("modernbert", 1024, 22, 768, 12, 1152, 1152),
}
TINY_SHAPES = {
    "tiny-bert-64": Shape("bert", 64, 2, 64, 4, 128, 192),
    "tiny-modernbert-128": Shape("modernbert", 128, 3, 64, 4, 96, 96),
}


# -- cloze -------------------------------------------------------------------------------------------------------
def cloze_command(args: argparse.Namespace, shape: Shape, run_dir: Path, overrides: list[str]) -> list[str]:
    micro = args.tokens_per_step // shape.seq_len // args.accum
    return [sys.executable, "-m", "launch.train", "--config", "launch/configs/tiny.yaml", f"data.path={args.data}",
            f"out_dir={run_dir}", f"data.seq_len={shape.seq_len}", f"data.num_workers={args.workers}",
            f"model.hidden_size={shape.hidden}", f"model.num_layers={shape.layers}", f"model.num_heads={shape.heads}",
            f"model.intermediate_size={shape.intermediate}",
            f"model.max_position_embeddings={max(1024, shape.seq_len)}", f"train.micro_batch_size={micro}",
            f"train.grad_accum={args.accum}", f"train.max_steps={args.warmup + args.steps}",
            f"train.warmup_steps={args.warmup}", "train.lr=5e-4", f"train.log_every={args.log_every}",
            f"train.seed={args.seed}", "train.zero_stage=2", *overrides]


def cloze_row(args: argparse.Namespace, shape: Shape, overrides: list[str]) -> dict:
    """Train one cloze run; tokens/s, useful TFLOP/s and peak memory from its log windows after the warm-up."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        cmd = cloze_command(args, shape, Path(tmp) / "run", overrides)
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        env.update(PYTHONUNBUFFERED="1", DS_ACCELERATOR=args.device)
        if args.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""  # the trainer takes a GPU whenever it sees one
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode:
            tail = proc.stderr.strip().splitlines()[-20:]
            print("\n".join(tail), file=sys.stderr)
            raise RuntimeError(f"launch.train exited {proc.returncode}: {tail[-1] if tail else ''}")
        acc = EventAccumulator(str(Path(tmp) / "run" / "tensorboard"), size_guidance={"scalars": 0})
        acc.Reload()
        scalars = {tag: {e.step: e.value for e in acc.Scalars(tag)}
                   for tag in ("tokens_per_s", "useful_tflops_per_device", "memory_gib")}
    timed = sorted(s for s in scalars["tokens_per_s"] if s > args.warmup)
    rates = [scalars["tokens_per_s"][s] for s in timed]
    # Every window holds the same tokens, so its time is ~ 1 / rate: tokens over time is the harmonic mean, and
    # useful FLOPs over time weighs each window's TFLOP/s by 1 / rate.
    weights = [1 / r for r in rates]
    useful = sum(scalars["useful_tflops_per_device"][s] * w for s, w in zip(timed, weights)) / sum(weights)
    return {"tokens_per_s": len(rates) / sum(weights), "useful_tflops": useful, "windows": len(timed),
            "peak_memory_gib": scalars["memory_gib"][timed[-1]] if args.device == "cuda" else None,
            "command": " ".join(cmd[1:])}


# -- peers -------------------------------------------------------------------------------------------------------
def build_peer(shape: Shape, vocab: int, tok) -> torch.nn.Module:
    """Random-init transformers model of the shape with SDPA attention, in fp32 (autocast does the bf16)."""
    from transformers import AutoModelForMaskedLM, BertConfig, ModernBertConfig

    common = dict(vocab_size=vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                  num_attention_heads=shape.heads, intermediate_size=shape.peer_intermediate, pad_token_id=tok.pad_id)
    if shape.peer == "bert":
        config = BertConfig(**common, max_position_embeddings=max(512, shape.seq_len))
    else:
        config = ModernBertConfig(**common, max_position_embeddings=max(8192, shape.seq_len), bos_token_id=tok.cls_id,
                                  eos_token_id=tok.sep_id, cls_token_id=tok.cls_id, sep_token_id=tok.sep_id,
                                  sparse_prediction=True)
    return AutoModelForMaskedLM.from_config(config, attn_implementation="sdpa")


def masked_batch(gen: torch.Generator, rows: int, seq_len: int, vocab: int, tok,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ordinary tokens, MASK_RATE of them labelled: 80% become [MASK], 10% a random token, 10% stay."""
    ids = torch.randint(tok.first_ordinary_id, vocab, (rows, seq_len), device=device, generator=gen)
    u = torch.rand(rows, seq_len, device=device, generator=gen)
    labelled = u < MASK_RATE
    labels = torch.where(labelled, ids, torch.full_like(ids, -100))
    v = u / MASK_RATE  # uniform on [0, 1) inside the labelled band: the 80/10/10 split
    random_ids = torch.randint(tok.first_ordinary_id, vocab, (rows, seq_len), device=device, generator=gen)
    inputs = torch.where(labelled & (v < 0.8), torch.full_like(ids, tok.mask_id), ids)
    inputs = torch.where(labelled & (v >= 0.8) & (v < 0.9), random_ids, inputs)
    return inputs, labels


def peer_flops_per_token(shape: Shape, vocab: int, labelled: float) -> float:
    """Useful training FLOPs per token (3 x forward, 2 per multiply-add), the head on labelled positions only."""
    from model.config import EncoderConfig

    if shape.peer == "modernbert":  # cloze's layer layout (fused Wqkv, Wo, GeGLU, dense + decoder head)
        enc = EncoderConfig(vocab_size=vocab, hidden_size=shape.hidden, num_layers=shape.layers,
                            num_heads=shape.heads, intermediate_size=shape.peer_intermediate)
        return enc.flops_per_token(shape.seq_len, labelled)
    h = shape.hidden  # BERT: Q, K, V, O and two MLP matrices per layer; QK^T and PV over the full square
    matmul = 6.0 * shape.layers * (4 * h * h + 2 * h * shape.peer_intermediate)
    return matmul + 12.0 * shape.layers * shape.seq_len * h + 6.0 * (h * h + h * vocab) * labelled


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peer_row(args: argparse.Namespace, shape: Shape, vocab: int, tok) -> dict:
    """Train warmup + steps optimizer steps; time the last `steps`, the device synchronised at both ends."""
    device = torch.device(args.device)
    micro = args.tokens_per_step // shape.seq_len // args.accum
    torch.manual_seed(args.seed)
    model = build_peer(shape, vocab, tok).to(device).train()
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01,
                                  **fused)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    labels_seen = torch.zeros((), dtype=torch.int64, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            sync(device)
            t0 = time.perf_counter()
        for _ in range(args.accum):
            inputs, labels = masked_batch(gen, micro, shape.seq_len, vocab, tok, device)
            if step >= args.warmup:
                labels_seen += (labels != -100).sum()
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = model(input_ids=inputs, labels=labels).loss
            (loss / args.accum).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync(device)
    wall = time.perf_counter() - t0
    tokens = args.steps * args.accum * micro * shape.seq_len
    labelled = labels_seen.item() / tokens
    return {"tokens_per_s": tokens / wall, "useful_tflops": peer_flops_per_token(shape, vocab, labelled) * tokens
            / wall / 1e12, "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30
            if device.type == "cuda" else None, "loss_last": loss.item()}


# -- the run -----------------------------------------------------------------------------------------------------
def matmul_peak_tflops(device: str) -> float:
    """Best of five timed loops of one square matmul: bf16 8192^3 on a GPU, fp32 256^3 on a CPU."""
    n, dtype, iters = (256, torch.float32, 20) if device == "cpu" else (8192, torch.bfloat16, 50)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = 0.0
    for rep in range(6):  # the first loop warms clocks and cuBLAS's choice up and is not counted
        sync(torch.device(device))
        t0 = time.perf_counter()
        for _ in range(iters):
            a @ b
        sync(torch.device(device))
        best = max(best, 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12) if rep else 0.0
    return best


def machine(device: str) -> dict:
    name = torch.cuda.get_device_name(0) if device == "cuda" else f"{platform.machine()} CPU, {os.cpu_count()} cores"
    return {"device": name, "torch": torch.__version__, "transformers": metadata.version("transformers"),
            "deepspeed": metadata.version("deepspeed"), "python": platform.python_version()}


def table(result: dict) -> str:
    lines = ["| system | shape | tokens/s | MFU | peak memory | vs peer |", "| --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['system']} | {r['shape']} | failed: {r['error'][:100]} | | | |")
            continue
        mem = "n/a (CPU)" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f} GiB"
        ratio = "" if r.get("vs_peer") is None else f"{r['vs_peer']:.2f}x"
        lines.append(f"| {r['system']} | {r['shape']} | {r['tokens_per_s'] / 1e3:,.1f}k | {100 * r['mfu']:.1f}% | "
                     f"{mem} | {ratio} |")
    m = result["machine"]
    lines.append(f"\n{m['device']}; MFU against {result['matmul_peak_tflops']:.3g} TFLOP/s measured; torch "
                 f"{m['torch']}, transformers {m['transformers']}, deepspeed {m['deepspeed']}; "
                 f"{result['tokens_per_step']} tokens per step")
    return "\n".join(lines)


def run(args: argparse.Namespace, shapes: dict[str, Shape], variants: dict[str, list[str]]) -> dict:
    from data.manifest import load_manifest
    from data.tokenizer import Tokenizer

    tok = Tokenizer(load_manifest(args.data).tokenizer_path)
    peak = matmul_peak_tflops(args.device)
    result = {"machine": machine(args.device), "matmul_peak_tflops": peak, "tokens_per_step": args.tokens_per_step,
              "shapes": {n: asdict(s) for n, s in shapes.items()}, "rows": []}
    for name, shape in shapes.items():
        rows = [{"system": v, "shape": name} for v in variants] + [{"system": PEER_NAMES[shape.peer], "shape": name}]
        for row in rows:
            print(f"[speed] {row['system']} {name} ...", file=sys.stderr, flush=True)
            try:  # one failed row still leaves the others measured
                row.update(cloze_row(args, shape, variants[row["system"]]) if row["system"] in variants
                           else peer_row(args, shape, tok.vocab_size, tok))
                row["mfu"] = row["useful_tflops"] / peak
            except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
                row["error"] = str(e).splitlines()[0] if str(e) else type(e).__name__
        peer_rate = rows[-1].get("tokens_per_s")
        for row in rows:
            if peer_rate and "tokens_per_s" in row:
                row["vs_peer"] = row["tokens_per_s"] / peer_rate
        result["rows"] += rows
    return result


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, dict[str, Shape], dict[str, list[str]]]:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_speed", description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="prepared folder (python -m launch.prepare --out)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes and steps: every row in a minute on a CPU")
    ap.add_argument("--shapes", default="", help=f"comma-separated, default all: {', '.join(SHAPES | TINY_SHAPES)}")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=VALUE[,KEY=VALUE]",
                    help="another cloze row per shape with these launch.train overrides (repeatable)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens-per-step", type=int, help="default 65536 (tiny 512)")
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per step (micro batch = tokens / seq / accum)")
    ap.add_argument("--steps", type=int, help="timed steps per row (default 40, tiny 4)")
    ap.add_argument("--warmup", type=int, help="untimed steps first (default 10, tiny 2)")
    ap.add_argument("--log-every", type=int, help="cloze's log window in steps (default 10, tiny 2)")
    ap.add_argument("--workers", type=int, help="cloze loader workers (default 2, tiny 1)")
    ap.add_argument("--seed", type=int, default=26)
    ap.add_argument("--out", type=Path, help="also write every number as JSON here")
    args = ap.parse_args(argv)
    for key, full, tiny in (("tokens_per_step", 65536, 512), ("steps", 40, 4), ("warmup", 10, 2),
                            ("log_every", 10, 2), ("workers", 2, 1)):
        if getattr(args, key) is None:
            setattr(args, key, tiny if args.tiny else full)
    known = TINY_SHAPES if args.tiny else SHAPES
    names = [n for n in args.shapes.split(",") if n] or list(known)
    if unknown := [n for n in names if n not in known]:
        raise ValueError(f"--shapes: unknown {unknown}{' with --tiny' if args.tiny else ''}; valid: {', '.join(known)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no GPU here; pass --device cpu")
    if min(args.tokens_per_step, args.accum, args.steps, args.log_every) < 1 or min(args.warmup, args.workers) < 0:
        raise ValueError("--tokens-per-step, --accum, --steps, --log-every must be >= 1; --warmup, --workers >= 0")
    if args.steps % args.log_every or args.warmup % args.log_every:
        raise ValueError(f"--steps and --warmup must be multiples of --log-every {args.log_every} (whole log windows)")
    if bad := [n for n in names if args.tokens_per_step % (known[n].seq_len * args.accum)]:
        raise ValueError(f"--tokens-per-step {args.tokens_per_step} is not a multiple of seq_len x --accum for {bad}")
    variants = {"cloze": []}
    for spec in args.variant:
        name, _, rest = spec.partition("=")
        if not name.startswith("cloze") or "=" not in rest:
            raise ValueError(f"--variant {spec!r}: expected cloze...=KEY=VALUE[,KEY=VALUE], e.g. "
                             "cloze+flex=train.attention_backend=flex")
        variants[name] = rest.split(",")
    args.data = args.data.resolve()
    return args, {n: known[n] for n in names}, variants


def main(argv: list[str] | None = None) -> int:
    try:
        args, shapes, variants = parse_args(argv)
        with tempfile.TemporaryDirectory(prefix="cloze-speed-") as work:
            args.work = work
            result = run(args, shapes, variants)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    print(table(result))
    return 1 if any("error" in r for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
