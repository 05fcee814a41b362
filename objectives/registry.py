"""Objectives by name, built from plain config dicts (the YAML's `objectives:` section).

    fn = build_objective("span", {"rate": 0.15, "unit": "word"}, mode_tokens=False)
    batch = fn(rows, doc_ids, gen, tok)

Mistakes are reported as ValueError naming the objective, the bad key and the valid keys, with
the nearest valid name when a name is misspelt.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from objectives.batch import Batch, TokenInfo
from objectives.causal import CausalConfig, causal
from objectives.common import mode_id_for, prepend_mode_token
from objectives.mlm import MLMConfig, mlm
from objectives.prefix import PrefixConfig, prefix_lm
from objectives.span import SpanConfig, span_mask


@dataclass(frozen=True)
class ObjectiveSpec:
    """One registered objective: its pure function and its config dataclass."""

    fn: Callable[..., Batch]
    """fn(rows, doc_ids, gen, tok, cfg) -> Batch."""
    config: type
    """The dataclass its parameters build."""


OBJECTIVES: dict[str, ObjectiveSpec] = {
    "mlm": ObjectiveSpec(mlm, MLMConfig),
    "span": ObjectiveSpec(span_mask, SpanConfig),
    "causal": ObjectiveSpec(causal, CausalConfig),
    "prefix": ObjectiveSpec(prefix_lm, PrefixConfig),
}


def _unknown(what: str, name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown {what} {name!r}{hint} (valid: {', '.join(valid) or 'none'})"


@dataclass(frozen=True)
class Objective:
    """A configured objective: call it as obj(rows, doc_ids, gen, tok) -> Batch."""

    name: str
    """Registry name; also Batch.objective."""
    config: Any
    """The validated config dataclass."""
    mode_tokens: bool = False
    """Prepend the UL2 mode token for this objective (TokenInfo.mode_ids) to every row."""

    def __call__(self, rows: torch.Tensor, doc_ids: torch.Tensor, gen: torch.Generator, tok: TokenInfo) -> Batch:
        batch = OBJECTIVES[self.name].fn(rows, doc_ids, gen, tok, self.config)
        if self.mode_tokens:
            batch = prepend_mode_token(batch, mode_id_for(self.name, tok))
        return batch


def build_objective(name: str, params: Mapping[str, Any] | None = None, mode_tokens: bool = False) -> Objective:
    """The objective `name` with its config built from `params` (missing keys take defaults)."""
    if name not in OBJECTIVES:
        raise ValueError(_unknown("objective", name, sorted(OBJECTIVES)))
    spec = OBJECTIVES[name]
    params = dict(params or {})
    valid = [f.name for f in dataclasses.fields(spec.config)]
    bad = [key for key in params if key not in valid]
    if bad:
        raise ValueError("; ".join(_unknown(f"parameter of objective {name!r}:", key, valid) for key in bad))
    return Objective(name, spec.config(**params), bool(mode_tokens))
