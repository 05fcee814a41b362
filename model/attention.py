"""Self-attention: the mask (bidirectional / causal / prefix, never across packed documents, within a sliding
window on local layers), RoPE, the block, and the choice of kernel (SDPA or FlexAttention).

One rule, two encodings. `visible` is the only statement of who may attend to whom; `build_attention_mask` turns
it into a dense boolean mask for SDPA and `build_block_mask` hands the same function to FlexAttention as its
mask_mod. Every kernel call is in `SelfAttention._attend`.

Local layers (EncoderConfig.global_attn_every_n_layers > 1) add one condition, ModernBERT's sliding window:
|q - k| <= local_attention // 2, on top of the pattern and the document mask. Encoder.forward builds one mask for
the global layers and one for the local layers (`GlobalLocal`), each once per forward.

Backends (the `attn_backend` runtime option of Encoder; not part of EncoderConfig, so never in a checkpoint):
- "sdpa": F.scaled_dot_product_attention. No mask for plain bidirectional rows, is_causal for plain causal rows
  (both keep the flash kernel usable on GPU); a dense [B, 1, T, T] boolean mask otherwise (a window without
  documents or prefixes is the same for every row: [1, 1, T, T]), which on GPU rules out flash and leaves the
  efficient or math kernel.
- "flex": torch.nn.attention.flex_attention with a BlockMask built once per forward and shared by all layers.
  CUDA runs a module-level torch.compile(flex_attention), created lazily on first use (the eager version
  materialises the whole score matrix). CPU runs the eager version, forward only: torch 2.13 raises
  NotImplementedError for any CPU backward through flex_attention, so "flex" on CPU with gradients enabled is a
  ValueError here. Inside a compiled layer (encoder.compile_layers) flex is compiled with the layer: inductor emits
  a Triton kernel on CUDA. On CPU, inductor's C++ flex kernel is refused (Encoder.forward): on an AVX2 machine it
  returned NaN when compiled alone (torch 2.13; errors of 0.3-1.8 in 2.11) and, inside compiled layers, outputs off
  by 0.7-4.4 for every masked kind, while the eager CPU flex matched SDPA to 2e-6. Layers compiled with another
  backend (aot_eager, what the CPU tests use) run flex's own math.
- "auto": "flex" on CUDA when the batch needs a mask (doc_ids given, prefix attention, or local layers) and flex
  is available
  (torch has flex_attention and triton is installed); "sdpa" otherwise, silently. So "auto" is always "sdpa" on
  CPU, and the unmasked all-global cases stay on SDPA's flash path on GPU.

FLOPs. A dense SDPA mask computes the full T x T score square per head whatever it hides (is_causal lets the
flash kernel skip the upper half). FlexAttention works in BLOCK_SIZE x BLOCK_SIZE tiles (128 by default), skips
every tile whose pairs are all masked, and runs the mask_mod only on partially masked tiles. With packed documents
of lengths L_1..L_n in a row of T tokens, the tiles computed are those that meet a same-document pair: about
sum(L_i^2) / T^2 of the square for bidirectional rows (plus the tiles straddling document boundaries) and about
half of that for causal rows; four 128-token documents starting at tile boundaries of a 512 row compute 4 of 16
tiles. A local layer's window is a band of width local_attention + 1 around the diagonal, so flex computes about
(local_attention / BLOCK_SIZE + 2) tiles per tile row instead of T / BLOCK_SIZE. MFU counts the useful pairs only
(`visible_pairs`, EncoderConfig.useful_flops): what a kernel computes beyond them (dense SDPA's whole square, flex's
partial tiles) is not useful work.
"""

from __future__ import annotations

import importlib.util
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import EncoderConfig

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # a torch without FlexAttention: "flex" is refused, "auto" means "sdpa"
    BlockMask = create_block_mask = flex_attention = None

ATTENTION_KINDS = ("bidirectional", "causal", "prefix")
ATTENTION_BACKENDS = ("auto", "sdpa", "flex")
FLEX_BLOCK_SIZE = 128
"""Tile edge of the BlockMask; FlexAttention's default and the granularity at which it skips masked work."""


class AttentionMask(NamedTuple):
    """What SDPA needs: a boolean mask (True = may attend) broadcastable to [B, heads, T, T], or None with
    is_causal telling SDPA to apply its own causal pattern (which keeps the flash kernel usable on GPU)."""

    mask: torch.Tensor | None
    is_causal: bool


class FlexMask(NamedTuple):
    """What flex_attention needs: a BlockMask over [B, 1, T, T] whose mask_mod is `visible`."""

    block_mask: Any  # torch.nn.attention.flex_attention.BlockMask (Any so this module imports without flex)


class GlobalLocal(NamedTuple):
    """One value for the global layers and one for the local (sliding-window) layers of a forward: the masks, or
    the RoPE (cos, sin). `local` is None when every layer is global. Each EncoderLayer takes its own with
    `pick`, so the encoder passes the same two arguments to every layer."""

    global_: Any
    local: Any

    def pick(self, local: bool) -> Any:
        return self.local if local else self.global_


def visible(
    b: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    last_shared: torch.Tensor,
    doc_ids: torch.Tensor | None,
    window: int | None = None,
) -> torch.Tensor:
    """True where query position q of row b may attend to key position k: the one masking rule.

    k <= max(q, last_shared[b]): row b is bidirectional over positions 0..last_shared[b] and causal after them.
    That one inequality covers every kind (see `_last_shared`): bidirectional is last_shared = T - 1, causal is
    last_shared = -1 (k <= q), prefix(n) is last_shared = n - 1, so a prefix query sees the whole prefix and
    nothing else, and a suffix query sees everything up to itself. With doc_ids [B, T], the pair must also lie in
    the same document. With a window (a local layer's local_attention), the pair must also lie within
    window // 2 positions: |q - k| <= window // 2, ModernBERT's and transformers' rule. Every query sees itself, so
    no row is empty (an empty row would make SDPA return NaN).

    Written with tensor ops only, so it works on broadcast index grids (the dense mask) and on the 0-d index
    tensors FlexAttention vmaps a mask_mod over.
    """
    allowed = k <= torch.maximum(q, last_shared[b])
    if doc_ids is not None:
        allowed = allowed & (doc_ids[b, q] == doc_ids[b, k])
    if window is not None:
        allowed = allowed & ((q - k).abs() <= window // 2)
    return allowed


def _check_mask_args(
    attention: str,
    batch: int,
    seq_len: int,
    doc_ids: torch.Tensor | None,
    prefix_len: torch.Tensor | None,
    window: int | None = None,
) -> None:
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 2 or window % 2):
        raise ValueError(f"window={window!r} must be an even integer >= 2 (a local layer's local_attention)")
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


def _last_shared(
    attention: str, batch: int, seq_len: int, device: torch.device, prefix_len: torch.Tensor | None
) -> torch.Tensor:
    """[B] int64: the last position of each row's bidirectional head, the parameter of `visible`."""
    if attention == "prefix":
        return prefix_len.to(device=device, dtype=torch.long) - 1
    last = seq_len - 1 if attention == "bidirectional" else -1
    return torch.full((batch,), last, dtype=torch.long, device=device)


def build_attention_mask(
    attention: str,
    batch: int,
    seq_len: int,
    device: torch.device,
    doc_ids: torch.Tensor | None = None,
    prefix_len: torch.Tensor | None = None,
    window: int | None = None,
) -> AttentionMask:
    """The SDPA form of `visible` for one micro-batch, built once and shared by every layer.

    bidirectional: every token sees every token of its document.
    causal: token i sees tokens j <= i of its document.
    prefix: row b is bidirectional over its first prefix_len[b] tokens and causal after them; a prefix token never
    sees a suffix token.
    doc_ids [B, T]: when given, the pattern is further restricted to pairs in the same document.
    window: a local layer's local_attention; the pattern is further restricted to |q - k| <= window // 2.
    Plain bidirectional and plain causal rows need no tensor (SDPA's no-mask and is_causal paths); everything else
    is a dense [B, 1, T, T] boolean mask, [1, 1, T, T] when it is the same for every row (a window alone).
    """
    _check_mask_args(attention, batch, seq_len, doc_ids, prefix_len, window)
    if doc_ids is None and window is None and attention == "bidirectional":
        return AttentionMask(None, False)
    if doc_ids is None and window is None and attention == "causal":
        return AttentionMask(None, True)
    if doc_ids is None and attention != "prefix":
        batch = 1  # every row has the same mask: let SDPA broadcast one
    pos = torch.arange(seq_len, device=device)
    rows = torch.arange(batch, device=device)[:, None, None]
    last_shared = _last_shared(attention, batch, seq_len, device, prefix_len)
    mask = visible(rows, pos[None, :, None], pos[None, None, :], last_shared, doc_ids, window)  # [B, T, T]
    return AttentionMask(mask[:, None], False)  # add the head axis


def build_block_mask(
    attention: str,
    batch: int,
    seq_len: int,
    device: torch.device,
    doc_ids: torch.Tensor | None = None,
    prefix_len: torch.Tensor | None = None,
    block_size: int = FLEX_BLOCK_SIZE,
    window: int | None = None,
) -> FlexMask:
    """The FlexAttention form of `visible`: same arguments and rules as build_attention_mask. create_block_mask
    evaluates the mask_mod per tile, so tiles outside a window (or across documents) are skipped, never computed.

    Rows without doc_ids get an all-zero doc_ids, so every kind and every batch uses the same mask_mod code with
    tensors of the same shapes: a compiled layer traces one graph for all attention kinds instead of one per kind
    (the cost is one [B, T] compare on partially masked tiles).
    """
    if create_block_mask is None:
        raise ValueError(f"attn_backend='flex' needs torch.nn.attention.flex_attention, absent in torch "
                         f"{torch.__version__}; use attn_backend='sdpa' or 'auto'")
    _check_mask_args(attention, batch, seq_len, doc_ids, prefix_len, window)
    last_shared = _last_shared(attention, batch, seq_len, device, prefix_len)
    docs = torch.zeros(batch, seq_len, dtype=torch.long, device=device) if doc_ids is None else doc_ids.to(device)

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return visible(b, q, k, last_shared, docs, window)

    _flex_kernel(device.type)  # create the compiled CUDA kernel here, outside any compiled layer's trace
    block_mask = create_block_mask(mask_mod, B=batch, H=None, Q_LEN=seq_len, KV_LEN=seq_len, device=device,
                                   BLOCK_SIZE=block_size)
    return FlexMask(block_mask)


def flex_available(device: torch.device) -> bool:
    """Whether attn_backend='flex' can run on this device: torch has flex_attention, and on CUDA triton is
    installed (the compiled kernel is Triton). CPU needs nothing more (forward only, see the module docstring)."""
    if flex_attention is None:
        return False
    if device.type == "cuda":
        return importlib.util.find_spec("triton") is not None
    return device.type == "cpu"


def check_attention_backend(name: str) -> str:
    """`name` if it is a backend this torch can offer somewhere, else a ValueError naming the choices."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attn_backend={name!r} is not one of {ATTENTION_BACKENDS}")
    if name == "flex" and flex_attention is None:
        raise ValueError(f"attn_backend='flex' needs torch.nn.attention.flex_attention, absent in torch "
                         f"{torch.__version__}; use attn_backend='sdpa' or 'auto'")
    return name


def resolve_attention_backend(name: str, device: torch.device, needs_mask: bool, needs_grad: bool) -> str:
    """The kernel ("sdpa" or "flex") that backend `name` uses for one forward.

    needs_mask: the batch has doc_ids, prefix attention or local layers (SDPA would need a dense mask).
    needs_grad: autograd will run backward through attention (flex has no CPU backward in torch 2.13).
    """
    check_attention_backend(name)
    if name == "sdpa":
        return "sdpa"
    if name == "auto":
        return "flex" if device.type == "cuda" and needs_mask and flex_available(device) else "sdpa"
    if not flex_available(device):
        raise ValueError(f"attn_backend='flex' is unavailable on device {device} (CUDA needs triton); "
                         "use attn_backend='auto' to fall back to sdpa")
    if device.type == "cpu" and needs_grad:
        raise ValueError("attn_backend='flex' cannot train on CPU: torch has no CPU backward for flex_attention; "
                         "use attn_backend='auto' or 'sdpa', or run under torch.no_grad()")
    return "flex"


_COMPILED_FLEX = None
"""torch.compile(flex_attention), made on the first CUDA use: compiling at import would tax every CPU process."""


def _flex_kernel(device_type: str):
    global _COMPILED_FLEX
    if device_type != "cuda":
        return flex_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(flex_attention)
    return _COMPILED_FLEX


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
    """Fused QKV projection, RoPE, attention kernel, output projection; no biases (names match
    ModernBertAttention)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.Wqkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=False)
        self.Wo = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: AttentionMask | FlexMask
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
    def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask | FlexMask) -> torch.Tensor:
        # Default scale 1/sqrt(head_dim) in both kernels, no dropout: ModernBERT pretrains with attention dropout 0.
        if isinstance(mask, FlexMask):
            return _flex_kernel(q.device.type)(q, k, v, block_mask=mask.block_mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.mask, is_causal=mask.is_causal)


def visible_pairs(
    attention: str, doc_ids: torch.Tensor, prefix_len: torch.Tensor | None = None, window: int | None = None
) -> int:
    """How many (query, key) pairs of a [B, T] micro-batch the pattern lets meet in one layer: the attention work
    that is useful, for MFU (EncoderConfig.useful_flops). window=None counts a global layer, window=local_attention
    a local one (pairs within window // 2 positions only).

    Closed forms over the documents for bidirectional and causal rows: without a window sum(L^2) and
    sum(L(L+1)/2) over document lengths L; with one, over the runs of each row's documents, L + 2S and L + S with
    S = sum_{d=1..r} (L - d), r = min(window // 2, L - 1). The dense mask (B x T x T booleans on the host) for
    prefix rows (rare) and for windowed rows whose documents are not contiguous runs."""
    batch, seq_len = doc_ids.shape
    if attention not in ATTENTION_KINDS:
        raise ValueError(f"attention={attention!r} is not one of {ATTENTION_KINDS}")
    contiguous = bool((doc_ids[:, 1:] >= doc_ids[:, :-1]).all())  # non-decreasing: each document is one run
    if attention == "prefix" or (window is not None and not contiguous):
        spec = build_attention_mask(attention, batch, seq_len, doc_ids.device, doc_ids, prefix_len, window)
        return int(spec.mask.expand(batch, 1, seq_len, seq_len).sum())
    if window is None:
        offsets = torch.arange(batch, device=doc_ids.device)[:, None] * (int(doc_ids.max()) + 1)
        lengths = torch.bincount((doc_ids + offsets).flatten()).to(torch.int64)
        if attention == "bidirectional":
            return int((lengths * lengths).sum())
        return int((lengths * (lengths + 1) // 2).sum())
    _check_mask_args(attention, batch, seq_len, doc_ids, prefix_len, window)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    lengths = torch.bincount(starts.flatten().cumsum(0) - 1).to(torch.int64)  # runs, row by row
    reach = torch.clamp(lengths - 1, max=window // 2)
    one_side = reach * lengths - reach * (reach + 1) // 2
    return int((lengths + (2 if attention == "bidirectional" else 1) * one_side).sum())
