"""`--dry-run`: everything a user should check before spending GPU hours, computed without starting anything.

Memory per rank follows the ZeRO paper's accounting (Rajbhandari et al. 2020, section 3): with Adam, mixed
precision keeps 2 bytes of bf16 weights, 2 of bf16 gradients and K = 12 bytes of optimizer state per parameter
(fp32 master weight, momentum, variance); fp32 keeps 4 + 4 + 12 under ZeRO 1-3 (DeepSpeed still keeps an fp32
master partition) and 4 + 4 + 8 at stage 0. Stage 1 partitions the optimizer state over
the data-parallel ranks, stage 2 the gradients too, stage 3 the weights too. Activations are estimated with the
per-layer formula of Korthikanti et al. 2022 (no recomputation): B*T*H*34 + 5*B*heads*T^2 bytes at 2-byte
precision, doubled for fp32. These are estimates: allocator overhead, communication buckets and the CUDA context
(about 0.5-1 GiB) come on top.
"""

from __future__ import annotations

import json

from launch.config import RunConfig


def zero_memory_bytes(params: int, stage: int, world: int, precision: str) -> dict[str, float]:
    # fp32 under ZeRO >= 1 still keeps a separate fp32 master partition beside the module's weights (measured by
    # bench/zero_memory.py: 12 bytes/param of optimizer state, not 8); only stage 0 fp32 steps the weights in place.
    w, g, k = (2, 2, 12) if precision == "bf16" else (4, 4, 12 if stage >= 1 else 8)
    n = max(1, world)
    weights = w * params / (n if stage >= 3 else 1)
    grads = g * params / (n if stage >= 2 else 1)
    optim = k * params / (n if stage >= 1 else 1)
    return {"weights": weights, "grads": grads, "optimizer": optim, "total": weights + grads + optim}


def activation_bytes(micro: int, seq: int, hidden: int, heads: int, layers: int, precision: str) -> float:
    per_layer = micro * seq * hidden * 34 + 5 * micro * heads * seq * seq
    return per_layer * layers * (1 if precision == "bf16" else 2)


def gib(x: float) -> str:
    return f"{x / 2**30:.2f} GiB"


def describe(cfg: RunConfig, world: int, ds_config: dict, vocab_size: int, precision: str,
             labelled_fraction: float) -> str:
    from model.config import EncoderConfig

    enc = EncoderConfig(vocab_size=vocab_size, **cfg.model)
    t, seq = cfg.train, cfg.data.seq_len
    params = enc.num_params(include_head=True)
    rows = t.micro_batch_size * t.grad_accum * world
    lines = [
        "== resolved training config",
        json.dumps(cfg.to_dict(), indent=1, default=str),
        "== DeepSpeed config (as passed to deepspeed.initialize)",
        json.dumps(ds_config, indent=1),
        "== batch",
        f"micro_batch_size {t.micro_batch_size} x grad_accum {t.grad_accum} x world size {world} = global batch "
        f"{rows} rows; x seq_len {seq} = {rows * seq:,} tokens per optimizer step; "
        f"{rows * seq * t.max_steps:,} tokens in {t.max_steps} steps",
        "== model",
        f"{params:,} parameters ({enc.num_params(include_embeddings=False):,} without the embedding); "
        f"{enc.num_layers} layers, hidden {enc.hidden_size}, heads {enc.num_heads}, GeGLU {enc.intermediate_size}, "
        f"vocab {vocab_size}; {enc.describe_layers()}",
        f"training FLOPs per token: {enc.flops_per_token(seq, labelled_fraction) / 1e6:.1f} MFLOP "
        f"(head on {labelled_fraction:.0%} of positions: the expected labelled share of the objective mix)",
        f"== estimated memory per rank ({precision}, world {world}; model states + activations of one micro-batch)",
    ]
    act = activation_bytes(t.micro_batch_size, seq, enc.hidden_size, enc.num_heads, enc.num_layers, precision)
    chosen = ds_config.get("zero_optimization", {}).get("stage", 0)
    for stage in range(4):
        m = zero_memory_bytes(params, stage, world, precision)
        mark = "  <- this run" if stage == chosen else ""
        lines.append(f"ZeRO-{stage}: weights {gib(m['weights'])} + grads {gib(m['grads'])} + optimizer "
                     f"{gib(m['optimizer'])} + activations {gib(act)} = {gib(m['total'] + act)}{mark}")
    return "\n".join(lines)


def expected_labelled_fraction(cfg: RunConfig) -> float:
    """Share of positions with a label, averaged over the mix (MLM/span: their rate; causal/prefix: ~all / half)."""
    share = {"causal": 1.0, "prefix": 0.5}
    total = sum(cfg.objectives.mix.values())
    frac = 0.0
    for name, w in cfg.objectives.mix.items():
        rate = (cfg.objectives.params.get(name) or {}).get("rate", 0.15)
        frac += w / total * share.get(name, rate)
    return frac
