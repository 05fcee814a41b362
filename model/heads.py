"""The MLM prediction head and the pretraining wrapper that runs it only on labelled positions."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import EncoderConfig
from .encoder import Encoder, layer_norm, out_std, trunc_normal_
from .head_loss import HEAD_LOSSES, IGNORE_INDEX, fused_linear_cross_entropy


class MLMHead(nn.Module):
    """ModernBertPredictionHead + decoder: dense (no bias) -> exact GELU -> LayerNorm (no bias) -> decoder.

    The decoder is an nn.Linear whose weight *is* the token-embedding Parameter (the same object), with its own
    bias, as in ModernBertForMaskedLM with tie_word_embeddings=True and decoder_bias=True. Keeping a real Linear
    module (rather than reading the embedding weight from elsewhere) lets ZeRO-3 gather the weight through the
    decoder's own forward hooks, the way it handles tied HF models.
    """

    def __init__(self, cfg: EncoderConfig, embedding: nn.Embedding) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)
        self.norm = layer_norm(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=True)
        self.decoder.weight = embedding.weight
        self.init_weights(cfg)

    def init_weights(self, cfg: EncoderConfig) -> None:
        """The head's share of Encoder.init_weights' scheme: dense at out_std, LayerNorm 1, decoder bias 0. The
        decoder weight is the embedding's, initialised by the encoder."""
        trunc_normal_(self.dense.weight, out_std(cfg))
        nn.init.ones_(self.norm.weight)
        nn.init.zeros_(self.decoder.bias)

    def transform(self, hidden: torch.Tensor) -> torch.Tensor:
        """Everything before the decoder: dense -> GELU -> LayerNorm."""
        return self.norm(F.gelu(self.dense(hidden)))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden))


@dataclass
class PretrainOutput:
    """Result of one pretraining forward."""

    loss: torch.Tensor
    """Scalar: mean cross entropy over labelled positions; an exact 0 still attached to every parameter's graph
    when the batch has no labels (so every rank runs the same backward)."""
    num_labels: torch.Tensor
    """int64 scalar: positions whose label != -100."""
    num_correct: torch.Tensor
    """int64 scalar: labelled positions whose argmax prediction equals the label (no gradient)."""


class EncoderForPretraining(nn.Module):
    """Encoder + MLM head. The head runs only on the gathered labelled positions: with 15% masking that skips
    85% of the hidden x vocab decoder matmul, the largest single matmul of a small model.

    attn_backend is passed to the Encoder (see model/attention.py); head_loss picks how the decoder's cross
    entropy runs: "plain" (decoder logits, then F.cross_entropy on their fp32 copy) or "fused"
    (model/head_loss.py: chunked, the logits never stored). Both are runtime options, not shapes: the weights
    and checkpoints are the same. The fused path reads the decoder's weight without calling the decoder module,
    so ZeRO-3, which gathers a weight only around its module's forward, must use "plain" (the trainer does so).
    """

    def __init__(self, cfg: EncoderConfig, attn_backend: str = "sdpa", head_loss: str = "plain") -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg, attn_backend=attn_backend)
        self.head = MLMHead(cfg, self.encoder.embeddings.tok_embeddings)
        self.set_head_loss(head_loss)

    @property
    def attn_backend(self) -> str:
        return self.encoder.attn_backend

    def set_attention_backend(self, name: str) -> None:
        """Switch the encoder's attention kernel ("auto", "sdpa", "flex"); ValueError for any other name."""
        self.encoder.set_attention_backend(name)

    def set_rope_theta(self, global_theta: float, local_theta: float) -> None:
        """The encoder's RoPE bases from the next forward on (Encoder.set_rope_theta)."""
        self.encoder.set_rope_theta(global_theta, local_theta)
        self.cfg = self.encoder.cfg

    def set_head_loss(self, name: str) -> None:
        """Switch the decoder's loss ("plain", "fused"); ValueError for any other name."""
        if name not in HEAD_LOSSES:
            raise ValueError(f"head_loss must be one of {', '.join(HEAD_LOSSES)}, got {name!r}")
        self.head_loss = name

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
        attention: str = "bidirectional",
        prefix_len: torch.Tensor | None = None,
        label_positions: torch.Tensor | None = None,
    ) -> PretrainOutput:
        """label_positions: optional int64 [N], the flat indices (into B*T) of the positions whose label is not
        IGNORE_INDEX, in increasing order. The caller knows them on the host before the batch reaches the device;
        without them the boolean gather below must ask the device how many there are, which makes the host wait
        for the whole encoder forward in the middle of the step."""
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels shape {tuple(labels.shape)} differs from input_ids {tuple(input_ids.shape)}")
        hidden = self.encoder(input_ids, attention=attention, doc_ids=doc_ids, prefix_len=prefix_len)
        if label_positions is None:
            labelled = labels != IGNORE_INDEX
            targets, chosen = labels[labelled], hidden[labelled]
        else:
            targets = labels.reshape(-1).index_select(0, label_positions)
            chosen = hidden.reshape(-1, hidden.shape[-1]).index_select(0, label_positions)
        # Sum / max(N, 1) instead of a mean: with N == 0 it is an exact 0 that still runs through the head and
        # the gather, so every parameter receives a (zero) gradient and no rank skips a collective in backward.
        num_labels = (targets != IGNORE_INDEX).sum()
        if self.head_loss == "fused":
            decoder = self.head.decoder
            loss_sum, num_correct = fused_linear_cross_entropy(self.head.transform(chosen), decoder.weight,
                                                               decoder.bias, targets)
        else:
            logits = self.head(chosen)  # [N, vocab]; N may be 0
            loss_sum = F.cross_entropy(logits.float(), targets, reduction="sum")
            with torch.no_grad():
                num_correct = (logits.argmax(dim=-1) == targets).sum()
        loss = loss_sum / num_labels.clamp(min=1)
        return PretrainOutput(loss=loss, num_labels=num_labels, num_correct=num_correct)

    def logits_for(
        self,
        input_ids: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
        attention: str = "bidirectional",
        prefix_len: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Full [B, T, vocab] logits at every position (for tests, fill-mask parity and evaluation, not training)."""
        hidden = self.encoder(input_ids, attention=attention, doc_ids=doc_ids, prefix_len=prefix_len)
        return self.head(hidden)
