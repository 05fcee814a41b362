"""What bench/gpu_speed.py runs in its own process: the transformers peers (BertForMaskedLM and ModernBertForMaskedLM,
random init, trained by a plain loop, the way a user of transformers would write it), the matmul peak that MFU is
measured against, and the analytic FLOP and byte counts of bench/SPEED.md.

Every choice here favours the peer, so the ratio cloze / peer is not flattered: SDPA attention, bf16 autocast,
`torch.optim.AdamW(fused=True)` on CUDA, no padding (every row is full), batches made on the device (no loader,
no host-to-device copy), no `.item()` inside the timed steps, and ModernBERT with `sparse_prediction=True` (its head
only on labelled positions). Each model keeps the stock defaults of its configuration otherwise (BERT's dropout 0.1,
ModernBERT's local attention in two layers of three), as the issue's peer figures were measured.

Useful FLOPs (for MFU) count what the model must compute to train, not what it happens to compute: BERT's dense head
and decoder run on every position, but only the labelled ones carry loss, so only those are counted.
"""

from __future__ import annotations

import gc
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from bench.gpu_speed_shapes import Shape

PEER_NAMES = {"bert": "transformers BertForMaskedLM", "modernbert": "transformers ModernBertForMaskedLM"}
MASK_RATE = 0.15
"""Share of positions that carry a label (BERT's 15%); of those 80% become [MASK], 10% a random token, 10% stay."""


@dataclass(frozen=True)
class Specials:
    """Token ids the peers need; taken from cloze's tokenizer so both sides share one vocabulary."""

    pad_id: int
    """[PAD], the embedding padding index."""
    cls_id: int
    """[CLS] (ModernBERT's bos/cls)."""
    sep_id: int
    """[SEP] (ModernBERT's eos/sep)."""
    mask_id: int
    """[MASK], written over 80% of the labelled positions."""
    first_ordinary_id: int
    """Smallest id that is not a special token; random tokens are drawn from [first_ordinary_id, vocab)."""

    def __post_init__(self) -> None:
        ids = (self.pad_id, self.cls_id, self.sep_id, self.mask_id, self.first_ordinary_id)
        if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
            raise ValueError(f"Specials: every id must be a non-negative integer, got {ids}")


def matmul_peak_tflops(device: str) -> dict:
    """Best of five timed loops of one square matmul: bf16 8192^3 on a GPU (~1 s in all), fp32 256^3 on a CPU."""
    n, dtype, iters = (256, torch.float32, 20) if device == "cpu" else (8192, torch.bfloat16, 50)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(iters):  # clocks up, cuBLAS heuristics cached
        a @ b
    best = 0.0
    for _ in range(5):
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            a @ b
        sync()
        best = max(best, 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12)
    del a, b
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "measured_tflops": best}


def machine_info(device: str) -> dict:
    import importlib.metadata as md

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    name = torch.cuda.get_device_name(0) if device == "cuda" else (platform.processor() or platform.machine())
    return {"host": platform.node(), "device": device, "device_name": name, "cpus": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": version("transformers"), "deepspeed": version("deepspeed")}


def bert_flops_per_token(layers: int, hidden: int, intermediate: int, vocab: int, seq_len: int,
                         labelled_fraction: float) -> float:
    """Useful training FLOPs per input token of BertForMaskedLM (forward + backward = 3x forward, 2 per MAC).

    Encoder matmuls: Q, K, V, O (4 h^2) and the two MLP matrices (2 h I) per layer. Attention: QK^T and PV over the
    full seq_len square (12 L T h, the same convention as cloze's EncoderConfig.flops_per_token). Head: the transform
    dense (h^2) and the decoder (h V) on labelled positions only. Embeddings, norms, biases, softmax: not matmuls.
    """
    matmul = layers * (4 * hidden * hidden + 2 * hidden * intermediate)
    attention = 12 * layers * seq_len * hidden
    head = 6 * (hidden * hidden + hidden * vocab) * labelled_fraction
    return 6.0 * matmul + attention + head


def peer_flops_per_token(kind: str, shape: Shape, vocab: int, labelled_fraction: float) -> float:
    if kind == "bert":
        return bert_flops_per_token(shape.layers, shape.hidden, shape.peer_intermediate, vocab, shape.seq_len,
                                    labelled_fraction)
    # ModernBERT has cloze's layer layout (fused Wqkv, Wo, GeGLU Wi of 2 I, Wo of I; dense + decoder head), so
    # cloze's own counter applies. Its local layers still run SDPA over the whole square with a window mask.
    from model.config import EncoderConfig

    enc = EncoderConfig(vocab_size=vocab, hidden_size=shape.hidden, num_layers=shape.layers, num_heads=shape.heads,
                        intermediate_size=shape.peer_intermediate)
    return enc.flops_per_token(shape.seq_len, labelled_fraction)


def build_peer(kind: str, shape: Shape, vocab: int, specials: Specials) -> torch.nn.Module:
    """Random-init transformers model of the shape, with SDPA attention, in fp32 (autocast does the bf16)."""
    from transformers import AutoModelForMaskedLM, BertConfig, ModernBertConfig

    if kind == "bert":
        config = BertConfig(vocab_size=vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                            num_attention_heads=shape.heads, intermediate_size=shape.peer_intermediate,
                            max_position_embeddings=max(512, shape.seq_len), pad_token_id=specials.pad_id)
    elif kind == "modernbert":
        config = ModernBertConfig(vocab_size=vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                                  num_attention_heads=shape.heads, intermediate_size=shape.peer_intermediate,
                                  max_position_embeddings=max(8192, shape.seq_len), pad_token_id=specials.pad_id,
                                  bos_token_id=specials.cls_id, eos_token_id=specials.sep_id,
                                  cls_token_id=specials.cls_id, sep_token_id=specials.sep_id,
                                  sparse_prediction=True)
    else:
        raise ValueError(f"peer kind {kind!r} is not one of {sorted(PEER_NAMES)}")
    return AutoModelForMaskedLM.from_config(config, attn_implementation="sdpa")


def masked_batch(gen: torch.Generator, rows: int, seq_len: int, vocab: int, specials: Specials,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ordinary tokens, MASK_RATE of them labelled with the 80/10/10 replacement; made on the device."""
    ids = torch.randint(specials.first_ordinary_id, vocab, (rows, seq_len), device=device, generator=gen)
    u = torch.rand(rows, seq_len, device=device, generator=gen)
    labelled = u < MASK_RATE
    labels = torch.where(labelled, ids, torch.full_like(ids, -100))
    # Reuse u inside the labelled band for the 80/10/10 split: u / MASK_RATE is uniform on [0, 1) there.
    v = u / MASK_RATE
    random_ids = torch.randint(specials.first_ordinary_id, vocab, (rows, seq_len), device=device, generator=gen)
    inputs = torch.where(labelled & (v < 0.8), torch.full_like(ids, specials.mask_id), ids)
    inputs = torch.where(labelled & (v >= 0.8) & (v < 0.9), random_ids, inputs)
    return inputs, labels


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_peer(kind: str, shape: Shape, vocab: int, specials: Specials, micro_batch: int, grad_accum: int,
               steps: int, warmup: int, device: torch.device, precision: str, seed: int = 0) -> dict:
    """Train `warmup + steps` optimizer steps; time the last `steps` (device synchronised at both ends).

    Returns tokens/s, peak memory (CUDA only), the realised labelled fraction, losses and the parameter count.
    torch.cuda.OutOfMemoryError propagates after the model is freed, so the caller can retry with a smaller micro
    batch (and more accumulation, same tokens per step).
    """
    torch.manual_seed(seed)
    model = optimizer = None
    try:
        model = build_peer(kind, shape, vocab, specials).to(device)
        model.train()
        params = sum(p.numel() for p in model.parameters())
        fused = {"fused": True} if device.type == "cuda" else {}
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01,
                                      **fused)
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        use_bf16 = precision == "bf16"
        labels_seen = torch.zeros((), dtype=torch.int64, device=device)
        first_loss = last_loss = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = 0.0
        for step in range(warmup + steps):
            if step == warmup:
                _sync(device)
                t0 = time.perf_counter()
                labels_seen.zero_()
            for _ in range(grad_accum):
                inputs, labels = masked_batch(gen, micro_batch, shape.seq_len, vocab, specials, device)
                labels_seen += (labels != -100).sum()
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    loss = model(input_ids=inputs, labels=labels).loss
                (loss / grad_accum).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            last_loss = loss.detach()
            if first_loss is None:
                first_loss = last_loss
        _sync(device)
        wall = time.perf_counter() - t0
        tokens = steps * grad_accum * micro_batch * shape.seq_len
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        return {"tokens_per_s": tokens / wall, "timed_wall_s": wall, "peak_memory_gib": peak,
                "labelled_fraction": labels_seen.item() / tokens, "params": params,
                "loss_first": float(first_loss), "loss_last": float(last_loss)}
    finally:
        del model, optimizer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def run_peer(kind: str, shape: Shape, vocab: int, specials: Specials, tokens_per_step: int, steps: int, warmup: int,
             device: torch.device, precision: str, seed: int) -> dict:
    """One peer row: train_peer at tokens_per_step / seq_len rows, halving the micro batch (and doubling the
    accumulation, so tokens per step stay) after a CUDA out-of-memory."""
    micro, accum = tokens_per_step // shape.seq_len, 1
    while True:
        t0 = time.perf_counter()
        try:
            result = train_peer(kind, shape, vocab, specials, micro, accum, steps, warmup, device, precision, seed)
            break
        except torch.cuda.OutOfMemoryError:
            pass
        # Outside the except block: the traceback (and the activations its frames hold) is gone by now.
        gc.collect()
        torch.cuda.empty_cache()
        if micro == 1:
            return {"micro_batch": micro, "grad_accum": accum, "error": "out of memory at micro batch 1"}
        print(f"[speed] peer {shape.name}: out of memory at micro batch {micro}; retrying with {micro // 2} x "
              f"{accum * 2}", file=sys.stderr, flush=True)
        micro, accum = micro // 2, accum * 2
    return {"micro_batch": micro, "grad_accum": accum, "warmup": warmup, "steps": steps,
            "wall_s": round(time.perf_counter() - t0, 1), **result,
            "flops_per_token": peer_flops_per_token(kind, shape, vocab, result["labelled_fraction"])}


ZERO2_BF16_BYTES_PER_PARAM = {"weights": 4, "grads": 12, "optimizer": 34}
"""HBM traffic per parameter per optimizer step, one GPU, ZeRO-2 bf16 (bench/SPEED.md derives each term): weights
read in forward and backward (2 + 2); gradients written in bf16, read and written as the fp32 partition, read for
the clipping norm (2 + 2 + 4 + 4); AdamW reads fp32 grad, master, m, v and writes master, m, v (16 + 12), then the
bf16 weights are refreshed from the master (4 + 2)."""


def activation_bytes_per_token(hidden: int, intermediate: int, layers: int, vocab: int, labelled: float,
                               head_loss: str = "plain") -> float:
    """Bytes autograd keeps for backward per token, bf16, for cloze's encoder and ModernBERT's (same layout).

    Per layer 22 h + 8 i: the two norms' inputs, the Wqkv input and its q/k/v output (RoPE keeps nothing: its
    products are with cos and sin, which need no gradient), the attention output and the Wo input, the GeGLU
    projection (4 i) and its GELU output and product (4 i). The head keeps 8 h per labelled token (its dense,
    GELU and norm inputs, and the decoder input or, fused, its gradient); the plain loss adds the fp32
    log-softmax of the labelled logits (4 x vocab per labelled token). The fused loss's fp32 weight gradient is
    per step, not per token, and is left out. Checked against a count with saved_tensors_hooks in
    tests/test_model_flops.py."""
    head = labelled * (8 * hidden + (4 * vocab if head_loss == "plain" else 0))
    return layers * (22 * hidden + 8 * intermediate) + head


def accounting(vocab: int = 32768) -> str:
    """The FLOP and byte table of bench/SPEED.md, from the shapes (no GPU; peers built on the meta device)."""
    from bench.gpu_speed_shapes import FULL_SHAPES, MIX
    from model.config import EncoderConfig

    specials = Specials(pad_id=0, cls_id=2, sep_id=3, mask_id=4, first_ordinary_id=9)
    cloze_frac = sum(w * (1.0 if n == "causal" else 0.15) for n, w in MIX.items())
    per_param = sum(ZERO2_BF16_BYTES_PER_PARAM.values())
    out = [f"vocab {vocab}; labelled fraction: cloze's mix {cloze_frac:.3f}, peers {MASK_RATE}. FLOP columns: training "
           f"MFLOP per token (forward + backward = 3 x forward, 2 FLOPs per multiply-add).",
           "| system | shape | params | encoder matmuls | attention | head (labelled) | total | tokens/s at 50% MFU "
           "of 790 TFLOP/s | ZeRO-2 HBM bytes/step | activations/token |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in FULL_SHAPES.values():
        h, L, T = s.hidden, s.layers, s.seq_len
        for system in ("cloze", s.peer):
            inter = s.intermediate if system == "cloze" else s.peer_intermediate
            frac = cloze_frac if system == "cloze" else MASK_RATE
            if system == "bert":
                matmul, act = 6.0 * L * (4 * h * h + 2 * h * inter), L * 34 * h + 6 * vocab
                with torch.device("meta"):
                    params = sum(p.numel() for p in build_peer(system, s, vocab, specials).parameters())
            else:
                enc = EncoderConfig(vocab_size=vocab, hidden_size=h, num_layers=L, num_heads=s.heads,
                                    intermediate_size=inter)
                matmul, params = 6.0 * L * (4 * h * h + 3 * h * inter), enc.num_params(include_head=True)
                act = activation_bytes_per_token(h, inter, L, vocab, frac)
                if system == "modernbert":
                    with torch.device("meta"):
                        params = sum(p.numel() for p in build_peer(system, s, vocab, specials).parameters())
            attention = 12.0 * L * T * h
            head = 6.0 * (h * h + h * vocab) * frac
            total = matmul + attention + head
            name = "cloze" if system == "cloze" else PEER_NAMES[system].removeprefix("transformers ")
            out.append(f"| {name} | {s.name} | {params / 1e6:.1f}M | {matmul / 1e6:.0f}M | {attention / 1e6:.0f}M | "
                       f"{head / 1e6:.0f}M | {total / 1e6:.0f}M | {0.5 * 790e12 / total / 1e3:.0f}k | "
                       f"{per_param * params / 1e9:.2f} GB | {act / 1e3:.0f} kB |")
    return "\n".join(out)
