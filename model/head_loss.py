"""The decoder's cross entropy without the [N, vocab] logits kept for backward ("fused" head loss).

The plain path (`F.cross_entropy(decoder(x).float(), ...)`) keeps the fp32 log-softmax of the [N, vocab] logits
for backward (4 bytes per logit), and its backward writes a dense fp32 gradient of the same size and casts it
back to bf16: about 50 bytes of memory traffic per logit in all, for N = 15% to 24% of the tokens times a 32k
vocabulary. The fused path here works through the labelled rows in chunks. For each chunk it computes the
logits, the loss, the argmax, and the gradient of the loss with respect to the logits (softmax minus one-hot),
and then, still in the forward, the gradients of the decoder's input, weight and bias from it. Only those three
gradients are kept; backward scales them by the incoming scalar gradient. Logits exist one chunk at a time and
are never stored.

The FLOPs are the plain path's (one forward matmul, two backward matmuls per chunk): nothing is recomputed. What
changes is memory and traffic: nothing of vocab size per row is kept for backward (2 GB less at 65,536 tokens per
step, cloze's mix and a 32k vocabulary), eager traffic falls to about 32 bytes per logit, and with the
per-chunk elementwise work compiled (`compile_chunk`) to about 16 (bench/README.md, "head_loss", counts them).

The grad computed here assumes the loss is what the caller differentiates: the returned loss sum may be scaled
(divided by the label count, multiplied by a loss scale) but must not pass through a non-linear function before
backward. That holds for the pretraining loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

HEAD_LOSSES = ("plain", "fused")
IGNORE_INDEX = -100
"""Label value that carries no loss; the same value as objectives.batch.IGNORE_INDEX (model/ does not import
objectives/)."""
CHUNK_ELEMENTS = 1 << 26
"""Logits per chunk (fp32: 256 MB): rows per chunk = CHUNK_ELEMENTS // vocab (2,048 at a 32k vocabulary), large
enough that each chunk's matmuls still fill a GPU."""


def ce_chunk(logits: torch.Tensor, targets: torch.Tensor, with_grad: bool
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One chunk: (sum of the cross entropy over the valid rows (fp32), number of valid rows whose argmax is the
    target, d(sum)/d(logits) in the logits' dtype or None). Valid rows are those whose target is not
    IGNORE_INDEX. The gradient is exact on valid rows only: an ignored row holds its softmax, which the caller
    leaves out (cheaper on [N, h] and [N] than zeroing [N, vocab]).

    The log-softmax is taken in fp32 whatever the logits' dtype, as the plain path's `logits.float()` does; in
    eager mode this is four passes over the chunk (log-softmax, argmax, exp, cast)."""
    valid = targets != IGNORE_INDEX
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32)
    picked = logp.gather(1, safe.unsqueeze(1)).squeeze(1)
    loss = -torch.where(valid, picked, torch.zeros_like(picked)).sum()
    correct = ((logits.argmax(dim=-1) == targets) & valid).sum()
    if not with_grad:
        return loss, correct, None
    grad = logp.exp_()  # softmax, in place: logp is not needed any more
    grad.scatter_add_(1, safe.unsqueeze(1), -valid.to(grad.dtype).unsqueeze(1))
    return loss, correct, grad.to(logits.dtype)


_COMPILED_CHUNK: Callable | None = None


def compile_chunk() -> None:
    """Compile `ce_chunk` (dynamic row count: the last chunk and every batch differ) so that its elementwise work
    is a few fused kernels instead of about ten passes over the chunk's logits. Used by the fused path from then
    on, in this process; the first call of each kind pays for the compilation."""
    global _COMPILED_CHUNK
    if _COMPILED_CHUNK is None:
        _COMPILED_CHUNK = torch.compile(ce_chunk, dynamic=True, fullgraph=True)


def _chunk_fn() -> Callable:
    return _COMPILED_CHUNK if _COMPILED_CHUNK is not None else ce_chunk


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_rows):  # noqa: D102 (documented on the wrapper)
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        with_grad = want_h or want_w or want_b
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.int64, device=hidden.device)
        # Gradients accumulate in fp32 across chunks (the plain path's single matmul accumulates in fp32 too).
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_b else None
        chunk = _chunk_fn()
        for start in range(0, hidden.shape[0], chunk_rows):
            h, t = hidden[start:start + chunk_rows], targets[start:start + chunk_rows]
            part_loss, part_correct, g = chunk(F.linear(h, weight, bias), t, with_grad)
            loss += part_loss
            correct += part_correct
            if not with_grad:
                continue
            # g is exact on valid rows only (see ce_chunk): mask the [rows, h] and [rows] sides, not g.
            keep = (t != IGNORE_INDEX).to(g.dtype)
            if grad_h is not None:
                grad_h[start:start + chunk_rows] = (g @ weight) * keep.unsqueeze(1)
            if grad_w is not None:
                grad_w += g.t() @ (h * keep.unsqueeze(1))
            if grad_b is not None:
                grad_b += keep @ g
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype)
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):  # noqa: D102
        saved = ctx.saved_tensors
        grads = [None if g is None else (g * grad_loss).to(dt) for g, dt in zip(saved, ctx.dtypes, strict=True)]
        return (*grads, None, None)


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                               targets: torch.Tensor, chunk_rows: int | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum over rows of cross_entropy(hidden @ weight.T + bias, targets), count of rows whose argmax equals the
    target), the logits never stored. hidden [N, h], weight [vocab, h], bias [vocab], targets int64 [N] (rows with
    IGNORE_INDEX carry no loss). chunk_rows: rows per chunk; default CHUNK_ELEMENTS // vocab.

    Differentiable in hidden, weight and bias; the count is not. With N == 0 the loss is an exact 0 whose
    backward still gives every input a (zero) gradient, as the plain path's does.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)}: expected [N, h] and "
                         "[vocab, h]")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets {tuple(targets.shape)} must be [N] for hidden {tuple(hidden.shape)}")
    rows = chunk_rows if chunk_rows is not None else max(1, CHUNK_ELEMENTS // weight.shape[0])
    if rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {rows}")
    return _FusedLinearCrossEntropy.apply(hidden, weight, bias, targets, rows)
