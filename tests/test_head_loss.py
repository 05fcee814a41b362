"""The fused head loss (model/head_loss.py) against the plain path: same loss, same counts, same gradients, and
the [N, vocab] logits not kept for backward."""

from __future__ import annotations

import pytest
import torch

from bench.head_loss import SavedBytes
from bench.head_loss import plain as _plain
from model import EncoderConfig, EncoderForPretraining
from model import head_loss as hl
from model.head_loss import IGNORE_INDEX, fused_linear_cross_entropy


def _inputs(n: int, h: int, vocab: int, dtype=torch.float32, ignored_every: int = 0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(vocab, h, generator=g) * 0.3).to(dtype).requires_grad_()
    b = (torch.randn(vocab, generator=g) * 0.3).to(dtype).requires_grad_()
    t = torch.randint(0, vocab, (n,), generator=g)
    if ignored_every:
        t[::ignored_every] = IGNORE_INDEX
    return x, w, b, t


def _run(loss_fn, x, w, b, t, scale: float = 1.0):
    for p in (x, w, b):
        p.grad = None
    loss, correct = loss_fn(x, w, b, t)
    (loss * scale).backward()
    return loss.detach(), int(correct), [p.grad.clone() for p in (x, w, b)]


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 100, 1000])
@pytest.mark.parametrize("ignored_every", [0, 3])
def test_fused_equals_plain_in_fp32(chunk_rows, ignored_every):
    """Every chunking (one row per chunk, an uneven last chunk, one chunk, more rows per chunk than rows), with and
    without ignored rows: loss and the gradients of x, W and b within 1e-5 of the plain path relative to the
    largest gradient (fp32 summation order only; a dropped or doubled row moves them by >1e-2), the count equal.
    The backward is scaled by 0.37 to check that the incoming gradient multiplies the precomputed ones."""
    x, w, b, t = _inputs(100, 16, 50, ignored_every=ignored_every)
    loss_p, correct_p, grads_p = _run(_plain, x, w, b, t, scale=0.37)
    loss_f, correct_f, grads_f = _run(lambda *a: fused_linear_cross_entropy(*a, chunk_rows=chunk_rows),
                                      x, w, b, t, scale=0.37)
    assert correct_f == correct_p > 0
    assert abs(loss_f.item() - loss_p.item()) <= 1e-5 * abs(loss_p.item())
    for name, gf, gp in zip("xwb", grads_f, grads_p, strict=True):
        assert (gf - gp).abs().max() <= 1e-5 * gp.abs().max(), name


def test_fused_in_bf16_is_as_close_to_fp64_as_plain_is():
    """bf16 inputs: both paths against an fp64 reference on the same (bf16-rounded) values. The fused path's
    gradient error may not exceed twice the plain path's plus one bf16 ulp of the largest gradient (2^-8); it
    sums its chunks in fp32, so it is usually the closer of the two."""
    x, w, b, t = _inputs(300, 64, 1000, dtype=torch.bfloat16, ignored_every=7)
    ref = [p.detach().double().requires_grad_() for p in (x, w, b)]
    loss_r, correct_r, grads_r = _run(_plain, *ref, t)
    _, _, grads_p = _run(_plain, x, w, b, t)
    loss_f, correct_f, grads_f = _run(lambda *a: fused_linear_cross_entropy(*a, chunk_rows=64), x, w, b, t)
    assert abs(loss_f.item() - loss_r.item()) <= 1e-4 * abs(loss_r.item())  # fp32 softmax on bf16 logits
    assert correct_f == correct_r or abs(correct_f - correct_r) <= 1  # a tie broken by bf16 rounding
    for name, gf, gp, gr in zip("xwb", grads_f, grads_p, grads_r, strict=True):
        scale = gr.abs().max().item()
        err_f, err_p = (gf.double() - gr).abs().max().item(), (gp.double() - gr).abs().max().item()
        assert err_f <= 2 * err_p + scale * 2 ** -8, (name, err_f, err_p, scale)


def test_no_rows_gives_zero_loss_and_zero_gradients():
    x, w, b, t = _inputs(0, 16, 50)
    loss, correct, grads = _run(fused_linear_cross_entropy, x, w, b, t)
    assert loss.item() == 0.0 and correct == 0
    assert [g.shape for g in grads] == [x.shape, w.shape, b.shape]
    assert all(not g.any() for g in grads)


def test_without_grad_the_loss_is_the_same_and_nothing_is_kept():
    x, w, b, t = _inputs(100, 16, 50, ignored_every=5)
    loss_p, correct_p = _plain(x, w, b, t)
    with torch.no_grad(), SavedBytes([x, w, b, t]) as saved:
        loss_f, correct_f = fused_linear_cross_entropy(x, w, b, t, chunk_rows=30)
    assert saved.nbytes == 0 and loss_f.grad_fn is None
    assert abs(loss_f.item() - loss_p.item()) <= 1e-5 * abs(loss_p.item()) and int(correct_f) == int(correct_p)


def test_the_logits_are_not_kept_for_backward():
    """What autograd keeps between forward and backward, at two row counts: the plain path keeps at least the
    fp32 log-softmax, so each extra row costs at least vocab x 4 bytes; the fused path keeps the three gradients
    (x's in x's dtype, W's and b's in fp32), so each extra row costs exactly hidden x 4 bytes (x's gradient row)."""
    h, vocab = 32, 4000
    kept = {}
    for n in (256, 512):
        x, w, b, t = _inputs(n, h, vocab)
        with SavedBytes([x, w, b, t]) as plain_saved:
            _plain(x, w, b, t)
        with SavedBytes([x, w, b, t]) as fused_saved:
            fused_linear_cross_entropy(x, w, b, t, chunk_rows=100)
        kept[n] = plain_saved.nbytes, fused_saved.nbytes
    assert kept[512][0] - kept[256][0] >= 256 * vocab * 4
    assert kept[512][1] - kept[256][1] == 256 * h * 4
    assert kept[256][1] <= (256 * h + vocab * h + vocab) * 4 + 4096


def test_bad_shapes_are_refused():
    x, w, b, t = _inputs(10, 16, 50)
    with pytest.raises(ValueError, match="expected"):
        fused_linear_cross_entropy(x, w[:, :8], b, t)
    with pytest.raises(ValueError, match="targets"):
        fused_linear_cross_entropy(x, w, b, t[:5])
    with pytest.raises(ValueError, match="chunk_rows"):
        fused_linear_cross_entropy(x, w, b, t, chunk_rows=0)


def _model_grads(model, ids, labels, doc_ids, positions):
    model.zero_grad()
    out = model(ids, labels, doc_ids=doc_ids, label_positions=positions)
    out.loss.backward()
    return out.loss.detach(), int(out.num_labels), int(out.num_correct), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("share", [0.15, 0.0, 1.0])
def test_pretraining_model_fused_equals_plain(share):
    """The whole model, fp32: every parameter's gradient, the tied embedding/decoder matrix included (it gets
    the head's gradient plus the embedding lookup's), within 1e-5 of the plain path's, with and without the
    host-computed label positions; at 0% labelled the loss is an exact 0 and every gradient exists."""
    cfg = EncoderConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96,
                        init_std=0.3, max_position_embeddings=64)
    torch.manual_seed(0)
    model = EncoderForPretraining(cfg)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 300, (3, 20), generator=g)
    pick = torch.rand(ids.shape, generator=g) < share
    labels = torch.where(pick, torch.randint(5, 300, ids.shape, generator=g), torch.full_like(ids, IGNORE_INDEX))
    doc_ids = torch.zeros_like(ids)
    doc_ids[:, 11:] = 1
    positions = (labels.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)
    plain = _model_grads(model, ids, labels, doc_ids, positions)
    model.set_head_loss("fused")
    for pos in (positions, None):
        fused = _model_grads(model, ids, labels, doc_ids, pos)
        assert fused[1:3] == plain[1:3]
        assert abs(fused[0].item() - plain[0].item()) <= 1e-5 * max(1.0, abs(plain[0].item()))
        for (name, _), a, p in zip(model.named_parameters(), fused[3], plain[3], strict=True):
            assert (a - p).abs().max() <= 1e-5 * max(p.abs().max().item(), 1e-12), name
    if share == 0.0:
        assert fused[0].item() == 0.0
    with pytest.raises(ValueError, match="head_loss"):
        model.set_head_loss("chunked")


def test_compiled_chunk_matches_eager(monkeypatch):
    """compile_chunk (what train.compile=true turns on with head_loss=fused): inductor's fused kernels give the
    eager chunk's loss and gradients within 1e-5 (fp32), over chunks of different row counts (dynamic shapes)."""
    monkeypatch.setattr(hl, "_COMPILED_CHUNK", None)  # restored afterwards: other tests keep the eager chunk
    x, w, b, t = _inputs(100, 16, 50, ignored_every=4)
    eager = _run(lambda *a: fused_linear_cross_entropy(*a, chunk_rows=30), x, w, b, t)
    hl.compile_chunk()
    assert hl._COMPILED_CHUNK is not None
    for rows in (30, 64):
        compiled = _run(lambda *a, r=rows: fused_linear_cross_entropy(*a, chunk_rows=r), x, w, b, t)
        assert compiled[1] == eager[1]
        assert abs(compiled[0].item() - eager[0].item()) <= 1e-5 * abs(eager[0].item())
        for gc, ge in zip(compiled[2], eager[2], strict=True):
            assert (gc - ge).abs().max() <= 1e-5 * ge.abs().max()
