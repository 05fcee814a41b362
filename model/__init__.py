"""The encoder, its MLM pretraining head, init, and the Hugging Face (ModernBERT) export mapping. Imports torch
only (hf.py uses transformers' ModernBertConfig inside its config functions; the export's writer is
launch/export/main.py). Nothing here imports distributed code."""

from .attention import ATTENTION_KINDS, AttentionMask, build_attention_mask
from .config import EncoderConfig
from .encoder import Encoder
from .heads import IGNORE_INDEX, EncoderForPretraining, MLMHead, PretrainOutput
from .hf import encoder_config_from_hf, from_hf_state_dict, hf_config, to_hf_state_dict

__all__ = [
    "ATTENTION_KINDS",
    "IGNORE_INDEX",
    "AttentionMask",
    "Encoder",
    "EncoderConfig",
    "EncoderForPretraining",
    "MLMHead",
    "PretrainOutput",
    "build_attention_mask",
    "encoder_config_from_hf",
    "from_hf_state_dict",
    "hf_config",
    "to_hf_state_dict",
]
