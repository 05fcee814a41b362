"""The export loads into stock transformers ModernBERT with no key problems and computes what cloze computes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForMaskedLM

from launch.export.main import write_hf_model
from model import EncoderConfig, EncoderForPretraining, from_hf_state_dict, to_hf_state_dict

# Both ops run in fp32 with the same operation order (observed differences are ~1e-7); 1e-4 leaves room for a
# different BLAS blocking while still catching any wrong weight, theta, eps or activation (those move outputs by
# 1e-2 or more at this size).
ATOL = 1e-4


def _cfg() -> EncoderConfig:
    # At the real init_std (0.02) a 64-wide model is nearly linear and its attention nearly uniform: a wrong
    # rope theta moved outputs by only 4e-5 and tanh-GELU by 5e-7, both under ATOL. init_std=0.3 and a small
    # theta (far from HF's defaults 160000 / 10000) make each of those mistakes move outputs by more than 1e-3
    # (checked by hand: theta 5.1, one local layer 2.8, eps 1e-2 1.0, tanh GELU 1.8e-3).
    return EncoderConfig(vocab_size=300, hidden_size=64, num_layers=3, num_heads=4, intermediate_size=96,
                         global_rope_theta=1000.0, norm_eps=1e-6, init_std=0.3, max_position_embeddings=128)


def _local_cfg(**kw) -> EncoderConfig:
    # ModernBERT's layout at a small size: layers 0 and 3 global, 1, 2 and 4 sliding-window (16: +-8 tokens), with
    # thetas far from HF's defaults and from each other, and rows of 128 tokens, 8 windows long.
    base = dict(vocab_size=300, hidden_size=64, num_layers=5, num_heads=4, intermediate_size=96, norm_eps=1e-6,
                init_std=0.3, max_position_embeddings=256, global_attn_every_n_layers=3, local_attention=16,
                global_rope_theta=1000.0, local_rope_theta=50.0)
    return EncoderConfig(**{**base, **kw})


def _perturbed(cfg: EncoderConfig) -> EncoderForPretraining:
    torch.manual_seed(0)
    model = EncoderForPretraining(cfg).eval()
    # Init leaves every norm weight at 1 and the decoder bias at 0; perturb them so a swapped or dropped norm /
    # bias in the mapping changes the output.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def cloze() -> EncoderForPretraining:
    return _perturbed(_cfg())


@pytest.fixture(scope="module")
def cloze_local() -> EncoderForPretraining:
    return _perturbed(_local_cfg())


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    return torch.randint(5, 300, (2, 37), generator=torch.Generator().manual_seed(1))


def _no_key_problems(info: dict) -> None:
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_encoder_hidden_states_match(cloze, input_ids, tmp_path, impl):
    write_hf_model(cloze.state_dict(), cloze.cfg, tmp_path, with_head=False)
    hf, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True, attn_implementation=impl)
    _no_key_problems(info)
    assert type(hf).__name__ == "ModernBertModel"
    assert set(hf.config.layer_types) == {"full_attention"}
    with torch.no_grad():
        ours = cloze.encoder(input_ids)
        theirs = hf.eval()(input_ids=input_ids).last_hidden_state
    assert theirs.shape == ours.shape
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_masked_lm_logits_match(cloze, input_ids, tmp_path, impl):
    write_hf_model(cloze.state_dict(), cloze.cfg, tmp_path, with_head=True)
    hf, info = AutoModelForMaskedLM.from_pretrained(tmp_path, output_loading_info=True, attn_implementation=impl)
    _no_key_problems(info)
    assert hf.decoder.weight.data_ptr() == hf.model.embeddings.tok_embeddings.weight.data_ptr(), "decoder not tied"
    with torch.no_grad():
        ours = cloze.logits_for(input_ids)
        theirs = hf.eval()(input_ids=input_ids).logits
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)
    assert torch.equal(theirs.argmax(-1), ours.argmax(-1))


def test_export_drops_head_and_writes_config(cloze, tmp_path):
    write_hf_model(cloze.state_dict(), cloze.cfg, tmp_path, with_head=False, dtype=torch.bfloat16)
    tensors = load_file(tmp_path / "model.safetensors")
    assert not any(k.startswith(("head", "decoder", "model.")) for k in tensors)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["ModernBertModel"]
    assert config["dtype"] == "bfloat16"
    assert (config["cls_token_id"], config["sep_token_id"], config["pad_token_id"]) == (
        cloze.cfg.cls_token_id, cloze.cfg.sep_token_id, cloze.cfg.pad_token_id)


@pytest.mark.parametrize("with_head", [False, True])
def test_round_trip_is_identity(cloze, with_head):
    sd = cloze.state_dict()
    back = from_hf_state_dict(to_hf_state_dict(sd, with_head), with_head)
    expected = sd if with_head else {k: v for k, v in sd.items() if k.startswith("encoder.")}
    assert back.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(back[key], tensor), key
    if with_head:
        fresh = EncoderForPretraining(cloze.cfg)
        fresh.load_state_dict(back, strict=True)
        assert fresh.head.decoder.weight is fresh.encoder.embeddings.tok_embeddings.weight


def test_unmapped_or_untied_keys_raise(cloze):
    sd = dict(cloze.state_dict())
    with pytest.raises(ValueError, match="encoder.layers.0.attn.extra"):
        to_hf_state_dict({**sd, "encoder.layers.0.attn.extra": torch.zeros(1)}, with_head=False)
    with pytest.raises(ValueError, match="not tied"):
        to_hf_state_dict({**sd, "head.decoder.weight": sd["head.decoder.weight"] + 1}, with_head=True)
    hf_sd = to_hf_state_dict(sd, with_head=False)
    with pytest.raises(ValueError, match="pooler.weight"):
        from_hf_state_dict({**hf_sd, "pooler.weight": torch.zeros(1)}, with_head=False)


# ---- local (sliding-window) layers ----

LONG = 128  # 8 windows of 16: most pairs of a row lie outside the window of the local layers


def _hidden_states(hf, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return hf.eval()(input_ids=ids, attention_mask=attention_mask).last_hidden_state


@pytest.fixture(scope="module")
def long_ids() -> torch.Tensor:
    return torch.randint(5, 300, (2, LONG), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_local_layers_match_modernbert(cloze_local, long_ids, tmp_path, impl):
    """transformers applies the window through its own mask (|q - k| <= local_attention // 2 on sliding_attention
    layers, each kind with its own theta); cloze must compute the same numbers, on both of its backends."""
    write_hf_model(cloze_local.state_dict(), cloze_local.cfg, tmp_path, with_head=False)
    hf, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True, attn_implementation=impl)
    _no_key_problems(info)
    assert hf.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention", "full_attention",
                                     "sliding_attention"]
    theirs = _hidden_states(hf, long_ids)
    for backend in ("sdpa", "flex"):
        cloze_local.encoder.set_attention_backend(backend)
        try:
            with torch.no_grad():
                ours = cloze_local.encoder(long_ids)
        finally:
            cloze_local.encoder.set_attention_backend("sdpa")
        torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0, msg=backend)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_local_layers_match_modernbert_on_padded_rows(cloze_local, long_ids, tmp_path, impl):
    """HF has no packed documents: a row is one document, padded at the end (attention_mask 0). cloze expresses a
    pad the only way it masks one, as a document of its own after the real tokens; the real positions agree."""
    write_hf_model(cloze_local.state_dict(), cloze_local.cfg, tmp_path, with_head=False)
    hf = AutoModel.from_pretrained(tmp_path, attn_implementation=impl)
    lengths = torch.tensor([LONG, 77])
    real = torch.arange(LONG)[None, :] < lengths[:, None]
    ids = torch.where(real, long_ids, torch.full_like(long_ids, cloze_local.cfg.pad_token_id))
    theirs = _hidden_states(hf, ids, real.long())
    with torch.no_grad():
        ours = cloze_local.encoder(ids, doc_ids=(~real).long())
    torch.testing.assert_close(theirs[real], ours[real], atol=ATOL, rtol=0)
    # The padded row really differs from what it would be with the pads visible: the comparison sees masking.
    with torch.no_grad():
        assert (cloze_local.encoder(ids)[1, :77] - ours[1, :77]).abs().max() > 1e-2


def test_local_parity_fails_on_an_off_by_one_window(cloze_local, long_ids, tmp_path):
    """A window one token wider each side (18 for 16) or swapped thetas move the states far past ATOL, so the
    parity above checks the window rule and the thetas, not just the weights."""
    write_hf_model(cloze_local.state_dict(), cloze_local.cfg, tmp_path, with_head=False)
    theirs = _hidden_states(AutoModel.from_pretrained(tmp_path, attn_implementation="sdpa"), long_ids)
    for wrong in (_local_cfg(local_attention=18), _local_cfg(global_rope_theta=50.0, local_rope_theta=1000.0)):
        twin = EncoderForPretraining(wrong).eval()
        twin.load_state_dict(cloze_local.state_dict())
        with torch.no_grad():
            assert (twin.encoder(long_ids) - theirs).abs().max() > 1e-2


def test_local_masked_lm_logits_match(cloze_local, long_ids, tmp_path):
    write_hf_model(cloze_local.state_dict(), cloze_local.cfg, tmp_path, with_head=True)
    hf, info = AutoModelForMaskedLM.from_pretrained(tmp_path, output_loading_info=True, attn_implementation="sdpa")
    _no_key_problems(info)
    with torch.no_grad():
        ours = cloze_local.logits_for(long_ids)
        theirs = hf.eval()(input_ids=long_ids).logits
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)
