"""The held-out evaluation (launch/train/evaluate.py) on real prepared shards: prefix LM is a row of its own, beside
MLM, span and causal, and a run trained with mode tokens is evaluated with each objective's mode token first, as
in training. The model is cloze's own encoder, run in one process (the 2-rank path is tests/test_train_prefix.py)."""

from __future__ import annotations

import math

import pytest
import torch

from launch.train.evaluate import EVAL_OBJECTIVES, Evaluator
from objectives import IGNORE_INDEX
from objectives.batch import TokenInfo
from tests.test_objectives_support import tokenizer_token_info

SEQ_LEN, BATCH, BATCHES = 64, 4, 2


@pytest.fixture(scope="module")
def evaluators(tiny_data) -> tuple[Evaluator, Evaluator, TokenInfo]:
    tok = tokenizer_token_info(tiny_data / "tokenizer" / "spm.model")
    plain = Evaluator(str(tiny_data), SEQ_LEN, BATCH, BATCHES, rank=0, world=1, tok_info=tok, seed=3)
    modes = Evaluator(str(tiny_data), SEQ_LEN, BATCH, BATCHES, rank=0, world=1, tok_info=tok, seed=3,
                      mode_tokens=True)
    return plain, modes, tok


def test_prefix_is_an_evaluated_objective(evaluators):
    plain, _, _ = evaluators
    assert list(plain.sets) == ["mlm", "span", "causal", "prefix"]
    for b in plain.sets["prefix"]:
        assert b.attention == "prefix" and b.objective == "prefix"
        n = b.prefix_len
        assert ((n >= math.ceil(0.2 * SEQ_LEN)) & (n <= int(0.8 * SEQ_LEN))).all(), n
        # loss after the split only: no label before position n - 1 (the last prefix position predicts token n)
        positions = torch.arange(SEQ_LEN).unsqueeze(0)
        assert (b.labels[positions < (n - 1).unsqueeze(1)] == IGNORE_INDEX).all()
        assert b.num_labels > 0


def test_mode_tokens_are_applied_as_in_training(evaluators):
    """Same rows and masks, each row shifted right by one behind its objective's mode token; the prefix grows by
    one so the mode token lies inside it."""
    plain, modes, tok = evaluators
    ids = dict(tok.mode_ids)
    for name in EVAL_OBJECTIVES:
        for a, b in zip(plain.sets[name], modes.sets[name], strict=True):
            assert (b.input_ids[:, 0] == ids[name]).all(), name
            assert torch.equal(b.input_ids[:, 1:], a.input_ids[:, :-1]), name
            assert torch.equal(b.labels[:, 1:], a.labels[:, :-1]) and (b.labels[:, 0] == IGNORE_INDEX).all(), name
            assert b.attention == a.attention, name
            if name == "prefix":
                assert torch.equal(b.prefix_len, a.prefix_len + 1)
    assert len({ids[n] for n in EVAL_OBJECTIVES}) == len(EVAL_OBJECTIVES), "one distinct token per mode"


def test_run_reports_prefix_loss_accuracy_and_perplexity(evaluators):
    from model.config import EncoderConfig
    from model.heads import EncoderForPretraining

    plain, _, tok = evaluators
    torch.manual_seed(0)
    model = EncoderForPretraining(EncoderConfig(vocab_size=tok.vocab_size, hidden_size=64, num_layers=2, num_heads=4,
                                                intermediate_size=96))
    model.train()
    result = plain.run(model, torch.device("cpu"))
    assert model.training, "run() puts a training model back into training mode"
    for name in EVAL_OBJECTIVES:
        assert math.isfinite(result[f"eval/{name}_loss"]) and 0.0 <= result[f"eval/{name}_accuracy"] <= 1.0, name
    # An untrained model is near uniform over 1000 ids: ln(1000) = 6.9.
    assert abs(result["eval/prefix_loss"] - math.log(tok.vocab_size)) < 1.0, result
    for name in ("causal", "prefix"):
        assert result[f"eval/{name}_perplexity"] == pytest.approx(math.exp(result[f"eval/{name}_loss"]))
    # The prefix row is its own measurement: fewer labels (none inside the prefix) under another attention mask.
    labels = {n: sum(b.num_labels for b in plain.sets[n]) for n in ("causal", "prefix")}
    assert labels["prefix"] < labels["causal"]
    assert result["eval/prefix_loss"] != result["eval/causal_loss"]
