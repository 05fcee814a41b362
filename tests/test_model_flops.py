"""FLOP accounting for MFU on useful work: the pairs the attention pattern lets meet, counted in closed form,
equal the dense mask's count, and useful_flops agrees with flops_per_token where the two must coincide."""

from __future__ import annotations

import pytest
import torch

from model.attention import build_attention_mask, visible_pairs
from model.config import EncoderConfig


def random_layout(gen: torch.Generator, batch: int, seq_len: int) -> torch.Tensor:
    """Packed rows: each row's document index is non-decreasing from 0, with random document lengths."""
    rows = []
    for _ in range(batch):
        cuts = torch.randint(0, 3, (seq_len,), generator=gen).eq(0).cumsum(0)
        rows.append(cuts - cuts[0])
    return torch.stack(rows)


@pytest.mark.parametrize("attention", ["bidirectional", "causal", "prefix"])
def test_visible_pairs_equal_the_dense_mask(attention):
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        batch, seq_len = 3, int(torch.randint(1, 40, (1,), generator=gen))
        doc_ids = random_layout(gen, batch, seq_len)
        prefix = torch.randint(1, seq_len + 1, (batch,), generator=gen) if attention == "prefix" else None
        mask = build_attention_mask(attention, batch, seq_len, torch.device("cpu"), doc_ids, prefix).mask
        assert visible_pairs(attention, doc_ids, prefix) == int(mask.expand(batch, 1, seq_len, seq_len).sum())


def test_useful_flops_matches_flops_per_token_on_whole_rows():
    """One document per row, bidirectional: every pair is useful, so per token the two counts agree exactly."""
    cfg = EncoderConfig(vocab_size=32768, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=2048)
    batch, seq_len, labelled = 8, 512, 0.15
    tokens = batch * seq_len
    useful = cfg.useful_flops(tokens, batch * seq_len * seq_len, round(labelled * tokens))
    assert useful / tokens == pytest.approx(cfg.flops_per_token(seq_len, round(labelled * tokens) / tokens), rel=1e-12)
    # Causal rows do a little over half the attention work; packing two documents per row halves it again.
    doc_ids = torch.zeros(batch, seq_len, dtype=torch.int64)
    assert visible_pairs("causal", doc_ids) == batch * seq_len * (seq_len + 1) // 2
    doc_ids[:, seq_len // 2:] = 1
    assert visible_pairs("bidirectional", doc_ids) == batch * seq_len * seq_len // 2
