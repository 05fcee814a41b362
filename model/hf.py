"""Export to a stock Hugging Face architecture (ModernBERT): config.json content and the weight-name mapping.

No transformers import here: this module writes plain dicts and safetensors; tests load them with transformers.
cloze's module names are ModernBERT's, so the mapping is a prefix change, but every key is still checked against
an explicit list so that a parameter added later fails loudly instead of being dropped from the export.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

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


def hf_config(cfg: EncoderConfig, with_head: bool, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """config.json for transformers' ModernBertModel (with_head=False) or ModernBertForMaskedLM (with_head=True).

    Every layer is global ("full_attention") with cloze's rope_theta. The legacy keys (global_attn_every_n_layers,
    global_rope_theta, local_rope_theta, reference_compile=False) make transformers 4.48-4.5x read the same model:
    they used a 1-in-N global pattern, separate thetas and an auto-compiled reference path.
    """
    layer_types = cfg.layer_types
    rope = {"rope_type": "default", "rope_theta": float(cfg.global_rope_theta)}
    local_rope = {"rope_type": "default", "rope_theta": float(cfg.local_rope_theta)}
    return {
        "architectures": ["ModernBertForMaskedLM" if with_head else "ModernBertModel"],
        "model_type": "modernbert",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "hidden_activation": "gelu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "initializer_range": cfg.init_std,
        "initializer_cutoff_factor": 2.0,
        "norm_eps": cfg.norm_eps,
        "norm_bias": False,
        "pad_token_id": cfg.pad_token_id,
        "bos_token_id": cfg.cls_token_id,
        "eos_token_id": cfg.sep_token_id,
        "cls_token_id": cfg.cls_token_id,
        "sep_token_id": cfg.sep_token_id,
        "mask_token_id": cfg.mask_token_id,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "embedding_dropout": 0.0,
        "mlp_bias": False,
        "mlp_dropout": 0.0,
        "layer_types": layer_types,
        "rope_parameters": {"full_attention": rope, "sliding_attention": local_rope},
        "global_attn_every_n_layers": cfg.global_attn_every_n_layers,
        "global_rope_theta": float(cfg.global_rope_theta),
        "local_rope_theta": float(cfg.local_rope_theta),
        "local_attention": cfg.local_attention,
        "reference_compile": False,
        "decoder_bias": True,
        "classifier_activation": "gelu",
        "classifier_bias": False,
        "classifier_dropout": 0.0,
        "sparse_prediction": False,
        "tie_word_embeddings": True,
        "dtype": str(dtype).removeprefix("torch."),
    }


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


def save_hf_model(
    sd: dict[str, torch.Tensor],
    cfg: EncoderConfig,
    out_dir: str | Path,
    with_head: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write out_dir/config.json and out_dir/model.safetensors from an EncoderForPretraining state dict.

    Floating tensors are cast to dtype; every tensor is cloned contiguous on CPU so no two share storage
    (safetensors refuses shared storage, and a view of a larger ZeRO buffer would otherwise save the whole buffer).
    """
    if not dtype.is_floating_point:
        raise ValueError(f"save_hf_model: dtype={dtype} must be a floating type (float32, bfloat16, float16)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: (t.to(dtype) if t.is_floating_point() else t).detach().to("cpu").contiguous().clone()
        for name, t in to_hf_state_dict(sd, with_head).items()
    }
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = hf_config(cfg, with_head, dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
