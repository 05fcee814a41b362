"""Encoder hyper-parameters: one dataclass shared by the model, the FLOP counter and the HF export."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

LEGACY_ROPE_THETA = "rope_theta"
"""What global_rope_theta was called before cloze had local layers; EncoderConfig.from_dict still reads it."""


def window_pairs(length: int, window: int) -> int:
    """(query, key) pairs of a length-`length` bidirectional document with |q - k| <= window // 2: what one local
    layer lets meet in it (the whole length^2 square once the half window reaches length - 1)."""
    if length <= 0:
        return 0
    reach = min(window // 2, length - 1)
    # The diagonal, plus 2 x (length - d) pairs at each distance d = 1..reach.
    return length + 2 * (reach * length - reach * (reach + 1) // 2)


@dataclass
class EncoderConfig:
    """Shape of a ModernBERT-layout encoder (pre-norm, RoPE, GeGLU, no biases; global attention in every n-th layer
    and sliding-window attention in the others, as ModernBERT does)."""

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
    global_attn_every_n_layers: int = 1
    """Layer i attends globally when i % n == 0 and through a sliding window (local_attention) otherwise, so layer 0
    is always global. 1 (the default) makes every layer global; ModernBERT uses 3."""
    local_attention: int = 128
    """Total sliding-window size of the local layers, ModernBERT's meaning: a query at position q sees the keys at
    positions k with |q - k| <= local_attention // 2 (128: 64 on each side, 129 keys with itself). Must be even and
    >= 2 when some layer is local. A window reaching past the row (local_attention // 2 >= T - 1) sees the whole
    row, like a global layer (it still rotates by local_rope_theta). Unused when every layer is global."""
    global_rope_theta: float = 160000.0
    """RoPE base of the global layers (ModernBERT: 160000). Older cloze configs called it rope_theta."""
    local_rope_theta: float = 10000.0
    """RoPE base of the local (sliding-window) layers (ModernBERT: 10000). Unused when every layer is global."""
    norm_eps: float = 1e-5
    """Epsilon of every LayerNorm."""
    init_std: float = 0.02
    """Base standard deviation of the truncated-normal weight init (see Encoder.init_weights)."""
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
                     "max_position_embeddings", "global_attn_every_n_layers", "local_attention"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"EncoderConfig.{name}={value!r} must be a positive integer")
        for name in ("global_rope_theta", "local_rope_theta", "norm_eps", "init_std"):
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
        if self.num_local_layers and (self.local_attention < 2 or self.local_attention % 2):
            raise ValueError(
                f"EncoderConfig.local_attention={self.local_attention} must be an even window >= 2 (a query sees "
                "local_attention // 2 keys on each side) since some layers are local "
                f"(global_attn_every_n_layers={self.global_attn_every_n_layers})"
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

    def is_global_layer(self, index: int) -> bool:
        """Whether layer `index` attends globally (else through the sliding window): index % n == 0."""
        return index % self.global_attn_every_n_layers == 0

    @property
    def num_local_layers(self) -> int:
        """How many layers use the sliding window (0 when global_attn_every_n_layers is 1)."""
        return self.num_layers - ((self.num_layers - 1) // self.global_attn_every_n_layers + 1)

    @property
    def layer_types(self) -> list[str]:
        """Per layer, "full_attention" or "sliding_attention": transformers' ModernBertConfig.layer_types."""
        return ["full_attention" if self.is_global_layer(i) else "sliding_attention" for i in range(self.num_layers)]

    def describe_layers(self) -> str:
        """The attention pattern in words, e.g. "global every 3 layers (4 global, 8 local), window 128"."""
        if not self.num_local_layers:
            return "global attention in every layer"
        n_local = self.num_local_layers
        return (f"global every {self.global_attn_every_n_layers} layers ({self.num_layers - n_local} global, "
                f"{n_local} local), window {self.local_attention} (+-{self.local_attention // 2} tokens)")

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
        """Training FLOPs (forward + backward) per input token of one-document bidirectional rows, for MFU.

        6 * (matmul weights of the encoder) + 12 * hidden_size per (query, key) pair and layer for the two attention
        matmuls (QK^T and PV, 2 FLOPs per multiply-add, x3 for backward). A global layer counts the full
        seq_len x seq_len square (seq_len keys per token); a local layer only the pairs within its window
        (window_pairs), the band a kernel that skips out-of-window tiles computes. useful_flops gives the same
        count for packed or causal rows. The head (dense + tied decoder) only runs on labelled positions, so it is
        weighted by labelled_fraction. Embedding lookups, norms and elementwise ops are not matmuls and are left
        out, as is usual for MFU.
        """
        if seq_len <= 0:
            raise ValueError(f"flops_per_token: seq_len={seq_len} must be positive")
        if not 0.0 <= labelled_fraction <= 1.0:
            raise ValueError(f"flops_per_token: labelled_fraction={labelled_fraction} must lie in [0, 1]")
        # One token meets seq_len keys on a global layer, the row's windowed pairs / seq_len on a local layer, and
        # carries labelled_fraction of a label.
        local = window_pairs(seq_len, self.local_attention) / seq_len
        return self.useful_flops(tokens=1, visible_pairs=seq_len, num_labels=labelled_fraction,
                                 local_visible_pairs=local)

    def useful_flops(self, tokens: float, visible_pairs: float, num_labels: float,
                     local_visible_pairs: float | None = None) -> float:
        """Training FLOPs (forward + backward) of one micro-batch that do useful work, for MFU on useful FLOPs.

        tokens x 6 x (encoder matmul weights), plus 12 x hidden_size per (query, key) pair and layer that the
        attention pattern lets meet (QK^T and PV: 2 x 2 FLOPs per multiply-add, x3 for backward) -- pairs across
        packed documents, hidden by the causal pattern or outside a local layer's window are not useful work,
        whether or not a kernel computes them -- plus the head (dense + tied decoder) on the num_labels labelled
        positions. visible_pairs counts one global layer's pairs, local_visible_pairs one local layer's (both from
        model.attention.visible_pairs, the latter with window=local_attention); the latter is required when some
        layer is local.
        """
        n_local = self.num_local_layers
        if n_local and local_visible_pairs is None:
            raise ValueError(f"useful_flops: {n_local} of {self.num_layers} layers are local; pass "
                             "local_visible_pairs (visible_pairs(..., window=local_attention))")
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        dense = 6.0 * self.num_layers * (4 * h * h + 3 * h * i) * tokens
        pairs = (self.num_layers - n_local) * visible_pairs + (n_local * local_visible_pairs if n_local else 0.0)
        attention = 12.0 * h * pairs
        head = 6.0 * (h * h + h * v) * num_labels
        return dense + attention + head

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncoderConfig:
        """The inverse of to_dict. Reads what older cloze checkpoints wrote too: their rope_theta is
        global_rope_theta (they had no local layers, so it applied to every layer, as it does here)."""
        known = {f.name for f in fields(cls)}
        if LEGACY_ROPE_THETA in data:
            if "global_rope_theta" in data:
                raise ValueError(f"EncoderConfig: both {LEGACY_ROPE_THETA!r} (the former name) and "
                                 "'global_rope_theta' are set; keep global_rope_theta only")
            data = {("global_rope_theta" if k == LEGACY_ROPE_THETA else k): v for k, v in data.items()}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"EncoderConfig: unknown keys {unknown}; valid keys are {sorted(known)}")
        return cls(**data)
