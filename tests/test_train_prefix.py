"""Prefix LM and mode tokens end to end: a real 2-rank DeepSpeed run (torchrun, gloo, CPU) of the tiny config with
prefix in the objective mix and objectives.mode_tokens=true trains, evaluates every objective (prefix included)
with its mode token, checkpoints and exports; the export's model card names each mode's token and id, those ids
are the export tokenizer's and the training tokenizer's, and the card's snippet runs as written in the folder."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import run_cli

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

MIX = "objectives.mix={mlm: 0.4, prefix: 0.4, causal: 0.2}"
STEPS, EVAL_EVERY = 12, 6


@pytest.fixture(scope="module")
def prefix_run(tiny_data, tmp_path_factory) -> tuple[Path, Path, str]:
    """(run folder, export folder, training log) of one run, shared by the tests below."""
    root = tmp_path_factory.mktemp("prefix")
    out, export = root / "train", root / "export"
    proc = run_cli(["launch.train", "--config", "launch/configs/tiny.yaml", "--nproc", "2", f"out_dir={out}",
                    f"data.path={tiny_data}", MIX, "objectives.mode_tokens=true", f"eval.path={tiny_data}",
                    f"eval.every={EVAL_EVERY}", "eval.batches=1", f"train.max_steps={STEPS}", "train.log_every=3",
                    f"train.checkpoint_every={STEPS}"], check=True)
    run_cli(["launch.export", "--checkpoint", str(out), "--out", str(export)], check=True)
    return out, export, proc.stderr


def test_run_trains_and_evaluates_prefix(prefix_run):
    out, _, log = prefix_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [r["loss"]["prefix"] for r in records if "prefix" in r.get("loss", {})]
    assert trained and all(math.isfinite(v) for v in trained), "no prefix training loss logged"
    evals = [r for r in records if "eval/prefix_loss" in r]
    assert [r["step"] for r in evals] == [EVAL_EVERY, STEPS]
    for r in evals:
        for key in ("loss", "accuracy", "perplexity"):
            assert math.isfinite(r[f"eval/prefix_{key}"]), (key, r)
        assert r["eval/prefix_perplexity"] == pytest.approx(math.exp(r["eval/prefix_loss"]))
        assert {"eval/mlm_loss", "eval/span_loss", "eval/causal_loss"} <= r.keys()
    assert evals[-1]["eval/prefix_loss"] < evals[0]["eval/prefix_loss"], "held-out prefix loss did not fall"
    assert f"eval @ step {STEPS}:" in log and "prefix_loss" in log
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval"]["eval/prefix_loss"] == evals[-1]["eval/prefix_loss"]
    assert summary["objectives"]["prefix"]["batches"] > 0
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{STEPS:08d}"


def card_modes(card: str) -> dict[str, tuple[str, int]]:
    rows = re.findall(r"^\| (\w+) \| `(\[MODE_\w+\])` \| (\d+) \|", card, flags=re.M)
    return {name: (token, int(i)) for name, token, i in rows}


def test_card_has_a_prefix_row_and_the_export_tokenizer_mode_ids(prefix_run, tiny_data):
    from transformers import AutoTokenizer

    from data.tokenizer import Tokenizer

    out, export, _ = prefix_run
    card = (export / "README.md").read_text()
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    row = re.search(r"^\| prefix \| [\d.]+ \| [\d.]+ \| ([\d.]+) \| ([\d.]+) \|$", card, flags=re.M)
    assert row, "no prefix row with numbers in the card's results"
    assert float(row[1]) == pytest.approx(last["eval/prefix_loss"], abs=1e-4)
    assert float(row[2]) == pytest.approx(last["eval/prefix_accuracy"], abs=1e-4)

    modes = card_modes(card)
    assert set(modes) == {"mlm", "span", "causal", "prefix"}
    hf = AutoTokenizer.from_pretrained(export)
    shipped = {t["content"]: t["id"] for t in json.loads((export / "tokenizer.json").read_text())["added_tokens"]}
    special_map = json.loads((export / "special_tokens_map.json").read_text())["additional_special_tokens"]
    training = Tokenizer(tiny_data / "tokenizer" / "spm.model").mode_ids
    for name, (token, i) in modes.items():
        assert i == hf.convert_tokens_to_ids(token) == shipped[token] == training[name], (name, token, i)
        assert token in special_map
    assert "| prefix | `[MODE_PREFIX]` | 8 | prefix attention (bidirectional prefix, causal after it) | 40% |" in card


def test_card_snippet_runs_and_prepends_the_mode_id(prefix_run):
    """The mode snippet, run as written from inside the export folder, feeds the mode id at position 0."""
    _, export, _ = prefix_run
    card = (export / "README.md").read_text()
    section = card[card.index("## Mode tokens"):card.index("## Training run")]
    snippet = re.search(r"```python\n(.*?)```", section, flags=re.S)[1]
    probe = snippet + "print(ids[0, :2].tolist(), tuple(hidden.shape))\n"
    proc = subprocess.run([sys.executable, "-c", probe], cwd=export, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids_text, shape = proc.stdout.strip().splitlines()[-1].split("] ", 1)
    mode_id, cls_id = json.loads(ids_text + "]")
    assert (mode_id, cls_id) == (card_modes(card)["mlm"][1], 2), proc.stdout
    assert shape.startswith("(1, ") and shape.endswith(", 64)"), shape
