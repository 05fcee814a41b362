"""`--dry-run`: everything a user should check before spending GPU hours, computed without starting anything.

Memory per rank follows the ZeRO paper's accounting (Rajbhandari et al. 2020, section 3): with Adam, mixed
precision keeps 2 bytes of bf16 weights, 2 of bf16 gradients and K = 12 bytes of optimizer state per parameter
(fp32 master weight, momentum, variance); fp32 keeps 4 + 4 + 12 under ZeRO 1-3 (DeepSpeed still keeps an fp32
master partition) and 4 + 4 + 8 at stage 0. Stage 1 partitions the optimizer state over
the data-parallel ranks, stage 2 the gradients too, stage 3 the weights too. Activations are counted tensor by tensor:
what autograd keeps for backward in one micro-batch (activation_bytes), checked against a measurement of the live
tensors by bench/activation_memory.py. These are estimates: allocator overhead, communication buckets, transient
buffers and the CUDA context (about 0.5-1 GiB) come on top.
"""

from __future__ import annotations

import json

from launch.config import RunConfig
from launch.train.schedules import build as build_schedules
from model.config import EncoderConfig


def zero_memory_bytes(params: int, stage: int, world: int, precision: str) -> dict[str, float]:
    # fp32 under ZeRO >= 1 still keeps a separate fp32 master partition beside the module's weights (measured by
    # bench/zero_memory.py: 12 bytes/param of optimizer state, not 8); only stage 0 fp32 steps the weights in place.
    w, g, k = (2, 2, 12) if precision == "bf16" else (4, 4, 12 if stage >= 1 else 8)
    n = max(1, world)
    weights = w * params / (n if stage >= 3 else 1)
    grads = g * params / (n if stage >= 2 else 1)
    optim = k * params / (n if stage >= 1 else 1)
    return {"weights": weights, "grads": grads, "optimizer": optim, "total": weights + grads + optim}


def activation_bytes(enc: EncoderConfig, micro: int, seq: int, precision: str, labelled_fraction: float,
                     checkpoint_every: int = 0, dense_mask: bool = True, head_loss: str = "plain") -> dict[str, float]:
    """Bytes one micro-batch (micro rows x seq tokens) keeps for backward, by part; "total" is the estimate.

    Per block, in the model's dtype (b bytes): 11 h + 4 i per token -- the block input and the attention norm's
    output (h each), the Wqkv output (3 h: v is used as it is, RoPE writes new q and k: 2 h more), the attention
    output and the Wo input (2 h), the residual before the MLP and the MLP norm's output (2 h), the GeGLU input
    projection (2 i: it outputs value and gate), the GELU output and the gated product (2 i); plus, in fp32, the two
    norms' mean and rstd and SDPA's log-sum-exp per head. With a dense mask (sdpa; cloze always passes the rows'
    document ids) SDPA also keeps the mask as an additive bias of B x T x T in the model's dtype, per block. Block 0
    has no attention norm. A checkpointed block keeps only its input (h per token), while the mask it is handed
    stays alive until backward (B x T x T booleans); backward recomputes one block at a time, so one full block
    ("recompute") comes on top of what is held (an upper bound: the blocks after it have freed theirs). Outside the
    blocks: the token ids, the embedding and final norms' inputs, RoPE's cos and sin; the head keeps 4 h per
    labelled position (dense, GELU, norm and decoder inputs) and, plain, the fp32 log-softmax of its logits (4 x
    vocab per labelled position); fused keeps instead the decoder's fp32 weight and bias gradients (once per
    micro-batch).
    """
    b = 2 if precision == "bf16" else 4
    h, i, heads, tokens = enc.hidden_size, enc.intermediate_size, enc.num_heads, micro * seq
    square = micro * seq * seq
    block = tokens * (b * (11 * h + 4 * i) + 4 * (4 + heads)) + (b * square if dense_mask else 0)
    first_block = block - tokens * (b * h + 8)  # no attention norm: no output of its own, no mean and rstd
    every = checkpoint_every
    checkpointed = [n for n in range(enc.num_layers) if every and n % every == 0]
    kept = sum(first_block if n == 0 else block for n in range(enc.num_layers) if n not in checkpointed)
    inputs = len(checkpointed) * tokens * b * h
    held_mask = square if checkpointed and dense_mask else 0
    ends = tokens * (8 + 2 * (b * h + 8)) + seq * enc.head_dim * 4
    labels = labelled_fraction * tokens
    if head_loss == "fused":
        head = labels * (4 * b * h + 16 + 8) + 4 * (enc.vocab_size * h + enc.vocab_size)
    else:
        head = labels * (4 * b * h + 16 + 8 + 4 * enc.vocab_size)
    head += tokens  # which positions are labelled
    held = kept + inputs + held_mask + ends + head
    recompute = block if checkpointed else 0
    return {"blocks": kept + inputs, "mask": held_mask, "outside_blocks": ends + head, "held": held,
            "recompute": recompute, "total": held + recompute}


def gib(x: float) -> str:
    return f"{x / 2**30:.2f} GiB"


def describe(cfg: RunConfig, world: int, ds_config: dict, vocab_size: int, precision: str,
             labelled_fraction: float, encoder: EncoderConfig | None = None) -> str:
    """encoder: the model's shape when it does not come from cfg.model (model.init_from's folder)."""
    enc = encoder or EncoderConfig(vocab_size=vocab_size, **cfg.model.encoder_kwargs())
    t, seq = cfg.train, cfg.data.seq_len
    params = enc.num_params(include_head=True)
    rows = t.micro_batch_size * t.grad_accum * world
    run = build_schedules(cfg)
    total_tokens = run.tokens_before(t.max_steps, world)
    lines = [
        "== resolved training config",
        json.dumps(cfg.to_dict(), indent=1, default=str),
        "== DeepSpeed config (as passed to deepspeed.initialize)",
        json.dumps(ds_config, indent=1),
        "== batch",
        f"micro_batch_size {t.micro_batch_size} x grad_accum {t.grad_accum} x world size {world} = global batch "
        f"{rows} rows; x seq_len {seq} = {rows * seq:,} tokens per optimizer step; "
        f"{total_tokens:,} tokens in {t.max_steps} steps" + (" (the schedules below move the batch)"
                                                              if total_tokens != rows * seq * t.max_steps else ""),
        "== model",
        f"{params:,} parameters ({enc.num_params(include_embeddings=False):,} without the embedding); "
        f"{enc.num_layers} layers, hidden {enc.hidden_size}, heads {enc.num_heads}, GeGLU {enc.intermediate_size}, "
        f"vocab {vocab_size}; {enc.describe_layers()}",
        f"training FLOPs per token: {enc.flops_per_token(seq, labelled_fraction) / 1e6:.1f} MFLOP "
        f"(head on {labelled_fraction:.0%} of positions: the expected labelled share of the objective mix)",
        f"== estimated memory per rank ({precision}, world {world}; model states + activations of one micro-batch, "
        f"activation checkpointing {t.activation_checkpointing})",
    ]
    chosen = ds_config.get("zero_optimization", {}).get("stage", 0)
    head_loss = "plain" if chosen == 3 else t.head_loss  # the trainer ignores fused under ZeRO-3
    dense = t.attention_backend == "sdpa"  # flex ('auto' on a GPU) keeps a small block mask instead

    def acts(every: int, phase=None) -> dict[str, float]:
        phase = phase or largest
        return activation_bytes(enc, phase.micro_batch_size, phase.seq_len, precision, labelled_fraction, every,
                                dense, head_loss)

    largest = run.shape[0]  # the phase whose micro-batch needs the most activation memory
    largest = max(run.shape, key=lambda p: acts(t.recompute_every(), p)["total"])
    if len(run.shape) > 1:
        lines.append(f"(activations of the phase that needs the most: micro-batch {largest.micro_batch_size} x "
                     f"{largest.seq_len} tokens, from step {largest.step + 1})")

    act = acts(t.recompute_every())["total"]
    lines.append(activation_line("without checkpointing", acts(0)))
    # Off: show what each setting would save; on: what the chosen one does.
    options = [1, t.activation_checkpointing_every] if t.recompute_every() == 0 else [t.recompute_every()]
    for every in dict.fromkeys(options):
        label = "full" if every == 1 else f"every_n, n={every}"
        lines.append(activation_line(f"checkpointing {label}", acts(every)))
    for stage in range(4):
        m = zero_memory_bytes(params, stage, world, precision)
        mark = "  <- this run" if stage == chosen else ""
        lines.append(f"ZeRO-{stage}: weights {gib(m['weights'])} + grads {gib(m['grads'])} + optimizer "
                     f"{gib(m['optimizer'])} + activations {gib(act)} = {gib(m['total'] + act)}{mark}")
    lines += phase_table(cfg, world)
    return "\n".join(lines)


def activation_line(what: str, a: dict[str, float]) -> str:
    recompute = f" + {gib(a['recompute'])} while a block is recomputed" if a["recompute"] else ""
    mask = f", mask held by the checkpoints {gib(a['mask'])}" if a["mask"] else ""
    return (f"activations, {what}: {gib(a['held'])} held for backward (blocks {gib(a['blocks'])}{mask}, "
            f"embeddings and head {gib(a['outside_blocks'])}){recompute}")


def expected_labelled_fraction(cfg: RunConfig) -> float:
    """Share of positions with a label, averaged over the mix (MLM/span: their rate; causal/prefix: ~all / half)
    and, when the mix or a rate follows a schedule, over the run's steps."""
    share = {"causal": 1.0, "prefix": 0.5}
    run = build_schedules(cfg)
    steps = run.max_steps
    samples = sorted({round(i * (steps - 1) / 999) for i in range(1000)}) if steps > 1000 else range(steps)
    total = 0.0
    for step in samples:
        for name, w in run.shares_at(step).items():
            moving = run.moving.get(name, {})
            rate = moving["rate"].value_at(step) if "rate" in moving else run.params.get(name, {}).get("rate", 0.15)
            total += w * share.get(name, float(rate))  # type: ignore[arg-type]
    return total / len(samples)


def phase_table(cfg: RunConfig, world: int = 1) -> list[str]:
    """`--dry-run`'s table of the run's phases when the objective mix or an objective parameter follows a schedule
    (launch/train/schedules.py): one row per phase, each value where the phase starts and, when it ramps, where
    it arrives. Steps are counted as the log counts them (the first step is 1)."""
    run = build_schedules(cfg)
    phases = run.phases()
    if not (run.mix_schedule or run.moving or run.data_schedule or run.accum or len(run.shape) > 1):
        return []
    objectives_move = bool(run.mix_schedule or run.moving)  # else only the data mix moves: no objective columns
    keys = [k for k in phases[0][2] if objectives_move or not k.startswith("mix/")]
    header = ["steps"] + [k.replace("mix/", "share ").replace("data/", "data ") for k in keys]

    def pct(step: int) -> str:
        return f"{100 * step / run.max_steps:g}%"

    rows = []
    for a, b, start, end in phases:
        cells = [f"{a + 1}-{b} ({pct(a)}-{pct(b)})"]
        for k in keys:
            moves = abs(start[k] - end[k]) > 1e-12
            digits = 0 if k.startswith(("train.", "data.seq_len", "model.")) else 3  # counts and RoPE bases
            cells.append(f"{start[k]:.{digits}f}" + (f" -> {end[k]:.{digits}f}" if moves else ""))
        rows.append(cells)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    out = [f"== schedules: {len(phases)} phase(s) over {run.max_steps} steps (share: of micro-batches; data: of "
           f"rows; a -> b: ramps linearly to b where the phase ends)"]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    if run.accum or len(run.shape) > 1:
        tokens = run.tokens_before(run.max_steps, world)
        out.append(f"batch warm-up and phases: {tokens:,} tokens in {run.max_steps} steps on {world} rank(s); the LR "
                   f"schedule follows {cfg.train.lr_follows}")
    return out
