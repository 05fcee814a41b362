"""config.json both ways: what cloze writes is what the installed transformers' ModernBertConfig knows and reads
back as cloze's layer pattern, window and thetas; encoder_config_from_hf reads a ModernBERT config as transformers
does and refuses, in one error, every setting cloze's encoder cannot reproduce."""

from __future__ import annotations

import json

import pytest
from transformers import AutoConfig, ModernBertConfig

from model import EncoderConfig, encoder_config_from_hf, hf_config
from model.hf import LEGACY_HF_KEYS

SHAPES = [
    dict(num_layers=3),  # every layer global (the default pattern)
    dict(num_layers=7, global_attn_every_n_layers=3, local_attention=16, local_rope_theta=500.0),
    dict(num_layers=4, global_attn_every_n_layers=9, local_attention=4096),  # only layer 0 global, a wide window
]


def _cfg(**kw) -> EncoderConfig:
    base = dict(vocab_size=300, hidden_size=64, num_heads=4, intermediate_size=96, global_rope_theta=1000.0,
                max_position_embeddings=512, norm_eps=1e-6, init_std=0.05, mask_token_id=7)
    return EncoderConfig(**{**base, **kw})


def _hf_view(config: ModernBertConfig) -> tuple:
    """What decides ModernBertModel's attention: the per-layer kinds, the half window, the two thetas."""
    rope = config.rope_parameters
    return (list(config.layer_types), config.sliding_window, rope["full_attention"]["rope_theta"],
            rope["sliding_attention"]["rope_theta"])


@pytest.mark.parametrize("shape", SHAPES)
def test_every_key_written_is_one_transformers_knows(shape):
    written = hf_config(_cfg(**shape), with_head=True)
    known = set(ModernBertConfig().to_dict())
    assert set(written) - known == set(LEGACY_HF_KEYS)
    # The keys beyond to_dict()'s are the pre-5.0 spelling of the pattern and thetas: the installed transformers
    # reads each of them (a config built from that key alone differs from the default), and with the same values
    # as layer_types and rope_parameters, so a reader of either spelling gets the same model.
    plain = _hf_view(ModernBertConfig(num_hidden_layers=7))
    for key in LEGACY_HF_KEYS:
        assert _hf_view(ModernBertConfig(num_hidden_layers=7, **{key: 2})) != plain, key
    legacy_only = {k: v for k, v in written.items() if k not in ("layer_types", "rope_parameters")}
    assert _hf_view(ModernBertConfig(**legacy_only)) == _hf_view(ModernBertConfig(**written))


@pytest.mark.parametrize("shape", SHAPES)
def test_transformers_reads_clozes_pattern_window_and_thetas(shape, tmp_path):
    cfg = _cfg(**shape)
    (tmp_path / "config.json").write_text(json.dumps(hf_config(cfg, with_head=False)))
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is ModernBertConfig
    kinds = ["full_attention" if i % cfg.global_attn_every_n_layers == 0 else "sliding_attention"
             for i in range(cfg.num_layers)]
    assert _hf_view(loaded) == (kinds, cfg.local_attention // 2, cfg.global_rope_theta, cfg.local_rope_theta)
    assert loaded.local_attention == cfg.local_attention
    assert (loaded.hidden_size, loaded.num_hidden_layers, loaded.num_attention_heads, loaded.intermediate_size,
            loaded.norm_eps, loaded.initializer_range) == (64, cfg.num_layers, 4, 96, 1e-6, 0.05)


@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_through_the_hf_config(shape):
    cfg = _cfg(**shape)
    written = hf_config(cfg, with_head=False)
    assert encoder_config_from_hf(written, mask_token_id=cfg.mask_token_id) == cfg
    assert encoder_config_from_hf(json.loads(json.dumps(written)), mask_token_id=7) == cfg  # via JSON text


# A config in the layout published ModernBERT checkpoints use (written by transformers 4.4x): no layer_types, no
# rope_parameters, the pattern and thetas under their older names, and keys transformers 5 no longer has.
PRE_5_CONFIG = {
    "architectures": ["ModernBertForMaskedLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 50281, "classifier_activation": "gelu", "classifier_bias": False, "classifier_dropout": 0.0,
    "classifier_pooling": "mean", "cls_token_id": 50281, "decoder_bias": True, "deterministic_flash_attn": False,
    "embedding_dropout": 0.0, "eos_token_id": 50282, "global_attn_every_n_layers": 3, "global_rope_theta": 160000.0,
    "gradient_checkpointing": False, "hidden_activation": "gelu", "hidden_size": 768,
    "initializer_cutoff_factor": 2.0, "initializer_range": 0.02, "intermediate_size": 1152, "layer_norm_eps": 1e-05,
    "local_attention": 128, "local_rope_theta": 10000.0, "max_position_embeddings": 8192, "mlp_bias": False,
    "mlp_dropout": 0.0, "model_type": "modernbert", "norm_bias": False, "norm_eps": 1e-05, "num_attention_heads": 12,
    "num_hidden_layers": 22, "pad_token_id": 50283, "position_embedding_type": "absolute", "reference_compile": True,
    "sep_token_id": 50282, "tie_word_embeddings": True, "torch_dtype": "float32", "vocab_size": 50368,
}


@pytest.mark.parametrize("change", [
    {},
    {"global_attn_every_n_layers": 2, "local_rope_theta": 77.0},
    {"global_attn_every_n_layers": None},  # dropped below: neither layer_types nor a pattern means 1 in 3
    {"local_attention": 129},  # odd: the same window as 128
    {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 5.0}}},
])
def test_reads_a_config_as_transformers_does(change):
    config = {k: v for k, v in {**PRE_5_CONFIG, **change}.items() if v is not None}
    ours = encoder_config_from_hf(config, mask_token_id=50284)
    theirs = ModernBertConfig(**config)
    pattern = ["full_attention" if ours.is_global_layer(i) else "sliding_attention" for i in range(ours.num_layers)]
    assert _hf_view(theirs) == (pattern, ours.local_attention // 2, ours.global_rope_theta, ours.local_rope_theta)
    assert (ours.num_layers, ours.hidden_size, ours.vocab_size, ours.pad_token_id, ours.mask_token_id) == (
        22, 768, 50368, 50283, 50284)


def test_missing_keys_mean_transformers_defaults():
    ours = encoder_config_from_hf({"model_type": "modernbert"}, mask_token_id=50284)
    theirs = ModernBertConfig()
    assert (ours.num_layers, ours.hidden_size, ours.intermediate_size, ours.global_attn_every_n_layers,
            ours.local_attention) == (theirs.num_hidden_layers, theirs.hidden_size, theirs.intermediate_size, 3,
                                      theirs.local_attention)


def test_unsupported_settings_are_listed_in_one_error():
    bad = {**PRE_5_CONFIG, "attention_bias": True, "norm_bias": "false", "hidden_activation": "gelu_pytorch_tanh",
           "mlp_dropout": 0.1, "head_dim": 32, "tie_word_embeddings": False,
           "layer_types": ["sliding_attention"] + ["full_attention"] * 21,
           "rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 4.0}}}
    with pytest.raises(ValueError) as e:
        encoder_config_from_hf(bad, mask_token_id=50284, source="/models/x/config.json")
    msg = str(e.value)
    assert msg.startswith("/models/x/config.json: settings cloze cannot load: ")
    assert "\n" not in msg
    for needle in ("attention_bias=True", "norm_bias='false'", "hidden_activation='gelu_pytorch_tanh'",
                   "mlp_dropout=0.1", "head_dim=32", "tie_word_embeddings=False", "layer_types=",
                   "rope_parameters.full_attention="):
        assert needle in msg, needle


@pytest.mark.parametrize("config, needle", [
    ({**PRE_5_CONFIG, "model_type": "bert"}, "model_type='bert'"),
    ({k: v for k, v in PRE_5_CONFIG.items() if k != "mask_token_id"}, "no mask_token_id"),
    ({**PRE_5_CONFIG, "num_hidden_layers": "22"}, "num_hidden_layers='22'"),
    ({**PRE_5_CONFIG, "layer_types": ["full_attention"] * 3}, "22 in all"),
    ({**PRE_5_CONFIG, "rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling="),
    ({**PRE_5_CONFIG, "hidden_size": 770}, "not divisible by num_heads"),
    ({**PRE_5_CONFIG, "sliding_window": 32}, "sliding_window=32 disagrees"),
    ([1, 2], "expected a JSON object"),
])
def test_each_refusal_names_its_key(config, needle):
    with pytest.raises(ValueError, match="^Hugging Face config: ") as e:
        encoder_config_from_hf(config, mask_token_id=None if "mask" in needle else 50284)
    assert needle in str(e.value)
