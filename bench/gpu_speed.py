"""Training speed on one GPU: cloze's full training path against transformers' BERT and ModernBERT, same run.

    python -m bench.gpu_speed --out speed.json [--data runs/bench-data] [--shapes bert-512,modernbert-1024]
    python -m bench.gpu_speed --prepare-only --data runs/bench-data      # shards + 32768-piece tokenizer, once
    python -m bench.gpu_speed --tiny --device cpu --out /tmp/speed.json  # every row end to end on a CPU (the test)
    python -m bench.gpu_speed --accounting                               # the FLOP and byte table of bench/SPEED.md

Rows, per shape: **cloze** is `python -m launch.train` in a subprocess (one rank): shards through the stream, the
objective mix MLM 0.8 / span 0.1 / causal 0.1, DeepSpeed ZeRO-2, bf16 on a GPU. Its tokens/s is the harmonic mean
of the trainer's own log windows after the warm-up (read from its TensorBoard scalars, checked against its progress
lines): every window holds the same tokens, so this is tokens over time. The warm-up spans whole log windows and
lasts until every objective has run once (each has its own shapes and mask path); DeepSpeed's engine set-up
happens before step 1 and is never timed. **peers** are trained in this process (bench/gpu_speed_peers.py).
MFU divides useful FLOPs/s by a bf16 matmul peak measured in the same run (or --peak-tflops).

Results go to --out after every row, so a run killed by a time limit still leaves what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from bench.gpu_session import wait_or_end_group
from bench.gpu_speed_peers import PEER_NAMES, Specials, accounting, machine_info, matmul_peak_tflops, run_peer
from bench.gpu_speed_report import score, table
from bench.gpu_speed_shapes import FULL_SHAPES, MIX, TINY_SHAPES, Shape, SpeedConfig

ROOT = Path(__file__).resolve().parent.parent


# -- data --------------------------------------------------------------------------------------------------------
def prepare_data(out: Path, tiny: bool) -> dict:
    """Shards and tokenizer from this interpreter's stdlib: all of it with 32768 pieces, or a slice with 1000."""
    from data.pipeline import PrepareConfig, prepare

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    if tiny:
        # ~0.5 MB and a 300-segment tokenizer sample: seconds on 2 cores, 150k tokens, 5 shards
        inputs = [str(stdlib / pkg / "**" / "*.py") for pkg in ("json", "logging", "http")]
        vocab, shard_bytes, sentences = 1000, 100_000, 300
    else:
        # ~7M tokens in 8 shards (~18 MB, carried to the GPU machine); the loader repeats epochs
        inputs, vocab, shard_bytes, sentences = [str(stdlib / "**" / "*.py")], 32768, 2_000_000, 8000
    cfg = PrepareConfig(inputs=inputs, out_dir=out, vocab_size=vocab, shard_bytes=shard_bytes,
                        max_tokenizer_sentences=sentences,
                        exclude=["*/site-packages/*", "*/dist-packages/*"], model_max_length=1024,
                        tokenizer_threads=min(16, os.cpu_count() or 1))
    print(f"[speed] preparing {out} (vocab {vocab}) from {stdlib}", file=sys.stderr, flush=True)
    result = prepare(cfg)
    m = result.manifest
    return {"prepared_here": True, "prepare_s": round(result.seconds["total"], 1),
            "tokenizer_s": round(result.seconds["tokenizer"], 1), "tokens": m.tokens, "shards": len(m.shards),
            "bytes": sum(s.bytes for s in m.shards)}


def load_data(cfg: SpeedConfig) -> tuple[dict, object]:
    from data.manifest import load_manifest
    from data.tokenizer import Tokenizer

    info = {"prepared_here": False}
    if not (cfg.data / "manifest.json").is_file():
        info = prepare_data(cfg.data, cfg.tiny)
    manifest = load_manifest(cfg.data)
    tok = Tokenizer(manifest.tokenizer_path)
    if len(manifest.shards) < max(1, cfg.workers):
        raise ValueError(f"{cfg.data} has {len(manifest.shards)} shards for --workers {cfg.workers}; lower --workers "
                         f"or re-prepare with smaller shards")
    if not cfg.tiny and tok.vocab_size != 32768:
        print(f"[speed] warning: {cfg.data} has vocab {tok.vocab_size}, the issue's shapes use 32768", file=sys.stderr)
    info.update(path=str(cfg.data), vocab_size=tok.vocab_size, tokens=manifest.tokens, shards=len(manifest.shards))
    return info, tok


# -- cloze -------------------------------------------------------------------------------------------------------
def first_step_with_every_objective(seed: int, grad_accum: int) -> int:
    """Optimizer steps until the mixer has chosen every objective at least once (it is a pure function of seed)."""
    from objectives.mixer import Mixer

    mixer, seen = Mixer(dict(MIX), seed=seed), set()
    for micro in range(100_000):
        seen.add(mixer.choose(micro))
        if len(seen) == len(MIX):
            return micro // grad_accum + 1
    raise AssertionError("the mixer never chose every objective")


def round_up(x: int, k: int) -> int:
    return -(-x // k) * k


def cloze_config(cfg: SpeedConfig, shape: Shape, run_dir: Path, micro: int, accum: int, warmup: int,
                 steps: int, peak_tflops: float) -> dict:
    return {
        "out_dir": str(run_dir),
        "data": {"path": str(cfg.data.resolve()), "seq_len": shape.seq_len, "num_workers": cfg.workers},
        "model": {"hidden_size": shape.hidden, "num_layers": shape.layers, "num_heads": shape.heads,
                  "intermediate_size": shape.intermediate, "max_position_embeddings": max(1024, shape.seq_len)},
        "objectives": {"mix": dict(MIX)},
        "train": {"micro_batch_size": micro, "grad_accum": accum, "max_steps": warmup + steps, "lr": 5.0e-4,
                  "warmup_steps": warmup, "precision": cfg.precision, "zero_stage": 2,
                  "deepspeed_config": str(ROOT / "deepspeed_config.json"), "log_every": cfg.log_every,
                  "seed": cfg.seed, "peak_tflops": float(peak_tflops)},
    }


PROGRESS_LINE = re.compile(r"^step\s+(\d+)/\d+ \|.*\| ([\d.]+)k tok/s \|", re.M)


def progress_windows(log: str) -> dict[int, float]:
    """{step: tokens/s} from the trainer's progress lines (printed with 0.1k resolution)."""
    return {int(m[1]): float(m[2]) * 1e3 for m in PROGRESS_LINE.finditer(log)}


def tensorboard_windows(tb_dir: Path) -> dict[int, dict[str, float]]:
    """{step: {tokens_per_s, memory_gib, ...}} from the trainer's TensorBoard scalars (full precision)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    out: dict[int, dict[str, float]] = {}
    for tag in ("tokens_per_s", "memory_gib", "data_wait_share", "useful_tflops_per_device"):
        if tag in acc.Tags().get("scalars", []):
            for ev in acc.Scalars(tag):
                out.setdefault(ev.step, {})[tag] = ev.value
    return out


def run_cloze(cfg: SpeedConfig, shape: Shape, vocab: int, peak_tflops: float, timeout: float,
              variant: str = "cloze") -> dict:
    """One cloze row, retried with half the micro batch (and twice the accumulation) on a CUDA out-of-memory."""
    import yaml

    from model.config import EncoderConfig

    micro, accum = cfg.tokens_per_step // shape.seq_len, 1
    while True:
        warmup = round_up(max(cfg.warmup, first_step_with_every_objective(cfg.seed, accum)), cfg.log_every)
        steps = round_up(cfg.steps, cfg.log_every)
        run_dir = cfg.work / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', variant)}-{shape.name}-m{micro}"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        config = cloze_config(cfg, shape, run_dir, micro, accum, warmup, steps, peak_tflops)
        config_path = run_dir / "config.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        cmd = [sys.executable, "-m", "launch.train", "--config", str(config_path), *cfg.cloze_overrides,
               *cfg.variants[variant]]
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
        env.update(PYTHONUNBUFFERED="1", DS_ACCELERATOR=cfg.device, PYTHONPATH=os.pathsep.join(
            [p for p in (env.get("PYTHONPATH"), str(ROOT)) if p]))
        if cfg.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""  # the trainer takes a GPU whenever it sees one
        t0 = time.perf_counter()
        rc, log = run_logged(cmd, env, run_dir / "train.log", timeout)
        wall = time.perf_counter() - t0
        if rc != 0 and "out of memory" in log.lower() and micro > 1:
            print(f"[speed] {variant} {shape.name}: out of memory at micro batch {micro}; retrying with {micro // 2} x "
                  f"{accum * 2}", file=sys.stderr, flush=True)
            micro, accum = micro // 2, accum * 2
            continue
        break
    row = {"micro_batch": micro, "grad_accum": accum, "warmup": warmup, "steps": steps, "wall_s": round(wall, 1),
           "command": " ".join(cmd), "config": config}
    if rc != 0:
        tail = log.strip().splitlines()[-60:]
        print(f"[speed] {variant} {shape.name} failed (exit {rc}):\n" + "\n".join(tail[-15:]), file=sys.stderr,
              flush=True)
        return {**row, "error": f"exit {rc}: " + " | ".join(tail[-3:]), "log_tail": tail}
    summary = json.loads((run_dir / "summary.json").read_text())
    lines = progress_windows(log)
    try:
        tb = tensorboard_windows(run_dir / "tensorboard")
    except Exception as e:  # the progress lines still carry tokens/s, to 0.1k
        print(f"[speed] reading {run_dir / 'tensorboard'} failed ({e}); using the progress lines", file=sys.stderr)
        tb = {}
    tb = tb or {step: {"tokens_per_s": rate} for step, rate in lines.items()}
    timed = sorted(s for s in tb if s > warmup and "tokens_per_s" in tb[s])
    if not timed:
        return {**row, "error": f"no log window after warm-up step {warmup} in {run_dir / 'train.log'}"}
    rates = [tb[s]["tokens_per_s"] for s in timed]
    # The trainer counts useful FLOPs per micro-batch (attention pairs within documents, head on labelled
    # positions); over the timed windows their rate is sum(flops_i) / sum(time_i), and time_i ~ 1 / rate_i.
    useful = [tb[s].get("useful_tflops_per_device") for s in timed]
    useful_tflops = (sum(u / r for u, r in zip(useful, rates)) / sum(1 / r for r in rates)
                     if None not in useful else None)
    counts = summary["objectives"]  # {objective: {batches, tokens, labels}} over the whole run
    labelled = sum(c["labels"] for c in counts.values()) / sum(c["tokens"] for c in counts.values())
    enc = EncoderConfig(vocab_size=vocab, hidden_size=shape.hidden, num_layers=shape.layers,
                        num_heads=shape.heads, intermediate_size=shape.intermediate)
    memory = tb[timed[-1]].get("memory_gib") if cfg.device == "cuda" else None
    final = summary.get("final", {})
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return {**row, "tokens_per_s": len(rates) / sum(1 / r for r in rates), "peak_memory_gib": memory,
            "useful_tflops": useful_tflops,
            "labelled_fraction": labelled, "flops_per_token": enc.flops_per_token(shape.seq_len, labelled),
            "params": enc.num_params(include_head=True),
            "windows": [{"step": s, "tokens_per_s": tb[s]["tokens_per_s"], "progress_line": lines.get(s),
                         "data_wait_share": tb[s].get("data_wait_share")} for s in sorted(tb)],
            "losses_last": {k.removeprefix("loss/"): v for k, v in final.items() if k.startswith("loss/")},
            "objectives": counts}


def run_logged(cmd: list[str], env: dict, log_path: Path, timeout: float) -> tuple[int, str]:
    """Run cmd in its own session with output to log_path; on timeout end that session (the trainer and its loader
    workers), and return (exit code, log text)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        ended = wait_or_end_group(proc, timeout)
        rc = proc.returncode if ended else 124
        if not ended:
            log.write(f"\n[speed] killed after {timeout:.0f} s\n")
    return rc, log_path.read_text(errors="replace")


# -- the run -----------------------------------------------------------------------------------------------------
def row_order(cfg: SpeedConfig) -> list[tuple[Shape, str]]:
    """The rows in the order they run: for every shape its first cloze variant and its peer (the issue's
    comparison), then every shape's other variants. A budget that runs out costs lever rows before it costs a
    shape's comparison. The table groups the rows by shape again."""
    cloze = list(cfg.variants) if "cloze" in cfg.systems else []
    peer = ["peer"] if "peer" in cfg.systems else []
    return [(s, x) for s in cfg.shapes for x in cloze[:1] + peer] + [(s, x) for s in cfg.shapes for x in cloze[1:]]


def run_row(cfg: SpeedConfig, shape: Shape, system: str, tok, peak_tflops: float, timeout: float) -> dict:
    if system.startswith("cloze"):
        return run_cloze(cfg, shape, tok.vocab_size, peak_tflops, timeout, variant=system)
    specials = Specials(pad_id=tok.pad_id, cls_id=tok.cls_id, sep_id=tok.sep_id, mask_id=tok.mask_id,
                        first_ordinary_id=tok.first_ordinary_id)
    steps, warmup = (round_up(n, cfg.log_every) for n in (cfg.steps, max(cfg.warmup, 1)))
    return run_peer(shape.peer, shape, tok.vocab_size, specials, cfg.tokens_per_step, steps, warmup,
                    torch.device(cfg.device), cfg.precision, cfg.seed)


def run(cfg: SpeedConfig) -> dict:
    t_start = time.perf_counter()
    data, tok = load_data(cfg)
    results: dict = {"machine": machine_info(cfg.device), "data": data, "rows": [],
                     "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()
                                  if k != "shapes"},
                     "shapes": [asdict(s) for s in cfg.shapes]}
    measured = matmul_peak_tflops(cfg.device)
    peak = {**measured, "source": "--peak-tflops" if cfg.peak_tflops else "measured",
            "used_tflops": cfg.peak_tflops or measured["measured_tflops"]}
    results["matmul_peak"] = peak
    print(f"[speed] matmul peak {measured}", file=sys.stderr, flush=True)
    cfg.work.mkdir(parents=True, exist_ok=True)
    for shape, system in row_order(cfg):
        label = system if system.startswith("cloze") else PEER_NAMES[shape.peer]
        row = {"system": label, "shape": shape.name, "seq_len": shape.seq_len,
               "tokens_per_step": cfg.tokens_per_step, "precision": cfg.precision}
        elapsed = time.perf_counter() - t_start
        if elapsed > cfg.budget_s:
            row["error"] = f"skipped: {elapsed:.0f} s spent of --budget-s {cfg.budget_s:.0f}"
        else:
            print(f"[speed] {label} {shape.name} ...", file=sys.stderr, flush=True)
            try:
                row.update(run_row(cfg, shape, system, tok, peak["used_tflops"], cfg.budget_s - elapsed + 60))
            except Exception as e:  # one broken row must not cost the rows after it (one device call each)
                import traceback

                trace = traceback.format_exc().strip().splitlines()
                print("\n".join(trace[-20:]), file=sys.stderr, flush=True)
                row.update(error=f"{type(e).__name__}: {e}"[:500], log_tail=trace[-40:])
        if row.get("useful_tflops"):  # cloze: the trainer's own count of useful FLOPs
            row["mfu"] = row["useful_tflops"] / peak["used_tflops"]
        elif row.get("tokens_per_s"):  # peers: whole rows, every pair useful; the head counted on labels only
            row["mfu"] = row["tokens_per_s"] * row["flops_per_token"] / (peak["used_tflops"] * 1e12)
            print(f"[speed] {label} {shape.name}: {row['tokens_per_s'] / 1e3:.1f}k tokens/s, "
                  f"MFU {100 * row['mfu']:.1f}%", file=sys.stderr, flush=True)
        results["rows"].append(row)
        score(results["rows"], cfg.shapes)
        results["wall_s"] = round(time.perf_counter() - t_start, 1)
        if cfg.out:
            cfg.out.parent.mkdir(parents=True, exist_ok=True)
            cfg.out.write_text(json.dumps(results, indent=1, default=str))
    return results


LEVERS = ["train.attention_backend=flex", "train.compile=true", "train.head_loss=fused"]
"""Every lever that is off by default until a GPU has measured it: FlexAttention, compiled layers, the fused head
loss with its compiled chunk (bench/gpu_curve.py checks the same set against the CPU fp32 curve)."""
GPU_VARIANTS = {"cloze+flex+compile+fused": LEVERS, "cloze": []}
"""The cloze rows of a GPU run by default: the levers (run first, beside the peer) and the shipped defaults."""


def parse_variants(specs: list[str], device: str) -> dict[str, list[str]]:
    """'NAME=KEY=VALUE,KEY=VALUE' (or a bare NAME: no overrides) -> {NAME: [KEY=VALUE, ...]}."""
    if not specs:
        return dict(GPU_VARIANTS) if device == "cuda" else {"cloze": []}
    out: dict[str, list[str]] = {}
    for spec in specs:
        name, _, rest = spec.partition("=")
        out[name.strip()] = [o.strip() for o in rest.split(",") if o.strip()]
    return out


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, SpeedConfig | None]:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_speed", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="JSON results file")
    ap.add_argument("--data", type=Path, help="prepared data dir (prepared here if it has no manifest.json); "
                                              "default: under --work")
    ap.add_argument("--shapes", default="", help="comma-separated shape names (default: all of the mode): "
                                                 + ", ".join([*FULL_SHAPES, *TINY_SHAPES]))
    ap.add_argument("--steps", type=int, help="timed steps per row (default 40; tiny 4)")
    ap.add_argument("--warmup", type=int, help="untimed steps per row, at least (default 10; tiny 2)")
    ap.add_argument("--log-every", type=int, help="cloze's log window in steps (default 10; tiny 2)")
    ap.add_argument("--tokens-per-step", type=int, help="tokens per optimizer step (default 65536; tiny 512)")
    ap.add_argument("--workers", type=int, help="cloze loader workers (default 2; tiny 1)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, few steps: the whole harness on a CPU")
    ap.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="MFU denominator; 0 measures a matmul peak")
    ap.add_argument("--cloze-override", action="append", default=[], metavar="KEY=VALUE",
                    help="passed to launch.train after the generated config (repeatable): the lever under test")
    ap.add_argument("--cloze-variant", action="append", default=[], metavar="NAME=KEY=VALUE[,KEY=VALUE]",
                    help="a cloze row per shape with these launch.train overrides (repeatable; replaces the "
                         "default variants: on a GPU 'cloze' (defaults) and 'cloze+flex+compile+fused')")
    ap.add_argument("--systems", default="cloze,peer", help="cloze, peer or both (default)")
    ap.add_argument("--budget-s", type=float, default=540.0, help="skip rows that would start after this")
    ap.add_argument("--work", type=Path, help="scratch dir for the cloze runs (default: a temporary dir)")
    ap.add_argument("--keep", action="store_true", help="keep --work (run logs, TensorBoard) afterwards")
    ap.add_argument("--seed", type=int, default=26, help="weights, data order, mix (26: all objectives by step 4)")
    ap.add_argument("--prepare-only", action="store_true", help="prepare --data and exit")
    ap.add_argument("--accounting", action="store_true", help="print the FLOP and byte table and exit")
    args = ap.parse_args(argv)
    if args.accounting:
        return args, None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no GPU here; pass --device cpu (with --tiny on a small machine)")
    if args.prepare_only and not args.data:
        raise ValueError("--prepare-only needs --data DIR (where the shards go)")
    if not args.prepare_only and not args.out:
        raise ValueError("--out FILE is required (the JSON results), e.g. --out speed.json")
    known = TINY_SHAPES if args.tiny else FULL_SHAPES
    names = [n for n in args.shapes.split(",") if n] or list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"--shapes: unknown {unknown} for {'--tiny' if args.tiny else 'a full run'}; "
                         f"valid: {', '.join(known)}")
    work = args.work or Path(tempfile.gettempdir()) / f"cloze-speed-{os.getpid()}"  # created by run()

    def pick(full, tiny):
        return tiny if args.tiny else full

    cfg = SpeedConfig(
        out=args.out, shapes=[known[n] for n in names], data=args.data or work / "data", device=device,
        tiny=args.tiny, tokens_per_step=args.tokens_per_step or pick(65536, 512), steps=args.steps or pick(40, 4),
        warmup=pick(10, 2) if args.warmup is None else args.warmup, log_every=args.log_every or pick(10, 2),
        workers=pick(2, 1) if args.workers is None else args.workers, peak_tflops=args.peak_tflops,
        systems=[s for s in args.systems.split(",") if s], budget_s=args.budget_s, work=work,
        cloze_overrides=args.cloze_override, seed=args.seed, variants=parse_variants(args.cloze_variant, device))
    return args, cfg


def main(argv: list[str] | None = None) -> int:
    try:
        args, cfg = parse_args(argv)
        if cfg is None:
            print(accounting())
            return 0
        if args.prepare_only:
            print(json.dumps(load_data(cfg)[0], indent=1))
            return 0
        results = run(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if "cfg" in locals() and cfg is not None and not args.keep and args.work is None:
            shutil.rmtree(cfg.work, ignore_errors=True)
    print(table(results, {**FULL_SHAPES, **TINY_SHAPES}))
    failed = [f"{r['system']} {r['shape']}" for r in results["rows"] if r.get("tokens_per_s") is None]
    if failed:
        print(f"error: rows without a result: {', '.join(failed)} (see {cfg.out})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
