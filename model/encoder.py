"""The encoder stack in ModernBERT's exact layout, so its state dict maps 1:1 onto transformers.ModernBertModel.

Module and parameter names (embeddings.tok_embeddings, layers.N.attn.Wqkv, layers.N.mlp.Wi, final_norm, ...) are
ModernBERT's own; model/hf.py relies on that and checks every key against an explicit list.

The attention kernel is a runtime choice (`attn_backend`, see model/attention.py), not a shape: it is not in
EncoderConfig and never reaches a checkpoint or an export. `compile_layers` compiles each block in place for
training with torch.compile. `set_activation_checkpointing` recomputes chosen blocks in the backward pass instead of
keeping their activations.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import (
    AttentionMask,
    FlexMask,
    GlobalLocal,
    SelfAttention,
    build_attention_mask,
    build_block_mask,
    check_attention_backend,
    resolve_attention_backend,
    rotary_cos_sin,
)
from .config import EncoderConfig


def layer_norm(cfg: EncoderConfig) -> nn.LayerNorm:
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, bias=False)


def out_std(cfg: EncoderConfig) -> float:
    """The init std of the layers that write into the residual stream: init_std / sqrt(2 * num_layers)."""
    return cfg.init_std / (2.0 * cfg.num_layers) ** 0.5


def trunc_normal_(weight: torch.Tensor, std: float) -> None:
    """Truncated normal at +-2 std (ModernBERT's cutoff factor 2). Note: `std` is the parameter of the
    untruncated normal; the truncation shrinks the realised std by a factor of about 0.880."""
    nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-2.0 * std, b=2.0 * std)


class Embeddings(nn.Module):
    """Token embedding followed by a bias-free LayerNorm; no position table (RoPE gives positions)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.norm = layer_norm(cfg)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.norm(self.tok_embeddings(input_ids))


class GeGLU(nn.Module):
    """Wi projects to 2 x intermediate; the first half goes through exact (erf) GELU and gates the second."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.Wi = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.Wo = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.Wi(x).chunk(2, dim=-1)
        return self.Wo(F.gelu(value) * gate)


class EncoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)). Layer 0 skips the attention norm because the
    embedding output is already normalised (ModernBERT does the same, and the HF mapping depends on it).

    `local` (from EncoderConfig.is_global_layer) picks the sliding-window mask and the local RoPE out of the
    GlobalLocal pairs every layer receives; it is a constant of the layer, so a compiled layer specialises on it."""

    def __init__(self, cfg: EncoderConfig, index: int) -> None:
        super().__init__()
        self.local = not cfg.is_global_layer(index)
        self.attn_norm = nn.Identity() if index == 0 else layer_norm(cfg)
        self.attn = SelfAttention(cfg)
        self.mlp_norm = layer_norm(cfg)
        self.mlp = GeGLU(cfg)

    def forward(self, x: torch.Tensor, rope: GlobalLocal, mask: GlobalLocal) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope.pick(self.local), mask.pick(self.local))
        return x + self.mlp(self.mlp_norm(x))


def checkpoint_layer(
    layer: nn.Module, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: AttentionMask | FlexMask
) -> torch.Tensor:
    """Run one block keeping only its inputs for backward; the backward pass runs the block again to rebuild the rest.

    Non-reentrant checkpointing: it works with DeepSpeed ZeRO-3 (whose hooks gather the block's parameters again
    around the recomputation) and with inputs that need no grad. rope and mask are built once per forward and held
    by reference (never rebuilt), so the recomputation sees the same ones; a dense mask thus stays alive until
    backward (launch/train/dry_run.py counts it). The block has no dropout or other randomness, so the recomputed
    activations equal the first ones exactly. A compiled block (compile_layers) is compiled inside: the
    checkpoint wraps the compiled call, never the reverse.
    """
    return checkpoint(layer, x, rope, mask, use_reentrant=False)


class Encoder(nn.Module):
    """Embeddings, num_layers pre-norm blocks (global attention every global_attn_every_n_layers layers, a sliding
    window of local_attention in the others), final LayerNorm.

    attn_backend: "sdpa" (default, the dense-mask path), "flex" or "auto"; see model/attention.py. Changeable at
    any time with set_attention_backend; it holds no parameters, so the state dict is the same for all three.

    Activation checkpointing (off by default) is a runtime choice too: set_activation_checkpointing(every) makes
    training forwards keep only the input of block i, for every i with i % every == 0, and recompute the block in
    the backward pass. It applies only when training with grad enabled; evaluation and inference never recompute.
    """

    def __init__(self, cfg: EncoderConfig, attn_backend: str = "sdpa") -> None:
        super().__init__()
        self.cfg = cfg
        self.attn_backend = check_attention_backend(attn_backend)
        self.embeddings = Embeddings(cfg)
        self.layers = nn.ModuleList(EncoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.final_norm = layer_norm(cfg)
        self.checkpoint_every = 0
        self.init_weights()

    def init_weights(self) -> None:
        """ModernBERT's scheme, every weight a normal truncated at +-2 std (std below is the parameter of the
        untruncated normal; the realised std is about 0.880 x that):

        - token embedding (= the MLM head's tied decoder weight), Wqkv, MLP Wi: init_std (0.02 by default)
        - attention Wo, MLP Wo (and the MLM head's dense, MLMHead.init_weights): out_std(cfg)
        - LayerNorm weights: 1 (the head's decoder bias: 0)

        Out-projections are scaled because each of the 2 * num_layers residual branches adds its output to the
        stream; shrinking them by sqrt(2 * num_layers) keeps the residual variance at init independent of depth
        (the GPT-2 / Megatron argument). The head dense uses the same scale as ModernBERT does.
        Variant from HF's from-scratch init: HF re-initialises the tied decoder last, at the out std, which
        silently rescales the embedding; cloze keeps the embedding's own init_std for the tied matrix.

        The constructor calls it (once: nothing else initialises the encoder's weights)."""
        cfg = self.cfg
        trunc_normal_(self.embeddings.tok_embeddings.weight, cfg.init_std)
        for layer in self.layers:
            trunc_normal_(layer.attn.Wqkv.weight, cfg.init_std)
            trunc_normal_(layer.attn.Wo.weight, out_std(cfg))
            trunc_normal_(layer.mlp.Wi.weight, cfg.init_std)
            trunc_normal_(layer.mlp.Wo.weight, out_std(cfg))
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)

    def set_attention_backend(self, name: str) -> None:
        """Switch the attention kernel ("auto", "sdpa", "flex"); ValueError for any other name."""
        self.attn_backend = check_attention_backend(name)

    def set_rope_theta(self, global_theta: float, local_theta: float) -> None:
        """The RoPE bases of the global and the local layers for the forwards that follow (context extension moves
        the global one, e.g. 10000 -> 160000). The rotary tables are built per forward from the config, so nothing
        else holds the old bases."""
        self.cfg = dataclasses.replace(self.cfg, global_rope_theta=global_theta, local_rope_theta=local_theta)

    def set_activation_checkpointing(self, every: int) -> None:
        """Checkpoint blocks i with i % every == 0 (1: every block) while training; 0 turns it off."""
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(f"activation checkpointing every={every!r} must be an integer >= 0 (0: off, 1: all)")
        self.checkpoint_every = every

    def checkpointed(self, index: int) -> bool:
        """Whether block `index` is recomputed in this forward (only a training forward that builds a graph)."""
        every = self.checkpoint_every
        return every > 0 and index % every == 0 and self.training and torch.is_grad_enabled()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention: str = "bidirectional",
        doc_ids: torch.Tensor | None = None,
        prefix_len: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids [B, T] -> hidden states [B, T, hidden] after the final norm.

        RoPE positions run 0..T-1 along the whole row and do not restart at each packed document. That is exact,
        not an approximation: with the document mask a query only meets keys of its own document, and the RoPE
        score between positions i and j depends only on i - j, so shifting a whole document by an offset leaves
        every score unchanged (up to float rounding of the angles). It also keeps the HF export simple: HF's
        default position_ids are 0..T-1 too. tests/test_model.py checks packed == separate. A local layer's window
        depends on i - j only, so it too is the same for a document wherever it sits in the row.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        batch, seq_len = input_ids.shape
        if seq_len > self.cfg.max_position_embeddings:
            raise ValueError(
                f"row length {seq_len} exceeds max_position_embeddings={self.cfg.max_position_embeddings}; "
                "shorten the rows or raise the config value"
            )
        device = input_ids.device
        needs_mask = doc_ids is not None or attention == "prefix" or self.cfg.num_local_layers > 0
        # Parameters are what make attention's inputs require grad; any() stops at the first trainable one.
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        backend = resolve_attention_backend(self.attn_backend, device, needs_mask, needs_grad)
        if backend == "flex" and device.type == "cpu" and getattr(self.layers[0], "compiled_with", None) == "inductor":
            raise ValueError("attn_backend='flex' in layers compiled by inductor cannot run on CPU: torch's compiled "
                             "CPU flex kernel returned wrong values on an AVX2 machine (model/attention.py); use "
                             "attn_backend='sdpa' or 'auto' on CPU, where flex brings no speed")
        mask, rope = self._layer_inputs(backend, attention, batch, seq_len, device, doc_ids, prefix_len)
        x = self.embeddings(input_ids)
        for i, layer in enumerate(self.layers):
            x = checkpoint_layer(layer, x, rope, mask) if self.checkpointed(i) else layer(x, rope, mask)
        return self.final_norm(x)

    def _layer_inputs(
        self,
        backend: str,
        attention: str,
        batch: int,
        seq_len: int,
        device: torch.device,
        doc_ids: torch.Tensor | None,
        prefix_len: torch.Tensor | None,
    ) -> tuple[GlobalLocal, GlobalLocal]:
        """The masks and RoPE tables of the global and the local layers, each built once per forward and shared
        by all layers of its kind (the local ones only when some layer is local)."""
        cfg = self.cfg
        build = build_block_mask if backend == "flex" else build_attention_mask
        global_mask = build(attention, batch, seq_len, device, doc_ids, prefix_len)
        global_rope = rotary_cos_sin(seq_len, cfg.head_dim, cfg.global_rope_theta, device)
        if not cfg.num_local_layers:
            return GlobalLocal(global_mask, None), GlobalLocal(global_rope, None)
        local_mask = build(attention, batch, seq_len, device, doc_ids, prefix_len, window=cfg.local_attention)
        local_rope = rotary_cos_sin(seq_len, cfg.head_dim, cfg.local_rope_theta, device)
        return GlobalLocal(global_mask, local_mask), GlobalLocal(global_rope, local_rope)


def compile_layers(model: nn.Module, fullgraph: bool = True, dynamic: bool | None = False,
                   backend: str = "inductor") -> int:
    """torch.compile every EncoderLayer of `model` in place; returns how many were compiled.

    Per-block compilation, as torchtitan does: each block is one graph (attention + MLP + norms fused by
    inductor), while embeddings, mask building and the head stay eager. nn.Module.compile keeps the module tree,
    so state-dict names do not change (torch.compile(module) would prefix them with _orig_mod.). Blocks share one
    graph except block 0 (its attention norm is Identity). Call it before handing the model to DeepSpeed.

    fullgraph=True makes any graph break inside a block an error instead of a silent slowdown. dynamic=False
    specialises on the (fixed) training shapes; every new (B, T) then costs one recompilation. `backend` is
    torch.compile's; each layer records it as `compiled_with` (Encoder.forward refuses inductor's CPU flex kernel).
    """
    layers = [m for m in model.modules() if isinstance(m, EncoderLayer)]
    if not layers:
        raise ValueError(f"compile_layers: {type(model).__name__} holds no EncoderLayer; pass the cloze model "
                         "(Encoder or EncoderForPretraining) before any wrapper")
    for layer in layers:
        layer.compile(fullgraph=fullgraph, dynamic=dynamic, backend=backend)
        layer.compiled_with = backend
    return len(layers)
