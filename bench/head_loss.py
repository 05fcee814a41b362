"""The decoder's loss alone: the plain path (logits, then F.cross_entropy on their fp32 copy) against the fused
path (model/head_loss.py: chunked, logits never stored), eager and compiled, in one run on one device.

    .venv/bin/python -m bench.head_loss [--device cpu|cuda] [--rows N] [--hidden 768] [--vocab 32768]
                                        [--dtype bf16|fp32] [--iters 5] [--no-compile] [--out FILE.json]

Each row times forward + backward of `sum CE(x @ W.T + b)` over N labelled rows, with x, W and b requiring
grad, as in training. The default rows are what cloze's mix labels at bert-512 with 65,536 tokens per step
(0.235 x 65,536 = 15,400) on a GPU, and 2,048 on a CPU (the full count takes seconds per iteration there).

Columns:
- ms per forward + backward, the median of --iters after two warm-up iterations (compilation happens there);
- ratio: the plain row's time over this row's (> 1: faster than plain);
- kept for backward: the bytes of the tensors autograd keeps between forward and backward, counted with
  torch.autograd.graph.saved_tensors_hooks (each storage once); the inputs x, W, b are not counted;
- peak memory above the inputs during forward + backward (CUDA only: torch.cuda.max_memory_allocated).
- max |grad - plain grad| relative to the largest plain gradient, over x, W and b: the two paths agree to that.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from model.head_loss import IGNORE_INDEX, compile_chunk, fused_linear_cross_entropy

LABELLED_PER_TOKEN = 0.8 * 0.15 + 0.1 * 0.15 + 0.1 * 1.0
"""cloze's default mix: MLM 0.8 and span 0.1 label 15% of the positions, causal 0.1 labels all."""


def plain(x, w, b, t):
    """What EncoderForPretraining does with head_loss='plain': (sum of the cross entropy, count of rows whose
    argmax is the target), the same pair fused_linear_cross_entropy returns. Rows with IGNORE_INDEX count in
    neither."""
    logits = F.linear(x, w, b)
    with torch.no_grad():
        correct = ((logits.argmax(dim=-1) == t) & (t != IGNORE_INDEX)).sum()
    return F.cross_entropy(logits.float(), t, reduction="sum"), correct


class SavedBytes:
    """Bytes autograd keeps for backward inside the `with` block, each storage once, leaving out `exclude`."""

    def __init__(self, exclude: list[torch.Tensor]) -> None:
        self.seen = {t.untyped_storage().data_ptr() for t in exclude}
        self.nbytes = 0

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.seen:
            self.seen.add(ptr)
            self.nbytes += t.untyped_storage().nbytes()
        return t

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fn, x, w, b, t, iters: int, device: torch.device) -> dict:
    """Median ms of forward + backward, bytes kept for backward, CUDA peak above the inputs, the gradients."""
    times = []
    for i in range(iters + 2):
        for p in (x, w, b):
            p.grad = None
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        with SavedBytes([x, w, b, t]) as saved:
            loss, _ = fn(x, w, b, t)
        loss.backward()
        sync(device)
        if i >= 2:
            times.append((time.perf_counter() - start) * 1e3)
    peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else None
    return {"ms": statistics.median(times), "kept_bytes": saved.nbytes, "peak_bytes": peak,
            "loss": float(loss.detach()), "grads": [p.grad.float().clone() for p in (x, w, b)]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", type=int, default=0, help="labelled rows (0: 15,400 on a GPU, 2,048 on a CPU)")
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true", help="leave out the compiled fused row")
    ap.add_argument("--out", help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.rows < 0 or args.iters < 1:
        ap.error("--rows must be >= 0 and --iters >= 1")
    rows = args.rows or (round(LABELLED_PER_TOKEN * 65536) if device.type == "cuda" else 2048)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, args.hidden, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(args.vocab, args.hidden, generator=g) * 0.02).to(device, dtype).requires_grad_()
    b = torch.zeros(args.vocab).to(device, dtype).requires_grad_()
    t = torch.randint(0, args.vocab, (rows,), generator=g).to(device)

    results = {"plain": measure(plain, x, w, b, t, args.iters, device),
               "fused": measure(fused_linear_cross_entropy, x, w, b, t, args.iters, device)}
    if not args.no_compile:
        compile_chunk()
        results["fused, compiled chunk"] = measure(fused_linear_cross_entropy, x, w, b, t, args.iters, device)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"head loss, {rows} rows x hidden {args.hidden} x vocab {args.vocab}, {args.dtype}, {name}, "
          f"torch {torch.__version__}")
    print("| path | ms fwd+bwd | ratio vs plain | kept for backward | peak above inputs | max grad diff vs plain |")
    print("| --- | --- | --- | --- | --- | --- |")
    base = results["plain"]
    table = []
    for label, r in results.items():
        diff = max(float((a - p).abs().max() / p.abs().max().clamp(min=1e-30))
                   for a, p in zip(r["grads"], base["grads"], strict=True))
        peak = "n/a (CPU)" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 1e6:,.0f} MB"
        print(f"| {label} | {r['ms']:.1f} | {base['ms'] / r['ms']:.2f}x | {r['kept_bytes'] / 1e6:,.1f} MB | {peak} "
              f"| {diff:.1e} |")
        table.append({"path": label, "ms": r["ms"], "ratio": base["ms"] / r["ms"], "kept_bytes": r["kept_bytes"],
                      "peak_bytes": r["peak_bytes"], "max_grad_diff": diff, "loss": r["loss"]})
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": name, "rows": rows, "hidden": args.hidden, "vocab": args.vocab,
                       "dtype": args.dtype, "torch": torch.__version__, "table": table}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
