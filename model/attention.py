"""Self-attention: the mask (bidirectional / causal / prefix, never across packed documents), RoPE, the block.

Every masking decision lives in `build_attention_mask`, and every kernel call in `SelfAttention._attend`, so a
later change of kernel (FlexAttention block masks, FlashAttention varlen with cu_seqlens from doc_ids) touches
only these two places.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import EncoderConfig

ATTENTION_KINDS = ("bidirectional", "causal", "prefix")


class AttentionMask(NamedTuple):
    """What the kernel needs: a boolean mask (True = may attend) broadcastable to [B, heads, T, T], or None with
    is_causal telling SDPA to apply its own causal pattern (which keeps the flash kernel usable on GPU)."""

    mask: torch.Tensor | None
    is_causal: bool


def build_attention_mask(
    attention: str,
    batch: int,
    seq_len: int,
    device: torch.device,
    doc_ids: torch.Tensor | None = None,
    prefix_len: torch.Tensor | None = None,
) -> AttentionMask:
    """The attention pattern for one micro-batch, built once and shared by every layer.

    bidirectional: every token sees every token of its document.
    causal: token i sees tokens j <= i of its document.
    prefix: row b is bidirectional over its first prefix_len[b] tokens and causal after them; a prefix token never
    sees a suffix token. Key j is visible from query i iff j <= max(i, prefix_len - 1): for a prefix query that is
    the whole prefix, for a suffix query it is everything up to itself (which includes the whole prefix).
    doc_ids [B, T]: when given, the pattern is further restricted to pairs in the same document. Every query
    always sees itself, so no row of the mask is empty (an empty row would make SDPA return NaN).
    """
    if attention not in ATTENTION_KINDS:
        raise ValueError(f"attention={attention!r} is not one of {ATTENTION_KINDS}")
    if doc_ids is not None and tuple(doc_ids.shape) != (batch, seq_len):
        raise ValueError(f"doc_ids has shape {tuple(doc_ids.shape)}, expected [B, T] = [{batch}, {seq_len}]")
    if attention == "prefix":
        if prefix_len is None or tuple(prefix_len.shape) != (batch,):
            got = None if prefix_len is None else tuple(prefix_len.shape)
            raise ValueError(f"attention='prefix' needs prefix_len of shape [B] = [{batch}], got {got}")
    elif prefix_len is not None:
        raise ValueError(f"prefix_len is only meaningful with attention='prefix', not {attention!r}")

    if doc_ids is None and attention == "bidirectional":
        return AttentionMask(None, False)
    if doc_ids is None and attention == "causal":
        return AttentionMask(None, True)

    pos = torch.arange(seq_len, device=device)
    query, key = pos[:, None], pos[None, :]
    if attention == "bidirectional":
        mask = None
    elif attention == "causal":
        mask = (key <= query)[None]  # [1, T, T]
    else:
        last_visible = torch.maximum(query[None], prefix_len.to(device)[:, None, None] - 1)  # [B, T, 1]
        mask = key[None] <= last_visible  # [B, T, T]
    if doc_ids is not None:
        same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]  # [B, T, T]
        mask = same_doc if mask is None else mask & same_doc
    return AttentionMask(mask[:, None], False)  # add the head axis


def rotary_cos_sin(seq_len: int, head_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, ...]:
    """cos and sin of the RoPE angles, [T, head_dim/2] in float32, for positions 0..T-1.

    Pair (d, d + head_dim/2) of each head rotates by angle position * theta^(-2d/head_dim) (the "rotate half"
    convention ModernBERT uses). Computed per call rather than kept as a buffer so that casting the module to
    bf16 can never round the frequencies; it is a few thousand elements, negligible next to one matmul.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    angles = torch.arange(seq_len, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, heads, T, head_dim] by the angles; done in float32 (bf16 angles lose precision at long
    positions) and cast back to x's dtype."""
    first, second = x.float().chunk(2, dim=-1)
    rotated = torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
    return rotated.to(x.dtype)


class SelfAttention(nn.Module):
    """Fused QKV projection, RoPE, SDPA, output projection; no biases (names match ModernBertAttention)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.Wqkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=False)
        self.Wo = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: AttentionMask
    ) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        # Output features are laid out [q | k | v], each [heads, head_dim], as in ModernBERT's Wqkv.
        qkv = self.Wqkv(x).view(batch, seq_len, 3, self.num_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(dim=2))  # each [B, heads, T, head_dim]
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = self._attend(q, k, v, mask)
        return self.Wo(out.transpose(1, 2).reshape(batch, seq_len, -1))

    @staticmethod
    def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
        # Default scale 1/sqrt(head_dim), no dropout: ModernBERT pretrains with attention dropout 0.
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.mask, is_causal=mask.is_causal)
