"""Local (sliding-window) layers: the window combines with the document mask and every attention pattern, in the
dense SDPA mask and in the FlexAttention block mask alike, and the FLOP count holds only the pairs a layer lets
meet. Brute force (Python loops over every pair) is the reference throughout.

FlexAttention runs here on CPU, eagerly and forward only, as in tests/test_attention_backends.py.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

from model import Encoder, EncoderConfig
from model.attention import ATTENTION_KINDS, build_attention_mask, build_block_mask, visible_pairs
from model.config import window_pairs
from tests.conftest import assert_compiled_flex_matches_eager_sdpa, block_mask_tiles, forward_on

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

CPU = torch.device("cpu")
# fp32 kernels differ by float rounding only (~1e-6 observed); a key leaked past the window or dropped inside it
# moves hidden states by > 1e-2 at init_std 0.3 (test_window_changes_the_output shows the scale).
TOL = 1e-5
CASES = [(kind, docs) for kind in ATTENTION_KINDS for docs in (False, True)]


def brute_force(kind: str, doc_ids: torch.Tensor | None, prefix_len: torch.Tensor | None, batch: int, seq_len: int,
                window: int | None) -> torch.Tensor:
    """[B, T, T] bool, pair by pair, from the rules as a user reads them: the pattern, the document, the window."""
    out = torch.zeros(batch, seq_len, seq_len, dtype=torch.bool)
    for b in range(batch):
        for q in range(seq_len):
            for k in range(seq_len):
                if kind == "bidirectional":
                    ok = True
                elif kind == "causal":
                    ok = k <= q
                else:  # prefix: the prefix is bidirectional among itself, the suffix causal and sees the prefix
                    n = int(prefix_len[b])
                    ok = k < n if q < n else k <= q
                if doc_ids is not None:
                    ok = ok and bool(doc_ids[b, q] == doc_ids[b, k])
                if window is not None:
                    ok = ok and abs(q - k) <= window // 2
                out[b, q, k] = ok
    return out


def _layout(batch: int, seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed rows of random document lengths (non-decreasing ids, as data/packing.py makes) and random prefixes."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.rand(batch, seq_len, generator=gen) < 0.15
    doc_ids = starts.long().cumsum(1)
    doc_ids -= doc_ids[:, :1]
    prefix_len = torch.randint(1, seq_len + 1, (batch,), generator=gen)
    return doc_ids, prefix_len


def _dense(spec, batch: int, seq_len: int) -> torch.Tensor:
    assert spec.mask is not None and not spec.is_causal  # a window always needs a mask tensor
    return spec.mask[:, 0].expand(batch, seq_len, seq_len)


# ---- masks: window AND document AND pattern ----

@pytest.mark.parametrize("window", [2, 6, 16, 200])
@pytest.mark.parametrize("kind, docs", CASES)
def test_masks_equal_brute_force(kind, docs, window):
    batch, seq_len = 3, 24
    doc_ids, prefix_len = _layout(batch, seq_len, seed=window)
    doc_ids = doc_ids if docs else None
    prefix_len = prefix_len if kind == "prefix" else None
    want = brute_force(kind, doc_ids, prefix_len, batch, seq_len, window)
    sdpa = build_attention_mask(kind, batch, seq_len, CPU, doc_ids, prefix_len, window=window)
    assert torch.equal(_dense(sdpa, batch, seq_len), want)
    flex = build_block_mask(kind, batch, seq_len, CPU, doc_ids, prefix_len, block_size=8, window=window)
    assert torch.equal(create_mask(flex.block_mask.mask_mod, batch, 1, seq_len, seq_len, device=CPU)[:, 0], want)
    # The window really cuts (except the one reaching past the row) and never empties a row (SDPA would give NaN).
    assert torch.equal(want, brute_force(kind, doc_ids, prefix_len, batch, seq_len, None)) == (window >= 2 * seq_len)
    assert want.any(-1).all()


def test_window_is_transformers_rule():
    """transformers' ModernBERT lets q and k meet when |q - k| <= local_attention // 2 (config.sliding_window),
    both sides inclusive: a window of 4 reaches 2 tokens each way, 5 keys in all away from the row's ends."""
    mask = _dense(build_attention_mask("bidirectional", 1, 9, CPU, window=4), 1, 9)[0]
    assert mask[4].nonzero().flatten().tolist() == [2, 3, 4, 5, 6]
    assert mask[0].nonzero().flatten().tolist() == [0, 1, 2]


def test_window_argument_is_checked():
    for bad in (0, 3, -2, 2.0, True):
        with pytest.raises(ValueError, match="even integer >= 2"):
            build_attention_mask("bidirectional", 1, 8, CPU, window=bad)
        with pytest.raises(ValueError, match="even integer >= 2"):
            build_block_mask("bidirectional", 1, 8, CPU, window=bad)



@pytest.mark.parametrize("kind, docs", CASES)
def test_block_mask_skips_the_tiles_outside_the_window(kind, docs):
    """The saving local layers bring on flex: a tile with no pair inside the window is never computed."""
    batch, seq_len, size, window = 3, 64, 8, 8
    doc_ids, prefix_len = _layout(batch, seq_len, seed=7)
    doc_ids = doc_ids if docs else None
    prefix_len = prefix_len if kind == "prefix" else None
    flex = build_block_mask(kind, batch, seq_len, CPU, doc_ids, prefix_len, block_size=size, window=window)
    dense = brute_force(kind, doc_ids, prefix_len, batch, seq_len, window)
    per_tile = dense.reshape(batch, seq_len // size, size, seq_len // size, size).transpose(2, 3).flatten(3)
    expected = per_tile.any(-1).long() + per_tile.all(-1).long()
    tiles = block_mask_tiles(flex.block_mask, batch, seq_len // size)
    assert torch.equal(tiles, expected)
    # Each tile row touches at most 3 tiles (the diagonal and one each side) of the 8: the band, not the square.
    assert int((tiles > 0).sum(-1).max()) <= 3


# ---- FLOPs: the pairs each layer lets meet ----

@pytest.mark.parametrize("kind", ATTENTION_KINDS)
def test_visible_pairs_with_a_window_equal_brute_force(kind):
    gen = torch.Generator().manual_seed(11)
    for trial in range(12):
        batch, seq_len = 2, int(torch.randint(1, 30, (1,), generator=gen))
        doc_ids, prefix_len = _layout(batch, seq_len, seed=trial)
        prefix_len = prefix_len if kind == "prefix" else None
        for window in (2, 4, 10, 64):
            want = int(brute_force(kind, doc_ids, prefix_len, batch, seq_len, window).sum())
            assert visible_pairs(kind, doc_ids, prefix_len, window=window) == want, (trial, window)
        assert visible_pairs(kind, doc_ids, prefix_len) == int(
            brute_force(kind, doc_ids, prefix_len, batch, seq_len, None).sum())


def test_visible_pairs_with_a_window_and_documents_out_of_order():
    """A document id that comes back later in the row (not what packing writes) is still one document for the
    mask; the count follows the mask, not the closed form over runs."""
    doc_ids = torch.tensor([[0, 0, 1, 1, 0, 0, 2, 2, 2, 1]])
    for kind in ("bidirectional", "causal"):
        want = int(brute_force(kind, doc_ids, None, 1, 10, 4).sum())
        assert visible_pairs(kind, doc_ids, window=4) == want


def test_window_pairs_equal_brute_force():
    for length in range(0, 20):
        for window in (2, 4, 8, 38, 40, 100):
            want = sum(abs(q - k) <= window // 2 for q in range(length) for k in range(length))
            assert window_pairs(length, window) == want, (length, window)


def _cfg(**kw) -> EncoderConfig:
    base = dict(vocab_size=300, hidden_size=64, num_layers=5, num_heads=4, intermediate_size=96, init_std=0.3,
                global_rope_theta=1000.0, local_rope_theta=50.0, max_position_embeddings=256,
                global_attn_every_n_layers=3, local_attention=8)
    return EncoderConfig(**{**base, **kw})


def test_useful_flops_count_each_layer_by_its_kind():
    cfg = _cfg()  # layers 0 and 3 global, 1, 2 and 4 local
    doc_ids, _ = _layout(4, 48, seed=3)
    tokens, labels = doc_ids.numel(), 17
    global_pairs = int(brute_force("bidirectional", doc_ids, None, 4, 48, None).sum())
    local_pairs = int(brute_force("bidirectional", doc_ids, None, 4, 48, cfg.local_attention).sum())
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    want = (6 * cfg.num_layers * (4 * h * h + 3 * h * i) * tokens + 12 * h * (2 * global_pairs + 3 * local_pairs)
            + 6 * (h * h + h * v) * labels)
    got = cfg.useful_flops(tokens, visible_pairs("bidirectional", doc_ids), labels,
                           visible_pairs("bidirectional", doc_ids, window=cfg.local_attention))
    assert got == want
    with pytest.raises(ValueError, match="pass local_visible_pairs"):
        cfg.useful_flops(tokens, global_pairs, labels)
    # All global: the local count is not needed, and one layer kind means the former count.
    flat = _cfg(global_attn_every_n_layers=1)
    assert flat.useful_flops(tokens, global_pairs, labels) == want + 12 * h * 3 * (global_pairs - local_pairs)


def test_flops_per_token_counts_the_window_on_local_layers():
    cfg, seq = _cfg(), 40
    per_token = {n: _cfg(global_attn_every_n_layers=n).flops_per_token(seq, 0.2) for n in (1, 3)}
    band = int(brute_force("bidirectional", None, None, 1, seq, cfg.local_attention).sum())
    # Three local layers each do seq^2 - band fewer pair-FLOPs over the row, i.e. per token:
    saved = 3 * 12 * cfg.hidden_size * (seq * seq - band) / seq
    assert per_token[1] - per_token[3] == pytest.approx(saved, rel=1e-12)
    # A window reaching past the row counts like a global layer.
    assert _cfg(local_attention=2 * seq).flops_per_token(seq, 0.2) == per_token[1]


# ---- the encoder: local layers on both backends ----

@pytest.fixture(scope="module")
def local_encoder() -> Encoder:
    torch.manual_seed(0)
    return Encoder(_cfg()).eval()



def _args(kind: str, docs: bool, batch: int, seq_len: int) -> dict:
    doc_ids, prefix_len = _layout(batch, seq_len, seed=5)
    return dict(attention=kind, doc_ids=doc_ids if docs else None, prefix_len=prefix_len if kind == "prefix" else None)


@pytest.mark.parametrize("kind, docs", CASES)
def test_flex_forward_equals_sdpa_with_local_layers(local_encoder, kind, docs):
    ids = torch.randint(5, 300, (3, 40), generator=torch.Generator().manual_seed(1))
    args = _args(kind, docs, 3, 40)
    flex, sdpa = forward_on(local_encoder, "flex", ids, **args), forward_on(local_encoder, "sdpa", ids, **args)
    assert (flex - sdpa).abs().max().item() < TOL


def test_window_changes_the_output(local_encoder):
    """The comparisons above could not pass with the window ignored on one side: the same weights with every
    layer global (or a wider window) give hidden states far outside TOL."""
    ids = torch.randint(5, 300, (2, 40), generator=torch.Generator().manual_seed(2))
    ours = forward_on(local_encoder, "sdpa", ids)
    for other in (_cfg(global_attn_every_n_layers=1), _cfg(local_attention=10)):
        twin = Encoder(other).eval()
        twin.load_state_dict(local_encoder.state_dict())
        assert (forward_on(twin, "sdpa", ids) - ours).abs().max().item() > 1e-2


def test_local_rope_theta_is_read_by_local_layers_only(local_encoder):
    ids = torch.randint(5, 300, (1, 40), generator=torch.Generator().manual_seed(3))
    twin = Encoder(_cfg(local_rope_theta=5000.0)).eval()
    twin.load_state_dict(local_encoder.state_dict())
    assert (forward_on(twin, "sdpa", ids) - forward_on(local_encoder, "sdpa", ids)).abs().max().item() > 1e-2
    # With every layer global, local_rope_theta is never read: two values, the same output.
    a, b = (Encoder(_cfg(global_attn_every_n_layers=1, local_rope_theta=t)).eval() for t in (5.0, 5000.0))
    b.load_state_dict(a.state_dict())
    assert torch.equal(forward_on(a, "sdpa", ids), forward_on(b, "sdpa", ids))


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("kind", ["bidirectional", "causal"])
def test_packed_equals_separate_with_local_layers(local_encoder, backend, kind):
    """The window and RoPE both depend on q - k only, so a document gives the same hidden states wherever it sits
    in a packed row, as long as the document mask keeps its neighbours out. The RoPE angles of other absolute
    positions round differently in fp32, which five layers at init_std 0.3 amplify to ~2e-5 (observed); dropping
    the document mask moves the same states by > 1e-2."""
    lengths = (13, 21, 6)
    docs = [torch.randint(5, 300, (n,), generator=torch.Generator().manual_seed(20 + i)) for i, n in
            enumerate(lengths)]
    packed = torch.cat(docs)[None]
    doc_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    together = forward_on(local_encoder, backend, packed, attention=kind, doc_ids=doc_ids)
    start = 0
    for doc in docs:
        alone = forward_on(local_encoder, backend, doc[None], attention=kind)
        assert (together[0, start:start + doc.numel()] - alone[0]).abs().max().item() < 1e-4
        start += doc.numel()
    leaky = forward_on(local_encoder, backend, packed, attention=kind)
    assert (leaky[0, 13:34] - forward_on(local_encoder, backend, docs[1][None], attention=kind)[0]).abs().max() > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_compiled_layers_with_local_layers_match_eager(local_encoder, backend):
    """Dynamo traces each block with its own kind's mask and RoPE (the GlobalLocal pairs are graph inputs) and the
    traced graphs compute what eager does. With flex every attention pattern shares one mask_mod, so three graphs
    serve all patterns (block 0, the other global blocks, the local blocks); SDPA's masks differ in form between
    patterns (none, is_causal, a dense tensor), so it traces more. aot_eager runs the traced graph with torch's own
    kernels (inductor's CPU flex kernel is refused, tests/test_attention_backends.py)."""
    from model.encoder import compile_layers

    torch._dynamo.reset()
    compiled = Encoder(_cfg(), attn_backend=backend).eval()
    compiled.load_state_dict(local_encoder.state_dict())
    compile_layers(compiled, backend="aot_eager")
    ids = torch.randint(5, 300, (3, 40), generator=torch.Generator().manual_seed(6))
    counters = torch._dynamo.utils.counters["stats"]
    before = counters["unique_graphs"]
    with torch.no_grad():  # all compiled calls first: eager flex runs its own torch.compile(backend="eager")
        outputs = [compiled(ids, **_args(kind, docs, 3, 40)) for kind, docs in CASES]
    graphs = counters["unique_graphs"] - before
    for (kind, docs), got in zip(CASES, outputs):
        want = forward_on(local_encoder, backend, ids, **_args(kind, docs, 3, 40))
        torch.testing.assert_close(got, want, atol=TOL, rtol=0, msg=kind)
    if backend == "flex":
        assert graphs == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex backward needs CUDA (none on CPU in torch 2.13)")
def test_compiled_flex_training_with_local_layers_matches_eager_sdpa_on_cuda():
    """The trainer's GPU path with local layers: "auto" picks flex (every batch needs a mask), compiled blocks skip
    the tiles outside the window, and loss and gradients equal dense-mask SDPA's."""
    small = _cfg(num_layers=3, global_attn_every_n_layers=2)  # global, local, global: both kinds, few layers
    assert_compiled_flex_matches_eager_sdpa(small, [(kind, _args(kind, docs, 3, 40)) for kind, docs in CASES])


# ---- the run config ----

def _load(tmp_path, *overrides: str):
    from launch.config import load_config
    from tests.conftest import ROOT

    return load_config(ROOT / "launch/configs/tiny.yaml", [f"data.path={tmp_path}", *overrides])


def test_run_config_checks_the_window_and_names_the_renamed_theta(tmp_path):
    from launch.config import ConfigError

    with pytest.raises(ConfigError, match=r"local_attention=15 must be an even window >= 2"):
        _load(tmp_path, "model.global_attn_every_n_layers=2", "model.local_attention=15")
    with pytest.raises(ConfigError, match=r"model.rope_theta: renamed to model.global_rope_theta"):
        _load(tmp_path, "model.rope_theta=1000.0")
    # A window longer than the rows is allowed: those layers then see the whole row (see EncoderConfig).
    cfg = _load(tmp_path, "model.global_attn_every_n_layers=2", "model.local_attention=4096")
    assert cfg.model.local_attention == 4096


def test_dry_run_plan_names_the_layer_pattern(tmp_path):
    from launch.train.dry_run import describe
    from launch.train.engine_config import resolve_deepspeed_config

    cfg = _load(tmp_path, "model.num_layers=6", "model.global_attn_every_n_layers=3", "model.local_attention=32")
    text = describe(cfg, 2, resolve_deepspeed_config(cfg, 2, "fp32"), 1000, "fp32", 0.15)
    assert "global every 3 layers (2 global, 4 local), window 32 (+-16 tokens)" in text
    assert "global attention in every layer" in describe(_load(tmp_path), 2, resolve_deepspeed_config(
        _load(tmp_path), 2, "fp32"), 1000, "fp32", 0.15)
