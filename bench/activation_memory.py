"""Activation memory of one micro-batch with and without activation checkpointing (CPU, fp32), measured and
compared with the formula `--dry-run` uses (launch.train.dry_run.activation_bytes).

    .venv/bin/python -m bench.activation_memory [--seqs 512,2048,8192 --hidden 128 --layers 4 --every 1,2]

Measured: every storage an ATen op allocates during the forward of EncoderForPretraining (parameters and inputs
left out), tracked by a TorchDispatchMode and dropped when the storage is freed. "Held" is what is still alive
once the forward has returned, holding on to the loss only: what autograd and the checkpoints keep for
backward. "Peak" is the most alive at once during forward and backward, weight gradients included; its formula
is the held bytes plus one recomputed block, an upper bound when checkpointing (by the time a block is
recomputed, the blocks after it have freed theirs) that leaves out the weight gradients and backward's
temporaries. The rows are packed (document ids given), so the sdpa path builds its dense mask, as in training.
Prints one table: the ratio column is measured / formula for the held bytes; "saved" is held without / held with
checkpointing.
"""

from __future__ import annotations

import argparse
import gc
import sys
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from launch.train.dry_run import activation_bytes
from model.config import EncoderConfig
from model.heads import EncoderForPretraining


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages ATen ops allocate inside the mode that are still alive (`now`) and at most (`peak`).

    A storage is counted once however many views of it ops return; storages that existed before (`exclude`:
    parameters, inputs) are never counted, even when an op returns a view of them."""

    def __init__(self, exclude: list[torch.Tensor]) -> None:
        super().__init__()
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def _freed(self, key: int) -> None:
        self.now -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key and key not in self.live and key not in self.exclude:
                self.live[key] = storage.nbytes()
                self.now += storage.nbytes()
                self.peak = max(self.peak, self.now)
                weakref.finalize(storage, self._freed, key)
        return out


@dataclass
class Measured:
    held: int
    peak: int


def measure(cfg: EncoderConfig, micro: int, seq: int, every: int, labelled_fraction: float,
            backward: bool = True, seed: int = 0, head_loss: str = "plain") -> Measured:
    """One fp32 training forward (and backward) of a packed micro-batch, checkpointing blocks i % every == 0."""
    torch.manual_seed(seed)
    model = EncoderForPretraining(cfg, head_loss=head_loss)
    model.encoder.set_activation_checkpointing(every)
    ids = torch.randint(10, cfg.vocab_size, (micro, seq))
    labelled = torch.zeros(micro * seq, dtype=torch.bool)
    labelled[torch.randperm(micro * seq)[: round(labelled_fraction * micro * seq)]] = True
    labels = torch.where(labelled.view(micro, seq), ids, torch.full_like(ids, -100))
    doc_ids = torch.arange(seq).div(max(1, seq // 4), rounding_mode="floor").expand(micro, seq).contiguous()
    with LiveBytes([*model.parameters(), ids, labels, doc_ids]) as live:
        loss = model(ids, labels, doc_ids=doc_ids).loss
        gc.collect()
        held = live.now
        if backward:
            loss.backward()
    return Measured(held=held, peak=live.peak)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", default="512,2048,8192")
    ap.add_argument("--micro", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--every", default="1,2", help="settings to compare with none: checkpoint blocks i with "
                    "i %% every == 0 (1: full)")
    ap.add_argument("--labelled", type=float, default=0.15)
    ap.add_argument("--no-backward", action="store_true", help="measure the held bytes only (no peak)")
    args = ap.parse_args(argv)
    seqs = [int(s) for s in args.seqs.split(",")]
    cfg = EncoderConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                        num_heads=args.heads, intermediate_size=args.hidden * 3 // 2,
                        max_position_embeddings=max(seqs))
    mib = 2**20
    print(f"Activation memory of one micro-batch, fp32, CPU, sdpa with the packed rows' dense mask; model: hidden "
          f"{args.hidden}, {args.layers} layers, {args.heads} heads, GeGLU {cfg.intermediate_size}, vocab "
          f"{args.vocab}; micro-batch {args.micro}, {args.labelled:.0%} of positions labelled")
    print("| seq | checkpointing | held formula | held measured | ratio | peak formula | peak measured (fwd+bwd, "
          "incl. weight grads) | saved (held off / on) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for seq in seqs:
        held_off = 0
        for every in [0, *map(int, args.every.split(","))]:
            m = measure(cfg, args.micro, seq, every, args.labelled, backward=not args.no_backward)
            f = activation_bytes(cfg, args.micro, seq, "fp32", args.labelled, every)
            held_off = held_off or m.held
            label = "none" if every == 0 else ("full" if every == 1 else f"every_n, n={every}")
            peak = "-" if args.no_backward else f"{m.peak / mib:.1f} MiB"
            saved = "" if every == 0 else f"{held_off / m.held:.2f}x"
            print(f"| {seq} | {label} | {f['held'] / mib:.1f} MiB | {m.held / mib:.1f} MiB | "
                  f"{m.held / f['held']:.3f} | {f['total'] / mib:.1f} MiB | {peak} | {saved} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
