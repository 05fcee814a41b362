"""Training objectives (MLM, span masking, causal LM, prefix LM) and the mixer that picks one per
step. Every objective is a pure function of (rows, doc_ids, generator, TokenInfo, config) that
returns the Batch contract of objectives/batch.py; objectives/ never sees the model or data/."""

from objectives.batch import IGNORE_INDEX, Batch, TokenInfo
from objectives.causal import CausalConfig, causal
from objectives.common import prepend_mode_token, step_generator
from objectives.mixer import Mixer
from objectives.mlm import MLMConfig, mlm
from objectives.prefix import PrefixConfig, prefix_lm
from objectives.registry import OBJECTIVES, Objective, ObjectiveSpec, build_objective
from objectives.span import SpanConfig, span_mask

__all__ = [
    "IGNORE_INDEX",
    "OBJECTIVES",
    "Batch",
    "CausalConfig",
    "MLMConfig",
    "Mixer",
    "Objective",
    "ObjectiveSpec",
    "PrefixConfig",
    "SpanConfig",
    "TokenInfo",
    "build_objective",
    "causal",
    "mlm",
    "prefix_lm",
    "prepend_mode_token",
    "span_mask",
    "step_generator",
]
