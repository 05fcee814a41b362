"""The registry's error messages, and step_generator's reproducibility."""

from __future__ import annotations

import pytest
import torch

from objectives import OBJECTIVES, MLMConfig, SpanConfig, build_objective, step_generator
from tests.test_objectives_support import make_rows, make_tok


def test_registry_names():
    assert set(OBJECTIVES) == {"mlm", "span", "causal", "prefix"}


def test_build_objective_passes_parameters():
    obj = build_objective("span", {"rate": 0.3, "unit": "word"})
    assert obj.config == SpanConfig(rate=0.3, unit="word")
    assert build_objective("mlm").config == MLMConfig()
    rows, docs = make_rows(2, 64)
    batch = obj(rows, docs, torch.Generator().manual_seed(0), make_tok())
    assert batch.objective == "span" and batch.num_labels > 0


def test_unknown_objective_names_the_nearest():
    with pytest.raises(ValueError) as err:
        build_objective("casual")
    msg = str(err.value)
    assert "'casual'" in msg and "did you mean 'causal'" in msg and "mlm" in msg and "prefix" in msg


def test_unknown_parameter_names_it_and_the_valid_ones():
    with pytest.raises(ValueError) as err:
        build_objective("mlm", {"rat": 0.3, "wholeword": True})
    msg = str(err.value)
    assert "'rat'" in msg and "'rate'" in msg and "'wholeword'" in msg and "whole_word" in msg
    assert "mask_frac" in msg


def test_bad_parameter_value_is_the_configs_value_error():
    with pytest.raises(ValueError, match="MLMConfig.rate=2"):
        build_objective("mlm", {"rate": 2})


def test_step_generator_reproducible_and_distinct():
    def draw(*args):
        return torch.rand(4, generator=step_generator(*args))

    assert torch.equal(draw(1, 0, 10), draw(1, 0, 10))
    seen = {tuple(draw(*args).tolist()) for args in [(1, 0, 10), (2, 0, 10), (1, 1, 10), (1, 0, 11), (1, 0, 10, 1)]}
    assert len(seen) == 5
    with pytest.raises(ValueError, match="step"):
        step_generator(0, 0, -1)


def test_a_batch_is_rebuilt_exactly_on_resume():
    rows, docs = make_rows(4, 128)
    tok = make_tok()
    for name in OBJECTIVES:
        obj = build_objective(name)
        a = obj(rows, docs, step_generator(7, 1, 1234), tok)
        b = obj(rows, docs, step_generator(7, 1, 1234), tok)
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels), name
