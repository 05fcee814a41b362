"""Export to a stock Hugging Face architecture (ModernBERT): config.json content and the weight-name mapping, both
ways (cloze -> HF for the export, HF -> cloze for continuing pretraining from a Hugging Face folder).

config.json is built by transformers' own ModernBertConfig (imported when called, so `import model` stays torch
only), which fixes the key names and their meaning to the installed transformers. The weights are plain
safetensors: cloze's module names are ModernBERT's, so the mapping is a prefix change, but every key is still
checked against an explicit list so that a parameter added later fails loudly instead of being dropped from the
export.
"""

from __future__ import annotations

import json
import re
from typing import Any

import torch

from .config import EncoderConfig

_ENCODER_KEY = re.compile(
    r"(embeddings\.tok_embeddings\.weight|embeddings\.norm\.weight|final_norm\.weight"
    r"|layers\.\d+\.(attn_norm|mlp_norm)\.weight|layers\.\d+\.attn\.(Wqkv|Wo)\.weight|layers\.\d+\.mlp\.(Wi|Wo)\.weight)"
)
_EMBEDDING = "embeddings.tok_embeddings.weight"
# cloze head key -> ModernBertForMaskedLM key. The decoder weight is tied to the embedding and is absent from
# the export: HF re-ties it on load (tie_word_embeddings=True), and safetensors refuses shared storage anyway.
_HEAD_KEYS = {"head.dense.weight": "head.dense.weight", "head.norm.weight": "head.norm.weight",
              "head.decoder.bias": "decoder.bias"}
_TIED_DECODER = "head.decoder.weight"

LEGACY_HF_KEYS = ("global_attn_every_n_layers", "global_rope_theta", "local_rope_theta")
"""Keys config.json carries beside those of ModernBertConfig().to_dict(): the layer pattern and the thetas as
transformers before 5.0 read them (it ignores layer_types and rope_parameters). The installed transformers reads
them too where layer_types / rope_parameters are absent, and to_dict() keeps global_attn_every_n_layers itself.
They hold the same values as layer_types and rope_parameters, so every version reads the same model."""

# What cloze's layers are, setting by setting: an HF config asking for anything else describes another model.
_FIXED_SETTINGS: dict[str, Any] = {
    "hidden_activation": "gelu",  # GeGLU with exact (erf) GELU
    "attention_bias": False,
    "mlp_bias": False,
    "norm_bias": False,
    "attention_dropout": 0.0,
    "embedding_dropout": 0.0,
    "mlp_dropout": 0.0,
    "decoder_bias": True,  # the MLM head: dense (no bias), GELU, norm, decoder tied to the embedding with a bias
    "classifier_activation": "gelu",
    "classifier_bias": False,
    "tie_word_embeddings": True,
}
_FULL, _SLIDING = "full_attention", "sliding_attention"
_DEFAULT_PATTERN = 3
"""The 1-in-n pattern transformers assumes when a config.json names neither layer_types nor
global_attn_every_n_layers (ModernBertConfig.__post_init__)."""


def hf_config(cfg: EncoderConfig, with_head: bool, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """config.json for transformers' ModernBertModel (with_head=False) or ModernBertForMaskedLM (with_head=True).

    transformers.ModernBertConfig(...).to_json_string() with cloze's shape: layer_types ("full_attention" where
    layer i % global_attn_every_n_layers == 0, "sliding_attention" elsewhere), rope_parameters (global_rope_theta
    for full, local_rope_theta for sliding attention), local_attention (the total window, as cloze means it), no
    biases, exact GELU, no dropout, the special ids (cls/bos, sep/eos, pad), plus LEGACY_HF_KEYS for transformers
    before 5.0. The [MASK] id is not a ModernBertConfig setting: the tokenizer files carry it.
    """
    from transformers import ModernBertConfig

    rope = {_FULL: {"rope_type": "default", "rope_theta": float(cfg.global_rope_theta)},
            _SLIDING: {"rope_type": "default", "rope_theta": float(cfg.local_rope_theta)}}
    config = ModernBertConfig(
        architectures=["ModernBertForMaskedLM" if with_head else "ModernBertModel"],
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        initializer_range=cfg.init_std,
        initializer_cutoff_factor=2.0,
        norm_eps=cfg.norm_eps,
        pad_token_id=cfg.pad_token_id,
        bos_token_id=cfg.cls_token_id,
        eos_token_id=cfg.sep_token_id,
        cls_token_id=cfg.cls_token_id,
        sep_token_id=cfg.sep_token_id,
        layer_types=cfg.layer_types,
        rope_parameters=rope,
        local_attention=cfg.local_attention,
        global_attn_every_n_layers=cfg.global_attn_every_n_layers,
        classifier_dropout=0.0,
        sparse_prediction=False,
        dtype=str(dtype).removeprefix("torch."),
        **_FIXED_SETTINGS,
    )
    out = json.loads(config.to_json_string(use_diff=False))
    out["global_rope_theta"] = float(cfg.global_rope_theta)
    out["local_rope_theta"] = float(cfg.local_rope_theta)
    return out


def encoder_config_from_hf(
    config: dict[str, Any], mask_token_id: int | None = None, source: str = "Hugging Face config"
) -> EncoderConfig:
    """The EncoderConfig of a Hugging Face ModernBERT config.json (a parsed dict), for continuing pretraining from
    a Hugging Face folder; the inverse of hf_config.

    A key the dict leaves out means what transformers' ModernBertConfig defaults it to, and the layer pattern and
    RoPE thetas are read as transformers reads them: layer_types if present, else global_attn_every_n_layers
    (else 3); rope_parameters if present, else global_rope_theta / local_rope_theta (else 160000 / 10000). An odd
    local_attention is the even one below it (the window is |q - k| <= local_attention // 2 either way).
    mask_token_id: the tokenizer's [MASK] id, needed unless the dict has one (exports of older cloze versions do).

    Raises one ValueError naming `source` and every setting cloze's encoder cannot reproduce (biases, dropout, an
    activation other than exact GELU, a head width other than hidden_size / num_attention_heads, scaled RoPE, a
    layer pattern that is not global every n layers, an untied decoder, ...).
    """
    from transformers import ModernBertConfig

    if not isinstance(config, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(config).__name__}")
    defaults = ModernBertConfig().to_dict()

    def get(key: str) -> Any:
        return config.get(key, defaults.get(key))

    problems = []
    if config.get("model_type") != "modernbert":
        problems.append(f"model_type={config.get('model_type')!r} (cloze reads 'modernbert' only)")
    for key, want in _FIXED_SETTINGS.items():
        got = get(key)
        if not _same_setting(got, want):
            problems.append(f"{key}={_shown(got)} (cloze's encoder has {want!r})")
    layers, hidden, heads = get("num_hidden_layers"), get("hidden_size"), get("num_attention_heads")
    if "head_dim" in config and config["head_dim"] is not None and (
            not _is_int(hidden) or not _is_int(heads) or heads <= 0 or config["head_dim"] * heads != hidden):
        problems.append(f"head_dim={_shown(config['head_dim'])} (cloze's heads are hidden_size / "
                        "num_attention_heads wide)")
    every_n = _layer_pattern(config, layers, problems)
    thetas = _rope_thetas(config, problems)
    window = get("local_attention")
    if _is_int(window) and window % 2:
        window -= 1
    sliding = config.get("sliding_window")
    if sliding is not None and (not _is_int(sliding) or not _is_int(window) or window // 2 != sliding):
        problems.append(f"sliding_window={_shown(sliding)} disagrees with local_attention={_shown(window)} "
                        "(ModernBERT's sliding_window is local_attention // 2)")
    mask_id = config.get("mask_token_id", mask_token_id)
    if mask_id is None:
        problems.append("no mask_token_id: pass the tokenizer's [MASK] id")
    if problems:
        raise ValueError(f"{source}: settings cloze cannot load: " + "; ".join(problems))
    try:
        return EncoderConfig(
            vocab_size=get("vocab_size"), hidden_size=hidden, num_layers=layers, num_heads=heads,
            intermediate_size=get("intermediate_size"), max_position_embeddings=get("max_position_embeddings"),
            global_attn_every_n_layers=every_n, local_attention=window, global_rope_theta=thetas[0],
            local_rope_theta=thetas[1], norm_eps=get("norm_eps"), init_std=get("initializer_range"),
            pad_token_id=get("pad_token_id"), cls_token_id=get("cls_token_id"), sep_token_id=get("sep_token_id"),
            mask_token_id=mask_id,
        )
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from None


def _same_setting(got: Any, want: Any) -> bool:
    """got == want with JSON's types: 0 means 0.0, but neither 0 nor "false" means False."""
    if isinstance(want, float):
        return isinstance(got, (int, float)) and not isinstance(got, bool) and got == want
    return type(got) is type(want) and got == want


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shown(value: Any) -> str:
    """A value from a foreign file, cut short for an error message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _layer_pattern(config: dict[str, Any], layers: Any, problems: list[str]) -> int:
    """global_attn_every_n_layers of the config's layer pattern (1 when it cannot be read; the problem is noted)."""
    if not _is_int(layers) or layers <= 0:
        problems.append(f"num_hidden_layers={_shown(layers)} (a positive integer)")
        return 1
    types = config.get("layer_types")
    if types is None:
        every_n = config.get("global_attn_every_n_layers", _DEFAULT_PATTERN)
        if not _is_int(every_n) or every_n <= 0:
            problems.append(f"global_attn_every_n_layers={_shown(every_n)} (a positive integer)")
            return 1
        return every_n
    if not isinstance(types, list) or len(types) != layers or any(t not in (_FULL, _SLIDING) for t in types):
        problems.append(f"layer_types={_shown(types)} (one of {_FULL!r} or {_SLIDING!r} per layer, "
                        f"{layers} in all)")
        return 1
    # The config's own global_attn_every_n_layers first: an n past the last layer has equivalent smaller twins.
    stated = config.get("global_attn_every_n_layers")
    for every_n in ([stated] if _is_int(stated) and stated > 0 else []) + list(range(1, layers + 1)):
        if all((t == _FULL) == (i % every_n == 0) for i, t in enumerate(types)):
            return every_n
    problems.append(f"layer_types={_shown(types)} (cloze's layers are global every n-th layer from layer 0, "
                    "sliding-window otherwise)")
    return 1


def _rope_thetas(config: dict[str, Any], problems: list[str]) -> tuple[Any, Any]:
    """(global, local) RoPE bases, from rope_parameters or the pre-5.0 keys, as transformers reads them."""
    if config.get("rope_scaling") is not None:
        problems.append(f"rope_scaling={_shown(config['rope_scaling'])} (cloze's RoPE is unscaled)")
    params = config.get("rope_parameters") or {}
    if not isinstance(params, dict) or not set(params) <= {_FULL, _SLIDING}:
        problems.append(f"rope_parameters={_shown(params)} (cloze reads {{{_FULL!r}: ..., {_SLIDING!r}: ...}})")
        params = {}
    thetas = []
    for kind, legacy, default in ((_FULL, "global_rope_theta", 160000.0), (_SLIDING, "local_rope_theta", 10000.0)):
        entry = params.get(kind) or {}
        if not isinstance(entry, dict) or entry.get("rope_type", "default") != "default":
            problems.append(f"rope_parameters.{kind}={_shown(entry)} (cloze's RoPE is the default, unscaled one)")
            entry = {}
        thetas.append(entry.get("rope_theta", config.get(legacy, default)))
    return thetas[0], thetas[1]


def _check_encoder_key(name: str, key: str, source: str) -> None:
    if not _ENCODER_KEY.fullmatch(name):
        raise ValueError(f"{source} key {key!r} has no Hugging Face ModernBERT counterpart; extend model/hf.py")


def to_hf_state_dict(sd: dict[str, torch.Tensor], with_head: bool) -> dict[str, torch.Tensor]:
    """EncoderForPretraining.state_dict() keys -> ModernBertModel keys (with_head=False: the head is dropped, by
    intent) or ModernBertForMaskedLM keys (with_head=True: encoder under "model.", head, decoder bias; the tied
    decoder weight is left out and must equal the embedding). Raises ValueError on any unknown key."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in sd.items():
        if key.startswith("encoder."):
            name = key.removeprefix("encoder.")
            _check_encoder_key(name, key, "cloze")
            out[f"model.{name}" if with_head else name] = tensor
        elif key == _TIED_DECODER or key in _HEAD_KEYS:
            if not with_head:
                continue
            if key == _TIED_DECODER:
                embedding = sd.get(f"encoder.{_EMBEDDING}")
                if embedding is None or not torch.equal(tensor, embedding):
                    raise ValueError(f"cloze key {key!r} is not tied to encoder.{_EMBEDDING}; cannot export it "
                                     "as a tied ModernBertForMaskedLM decoder")
                continue
            out[_HEAD_KEYS[key]] = tensor
        else:
            raise ValueError(f"cloze key {key!r} has no Hugging Face ModernBERT counterpart; extend model/hf.py")
    prefix = "model." if with_head else ""
    required = [prefix + _EMBEDDING] + (list(_HEAD_KEYS.values()) if with_head else [])
    missing = [k for k in required if k not in out]
    if missing:
        raise ValueError(f"cloze state dict lacks the weights for {missing}; is it a full EncoderForPretraining?")
    return out


def from_hf_state_dict(sd: dict[str, torch.Tensor], with_head: bool) -> dict[str, torch.Tensor]:
    """Inverse of to_hf_state_dict. with_head=True re-creates the tied head.decoder.weight from the embedding, so
    the result loads strictly into EncoderForPretraining; with_head=False gives the encoder keys only."""
    head_inverse = {v: k for k, v in _HEAD_KEYS.items()}
    out: dict[str, torch.Tensor] = {}
    for key, tensor in sd.items():
        if with_head and key in head_inverse:
            out[head_inverse[key]] = tensor
            continue
        if with_head and key == "decoder.weight":
            if not torch.equal(tensor, sd.get(f"model.{_EMBEDDING}", torch.empty(0))):
                raise ValueError("Hugging Face decoder.weight differs from the embedding; cloze needs it tied")
            continue  # re-created from the embedding below
        if with_head and not key.startswith("model."):
            raise ValueError(f"Hugging Face key {key!r} is not a ModernBertForMaskedLM weight; extend model/hf.py")
        name = key.removeprefix("model.") if with_head else key
        _check_encoder_key(name, key, "Hugging Face")
        out[f"encoder.{name}"] = tensor
    if with_head:
        embedding = out.get(f"encoder.{_EMBEDDING}")
        if embedding is None:
            raise ValueError(f"Hugging Face state dict lacks model.{_EMBEDDING}")
        out[_TIED_DECODER] = embedding
    return out


def hf_shapes(cfg: EncoderConfig, with_head: bool) -> dict[str, tuple[int, ...]]:
    """Every weight a ModernBertModel (with_head=False) or ModernBertForMaskedLM (with_head=True) folder of this
    shape holds, with its shape: the keys to_hf_state_dict writes (the tied decoder weight left out). Built on the
    meta device, so it costs no memory at any model size."""
    from .heads import EncoderForPretraining

    with torch.device("meta"):
        sd = EncoderForPretraining(cfg).state_dict()
    out: dict[str, tuple[int, ...]] = {}
    for key, tensor in sd.items():
        if key.startswith("encoder."):
            name = key.removeprefix("encoder.")
            out[f"model.{name}" if with_head else name] = tuple(tensor.shape)
        elif with_head and key in _HEAD_KEYS:
            out[_HEAD_KEYS[key]] = tuple(tensor.shape)
    return out
