"""The export loads into stock transformers ModernBERT with no key problems and computes what cloze computes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForMaskedLM

from model import EncoderConfig, EncoderForPretraining, from_hf_state_dict, save_hf_model, to_hf_state_dict

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


@pytest.fixture(scope="module")
def cloze() -> EncoderForPretraining:
    torch.manual_seed(0)
    model = EncoderForPretraining(_cfg()).eval()
    # Init leaves every norm weight at 1 and the decoder bias at 0; perturb them so a swapped or dropped norm /
    # bias in the mapping changes the output.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    return torch.randint(5, 300, (2, 37), generator=torch.Generator().manual_seed(1))


def _no_key_problems(info: dict) -> None:
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_encoder_hidden_states_match(cloze, input_ids, tmp_path, impl):
    save_hf_model(cloze.state_dict(), cloze.cfg, tmp_path, with_head=False)
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
    save_hf_model(cloze.state_dict(), cloze.cfg, tmp_path, with_head=True)
    hf, info = AutoModelForMaskedLM.from_pretrained(tmp_path, output_loading_info=True, attn_implementation=impl)
    _no_key_problems(info)
    assert hf.decoder.weight.data_ptr() == hf.model.embeddings.tok_embeddings.weight.data_ptr(), "decoder not tied"
    with torch.no_grad():
        ours = cloze.logits_for(input_ids)
        theirs = hf.eval()(input_ids=input_ids).logits
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)
    assert torch.equal(theirs.argmax(-1), ours.argmax(-1))


def test_export_drops_head_and_writes_config(cloze, tmp_path):
    save_hf_model(cloze.state_dict(), cloze.cfg, tmp_path, with_head=False, dtype=torch.bfloat16)
    tensors = load_file(tmp_path / "model.safetensors")
    assert not any(k.startswith(("head", "decoder", "model.")) for k in tensors)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["ModernBertModel"]
    assert config["dtype"] == "bfloat16"
    assert config["mask_token_id"] == cloze.cfg.mask_token_id


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
