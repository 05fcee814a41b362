"""Encoder hyper-parameters: one dataclass shared by the model, the FLOP counter and the HF export."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass
class EncoderConfig:
    """Shape of a ModernBERT-layout encoder (pre-norm, RoPE, GeGLU, no biases, global attention everywhere)."""

    vocab_size: int
    """Rows of the token embedding (tied to the MLM decoder); must match the tokenizer's vocabulary."""
    hidden_size: int = 768
    """Width of the residual stream."""
    num_layers: int = 12
    """Number of transformer blocks."""
    num_heads: int = 12
    """Attention heads per block; hidden_size / num_heads is the head width and must be even for RoPE."""
    intermediate_size: int = 1152
    """GeGLU inner width; the MLP input projection outputs 2x this (value and gate halves)."""
    max_position_embeddings: int = 8192
    """Longest row the model accepts (RoPE has no table, but the HF config records it and rows are checked)."""
    rope_theta: float = 160000.0
    """RoPE base; the same in every layer since cloze uses global attention throughout."""
    norm_eps: float = 1e-5
    """Epsilon of every LayerNorm."""
    init_std: float = 0.02
    """Base standard deviation of the truncated-normal weight init (see EncoderForPretraining.init_weights)."""
    pad_token_id: int = 0
    """[PAD] id (embedding padding_idx, recorded in the HF config)."""
    cls_token_id: int = 2
    """[CLS] id (recorded in the HF config as cls/bos)."""
    sep_token_id: int = 3
    """[SEP] id (recorded in the HF config as sep/eos)."""
    mask_token_id: int = 4
    """[MASK] id (recorded in the HF config so fill-mask pipelines can find it)."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"EncoderConfig.{name}={value!r} must be a positive integer")
        for name in ("rope_theta", "norm_eps", "init_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"EncoderConfig.{name}={value!r} must be a positive number")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"EncoderConfig.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                "pick a head count that divides the width"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"EncoderConfig head width hidden_size/num_heads={self.head_dim} is odd; RoPE rotates pairs of "
                "dimensions, so choose sizes that give an even head width"
            )
        for name in ("pad_token_id", "cls_token_id", "sep_token_id", "mask_token_id"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ValueError(
                    f"EncoderConfig.{name}={value!r} must be an id in [0, vocab_size={self.vocab_size})"
                )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def num_params(self, include_embeddings: bool = True, include_head: bool = False) -> int:
        """Trainable parameter count, computed from the shapes (no model is built).

        include_embeddings=False leaves out the token-embedding matrix (vocab_size x hidden_size) only.
        include_head=True adds the MLM head (dense, norm, decoder bias; its decoder weight is the tied embedding,
        so it is never counted twice): this equals sum(p.numel()) over EncoderForPretraining.parameters(),
        while include_head=False equals the same sum over Encoder (the exported model).
        """
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        per_layer = 4 * h * h + 3 * h * i + 2 * h  # Wqkv + attn Wo, Wi + mlp Wo, two norms
        total = self.num_layers * per_layer - h  # the first block's attention norm is Identity
        total += h + h  # embedding norm, final norm
        if include_embeddings:
            total += v * h
        if include_head:
            total += h * h + h + v  # dense, norm, decoder bias
        return total

    def flops_per_token(self, seq_len: int, labelled_fraction: float) -> float:
        """Training FLOPs (forward + backward) per input token, for MFU.

        6 * (matmul weights of the encoder) + 12 * num_layers * seq_len * hidden_size for the two attention
        matmuls (QK^T and PV, 2 FLOPs per multiply-add, x3 for backward). The attention term counts the full
        seq_len x seq_len square because SDPA with a dense mask computes all of it, whatever the mask hides.
        The head (dense + tied decoder) only runs on labelled positions, so it is weighted by labelled_fraction.
        Embedding lookups, norms and elementwise ops are not matmuls and are left out, as is usual for MFU.
        """
        if seq_len <= 0:
            raise ValueError(f"flops_per_token: seq_len={seq_len} must be positive")
        if not 0.0 <= labelled_fraction <= 1.0:
            raise ValueError(f"flops_per_token: labelled_fraction={labelled_fraction} must lie in [0, 1]")
        # One token meets seq_len keys (the full square) and carries labelled_fraction of a label.
        return self.useful_flops(tokens=1, visible_pairs=seq_len, num_labels=labelled_fraction)

    def useful_flops(self, tokens: float, visible_pairs: float, num_labels: float) -> float:
        """Training FLOPs (forward + backward) of one micro-batch that do useful work, for MFU on useful FLOPs.

        tokens x 6 x (encoder matmul weights), plus 12 x num_layers x hidden_size per (query, key) pair that the
        attention pattern lets meet (QK^T and PV: 2 x 2 FLOPs per multiply-add per pair and layer, x3 for
        backward) -- pairs across packed documents or hidden by the causal pattern are not useful work, whether or
        not a kernel computes them -- plus the head (dense + tied decoder) on the num_labels labelled positions.
        """
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        dense = 6.0 * self.num_layers * (4 * h * h + 3 * h * i) * tokens
        attention = 12.0 * self.num_layers * h * visible_pairs
        head = 6.0 * (h * h + h * v) * num_labels
        return dense + attention + head

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncoderConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"EncoderConfig: unknown keys {unknown}; valid keys are {sorted(known)}")
        return cls(**data)
