"""Encoder masks, head, loss, config and init: real modules on tiny CPU sizes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from model import Encoder, EncoderConfig, EncoderForPretraining, build_attention_mask

# Equalities that differ only by float rounding inside fp32 kernels (different mask paths, different absolute
# RoPE positions) are checked at 1e-5: observed differences are ~1e-6, while any real leak across a mask moves
# hidden states by >1e-2 at init_std 0.3 (see _sensitive_cfg).
TOL = 1e-5


def _sensitive_cfg(**kw) -> EncoderConfig:
    # A larger init_std than training uses makes attention far from uniform, so a masked-out token changing
    # would move the outputs visibly; at 0.02 a leak could hide under the tolerance.
    base = dict(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=96, init_std=0.3,
                global_rope_theta=1000.0, max_position_embeddings=256)
    return EncoderConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    torch.manual_seed(0)
    return Encoder(_sensitive_cfg()).eval()


def _ids(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(5, 300, shape, generator=torch.Generator().manual_seed(seed))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ---- masks ----

def test_mask_matches_brute_force_rule():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2], [0, 0, 0, 0, 0, 1, 1, 1]])
    prefix_len = torch.tensor([5, 2])
    for kind in ("bidirectional", "causal", "prefix"):
        spec = build_attention_mask(kind, 2, 8, torch.device("cpu"), doc_ids,
                                    prefix_len if kind == "prefix" else None)
        assert spec.mask.shape == (2, 1, 8, 8) and spec.mask.dtype == torch.bool and not spec.is_causal
        for b in range(2):
            for i in range(8):
                for j in range(8):
                    same = bool(doc_ids[b, i] == doc_ids[b, j])
                    p = int(prefix_len[b])
                    visible = {"bidirectional": True, "causal": j <= i,
                               "prefix": (i < p and j < p) or (i >= p and j <= i)}[kind]
                    assert bool(spec.mask[b, 0, i, j]) == (same and visible), (kind, b, i, j)


def test_no_mask_for_plain_bidirectional_and_flag_for_plain_causal():
    cpu = torch.device("cpu")
    assert build_attention_mask("bidirectional", 2, 8, cpu) == (None, False)
    assert build_attention_mask("causal", 2, 8, cpu) == (None, True)


def test_mask_argument_errors():
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="not one of"):
        build_attention_mask("sliding", 1, 4, cpu)
    with pytest.raises(ValueError, match="prefix_len"):
        build_attention_mask("prefix", 1, 4, cpu)
    with pytest.raises(ValueError, match="prefix_len"):
        build_attention_mask("causal", 1, 4, cpu, prefix_len=torch.tensor([2]))
    with pytest.raises(ValueError, match="doc_ids"):
        build_attention_mask("bidirectional", 1, 4, cpu, doc_ids=torch.zeros(1, 5, dtype=torch.long))


# ---- encoder behaviour under each attention kind ----

@pytest.mark.parametrize("attention", ["bidirectional", "causal"])
def test_packed_equals_separate(encoder, attention):
    doc_a, doc_b = _ids(1, 11, seed=1), _ids(1, 17, seed=2)
    packed = torch.cat([doc_a, doc_b], dim=1)
    doc_ids = torch.tensor([[0] * 11 + [1] * 17])
    with torch.no_grad():
        together = encoder(packed, attention=attention, doc_ids=doc_ids)
        alone_a = encoder(doc_a, attention=attention)
        alone_b = encoder(doc_b, attention=attention)  # positions 0..16 here, 11..27 when packed
        leaky = encoder(packed, attention=attention)  # no doc_ids: documents see each other
    assert _max_diff(together[:, :11], alone_a) < TOL
    assert _max_diff(together[:, 11:], alone_b) < TOL
    assert _max_diff(leaky[:, 11:], alone_b) > 1e-2  # the comparison can fail


@pytest.mark.parametrize("attention", ["bidirectional", "causal"])
def test_unmasked_fast_path_equals_single_document_mask(encoder, attention):
    ids = _ids(2, 20)
    with torch.no_grad():
        fast = encoder(ids, attention=attention)
        masked = encoder(ids, attention=attention, doc_ids=torch.zeros_like(ids))
    assert _max_diff(fast, masked) < TOL


@pytest.mark.parametrize("with_docs", [False, True])
def test_causal_position_ignores_later_tokens(encoder, with_docs):
    ids = _ids(2, 24)
    changed = ids.clone()
    changed[:, 13:] = _ids(2, 11, seed=9)
    doc_ids = torch.zeros_like(ids) if with_docs else None
    with torch.no_grad():
        a = encoder(ids, attention="causal", doc_ids=doc_ids)
        b = encoder(changed, attention="causal", doc_ids=doc_ids)
        bidir = encoder(changed, attention="bidirectional")
    assert _max_diff(a[:, :13], b[:, :13]) < TOL
    assert _max_diff(a[:, :13], bidir[:, :13]) > 1e-2  # bidirectional attention does see the change


def test_prefix_attention():
    torch.manual_seed(0)
    enc = Encoder(_sensitive_cfg()).eval()
    ids = _ids(2, 32)
    prefix_len = torch.tensor([10, 20])

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return enc(x, attention="prefix", prefix_len=prefix_len)

    base = run(ids)
    # Suffix changes never reach the prefix.
    suffix_changed = ids.clone()
    suffix_changed[0, 10:] = _ids(22, seed=3)
    suffix_changed[1, 20:] = _ids(12, seed=4)
    out = run(suffix_changed)
    assert _max_diff(out[0, :10], base[0, :10]) < TOL
    assert _max_diff(out[1, :20], base[1, :20]) < TOL
    # A suffix token t ignores tokens after t (row 0: change from 25 on, positions <= 24 fixed).
    late_changed = ids.clone()
    late_changed[0, 25:] = _ids(7, seed=5)
    out = run(late_changed)
    assert _max_diff(out[0, :25], base[0, :25]) < TOL
    assert _max_diff(out[1], base[1]) == 0.0  # other row untouched
    # Inside the prefix attention is bidirectional: changing the last prefix token moves the first one.
    prefix_changed = ids.clone()
    prefix_changed[0, 9] = (ids[0, 9] + 1 - 5) % 295 + 5
    assert _max_diff(run(prefix_changed)[0, 0], base[0, 0]) > 1e-3


def test_forward_argument_errors(encoder):
    with pytest.raises(ValueError, match="max_position_embeddings"):
        encoder(_ids(1, 257))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        encoder(_ids(8))


# ---- head and loss ----

def _pretrain_model() -> EncoderForPretraining:
    torch.manual_seed(0)
    return EncoderForPretraining(_sensitive_cfg())


def test_head_tied_to_embedding():
    model = _pretrain_model()
    assert model.head.decoder.weight is model.encoder.embeddings.tok_embeddings.weight


def test_sparse_head_loss_equals_full_logits_loss():
    model = _pretrain_model()
    ids = _ids(3, 40)
    labels = torch.full_like(ids, -100)
    pick = torch.rand(ids.shape, generator=torch.Generator().manual_seed(7)) < 0.15
    labels[pick] = _ids(3, 40, seed=8)[pick]
    doc_ids = (torch.arange(40) >= 25).long().expand(3, 40).contiguous()

    out = model(ids, labels, doc_ids=doc_ids)
    out.loss.backward()
    sparse_grad = model.head.dense.weight.grad.clone()
    model.zero_grad()

    logits = model.logits_for(ids, doc_ids=doc_ids)
    reference = nn.CrossEntropyLoss(ignore_index=-100)(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    reference.backward()
    torch.testing.assert_close(out.loss, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sparse_grad, model.head.dense.weight.grad, atol=1e-6, rtol=1e-4)
    assert int(out.num_labels) == int(pick.sum())
    correct = (logits.argmax(-1) == labels)[pick].sum()
    assert int(out.num_correct) == int(correct)


def test_no_label_batch_gives_connected_zero_loss():
    model = _pretrain_model()
    ids = _ids(2, 16)
    out = model(ids, torch.full_like(ids, -100))
    assert out.loss.item() == 0.0 and int(out.num_labels) == 0 and int(out.num_correct) == 0
    assert out.loss.requires_grad
    out.loss.backward()
    # Every parameter gets a gradient tensor (all zeros), so distributed reducers see the same set on every rank.
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.count_nonzero(p.grad) == 0, name


def test_bf16_autocast_trains():
    model = _pretrain_model()
    ids = _ids(2, 16)
    labels = torch.where(torch.arange(16) % 4 == 0, ids, torch.full_like(ids, -100))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels, attention="causal")
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.isfinite(model.encoder.layers[0].attn.Wqkv.weight.grad).all()


# ---- config ----

@pytest.mark.parametrize("bad, match", [
    (dict(vocab_size=0), "vocab_size"),
    (dict(hidden_size=100, num_heads=12), "divisible"),
    (dict(hidden_size=36, num_heads=4), "odd"),
    (dict(global_rope_theta=0.0), "global_rope_theta"),
    (dict(local_rope_theta=-1.0), "local_rope_theta"),
    (dict(global_attn_every_n_layers=0), "global_attn_every_n_layers"),
    (dict(num_layers=3, global_attn_every_n_layers=3, local_attention=15), "even window"),
    (dict(num_layers=3, global_attn_every_n_layers=2, local_attention=0), "local_attention"),
    (dict(norm_eps=-1.0), "norm_eps"),
    (dict(num_layers=2.5), "num_layers"),
    (dict(mask_token_id=300), "mask_token_id"),
])
def test_config_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        _sensitive_cfg(**bad)


def test_config_dict_round_trip_and_unknown_keys():
    cfg = _sensitive_cfg()
    assert EncoderConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="hidden"):
        EncoderConfig.from_dict({**cfg.to_dict(), "hidden": 3})


def test_config_reads_the_former_rope_theta_as_global_rope_theta():
    """A run.json written before local layers existed names the one theta rope_theta; every layer was global."""
    old = {k: v for k, v in _sensitive_cfg().to_dict().items()
           if k not in ("global_rope_theta", "local_rope_theta", "global_attn_every_n_layers", "local_attention")}
    cfg = EncoderConfig.from_dict({**old, "rope_theta": 1234.0})
    assert cfg.global_rope_theta == 1234.0 and cfg.num_local_layers == 0
    with pytest.raises(ValueError, match="keep global_rope_theta only"):
        EncoderConfig.from_dict({**cfg.to_dict(), "rope_theta": 1234.0})


def test_layer_pattern_is_modernberts():
    """Layer i is global when i % n == 0, as in transformers' ModernBertConfig; an odd window is refused only when
    some layer would use it."""
    cfg = _sensitive_cfg(num_layers=7, global_attn_every_n_layers=3)
    assert [cfg.is_global_layer(i) for i in range(7)] == [True, False, False, True, False, False, True]
    assert cfg.num_local_layers == 4
    assert cfg.layer_types[:3] == ["full_attention", "sliding_attention", "sliding_attention"]
    assert "global every 3 layers (3 global, 4 local), window 128" in cfg.describe_layers()
    assert _sensitive_cfg(local_attention=15).num_local_layers == 0  # every layer global: the window is unused
    assert _sensitive_cfg(num_layers=1, global_attn_every_n_layers=5, local_attention=3).num_local_layers == 0
    model = Encoder(cfg)
    assert [layer.local for layer in model.layers] == [not cfg.is_global_layer(i) for i in range(7)]


def test_num_params_matches_modules():
    cfg = _sensitive_cfg(num_layers=3)
    full = EncoderForPretraining(cfg)
    assert cfg.num_params(include_head=True) == sum(p.numel() for p in full.parameters())
    assert cfg.num_params() == sum(p.numel() for p in full.encoder.parameters())
    emb = full.encoder.embeddings.tok_embeddings.weight.numel()
    assert cfg.num_params(include_embeddings=False) == cfg.num_params() - emb


def test_flops_per_token_counts_every_matmul():
    cfg = _sensitive_cfg(num_layers=3)
    model = EncoderForPretraining(cfg)
    encoder_matmul = sum(m.weight.numel() for m in model.encoder.modules() if isinstance(m, nn.Linear))
    head_matmul = model.head.dense.weight.numel() + model.head.decoder.weight.numel()
    seq = 128
    attention = 12 * cfg.num_layers * seq * cfg.hidden_size
    assert cfg.flops_per_token(seq, 0.0) == 6 * encoder_matmul + attention
    assert cfg.flops_per_token(seq, 0.25) == pytest.approx(6 * encoder_matmul + attention + 0.25 * 6 * head_matmul)
    with pytest.raises(ValueError, match="labelled_fraction"):
        cfg.flops_per_token(seq, 1.5)


# ---- init ----

def test_init_stds_as_documented():
    cfg = EncoderConfig(vocab_size=1000, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=384)
    torch.manual_seed(0)
    model = EncoderForPretraining(cfg)
    # A normal truncated at +-2 sigma has std sigma * sqrt(1 - 2*2*phi(2) / (Phi(2) - Phi(-2))) ~= 0.8796 sigma.
    phi2 = math.exp(-2.0) / math.sqrt(2 * math.pi)
    mass = math.erf(2 / math.sqrt(2))
    shrink = math.sqrt(1 - 4 * phi2 / mass)
    out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
    layer = model.encoder.layers[1]
    expected = {
        "embedding": (model.encoder.embeddings.tok_embeddings.weight, cfg.init_std),
        "Wqkv": (layer.attn.Wqkv.weight, cfg.init_std),
        "attn Wo": (layer.attn.Wo.weight, out_std),
        "Wi": (layer.mlp.Wi.weight, cfg.init_std),
        "mlp Wo": (layer.mlp.Wo.weight, out_std),
        "head dense": (model.head.dense.weight, out_std),
    }
    for name, (w, sigma) in expected.items():
        # Smallest tensor has 65536 entries; the sample std's relative standard error is about
        # sqrt((kurtosis - 1) / (4n)) < 0.3%, so 3% is a ~10-sigma bound that still rejects an unscaled
        # out-projection (off by sqrt(8) here) or a missing truncation (off by 14%).
        assert w.std().item() == pytest.approx(sigma * shrink, rel=0.03), name
        assert w.abs().max().item() <= 2 * sigma + 1e-7, name
        assert abs(w.mean().item()) < 0.05 * sigma, name  # the mean's standard error is < 0.004 sigma here
    for name, p in model.named_parameters():
        if "norm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
    assert torch.equal(model.head.decoder.bias, torch.zeros_like(model.head.decoder.bias))


@pytest.mark.parametrize("share", [0.15, 0.0, 1.0])
def test_label_positions_from_the_host_give_the_same_loss_and_gradients(share):
    """The trainer passes the labelled positions it computed on the host (no device wait for the gather); the
    result must be the boolean gather's exactly: same rows in the same order, so the same numbers bit for bit."""
    torch.manual_seed(0)
    model = EncoderForPretraining(_sensitive_cfg())
    ids = _ids(3, 20, seed=5)
    pick = torch.rand(ids.shape, generator=torch.Generator().manual_seed(6)) < share
    labels = torch.where(pick, _ids(3, 20, seed=7), torch.full_like(ids, -100))
    doc_ids = torch.zeros_like(ids)
    doc_ids[:, 11:] = 1
    results = []
    for positions in (None, (labels.reshape(-1) != -100).nonzero().squeeze(1)):
        model.zero_grad()
        out = model(ids, labels, doc_ids=doc_ids, label_positions=positions)
        out.loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        results.append((out.loss.detach(), int(out.num_labels), int(out.num_correct), grads))
    (loss_a, n_a, c_a, g_a), (loss_b, n_b, c_b, g_b) = results
    assert n_a == n_b == int(pick.sum()) and c_a == c_b
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(a, b) for a, b in zip(g_a, g_b, strict=True))
