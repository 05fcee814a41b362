"""bench/recipes.py, briefly: MLM only, the GPT-BERT hybrid and CLM-then-MLM each trained for a few steps on 2 ranks
through launch.train, exported, evaluated on the same held-out shards and fine-tuned on the downstream task; one
table and its JSON."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import run_cli


@pytest.mark.slow
@pytest.mark.distributed
def test_recipes_bench_trains_three_recipes_at_equal_tokens_and_tables_them(tiny_data, tmp_path):
    out = tmp_path / "recipes.json"
    # The tiny corpus is its own held-out set here: what is tested is the bench's plumbing, not the figures.
    proc = run_cli(["bench.recipes", "--steps", "4", "--data", str(tiny_data), "--heldout", str(tiny_data),
                    "--nproc", "1", "--work", str(tmp_path / "work"),
                    "--out", str(out), "--downstream-seeds", "0", "--downstream-rows", "8", "8",
                    "--downstream-epochs", "1", "train.warmup_steps=1", "train.log_every=2", "eval.batches=1"],
                   timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("| ")]
    assert lines[0].startswith("| recipe | steps | tokens |")
    assert [ln.split("|")[1].strip() for ln in lines[2:]] == ["MLM only", "GPT-BERT 1:15 hybrid", "CLM then MLM"]
    rows = json.loads(out.read_text())["rows"]
    assert [r["steps"] for r in rows] == [4, 4, 4]
    assert len({r["tokens"] for r in rows}) == 1 and rows[0]["tokens"] > 0  # equal tokens
    for r in rows:
        for key in ("mlm_loss", "mlm_accuracy", "causal_loss", "causal_accuracy", "downstream", "random_init"):
            assert math.isfinite(r[key]), (r["recipe"], key, r[key])
    # Each row trained its own mix: MLM alone has no causal micro-batch, the 4-step CLM-then-MLM run starts causal.
    assert set(rows[0]["objectives"]) == {"mlm"}, rows[0]["objectives"]
    assert "causal" in rows[2]["objectives"], rows[2]["objectives"]
